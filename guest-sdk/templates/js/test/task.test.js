// The task's test, with plain Node.js: npm test (node --test)
import assert from 'node:assert/strict';
import test from 'node:test';
import { price } from '../src/task.js';
import { TaskError } from '../kwq-task/index.js';

// Standard normal CDF (Abramowitz-Stegun 7.1.26, error < 1.5e-7).
function cdf(x) {
  const z = Math.abs(x) / Math.SQRT2;
  const t = 1 / (1 + 0.3275911 * z);
  const poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
  const erf = 1 - poly * Math.exp(-z * z);
  return x >= 0 ? 0.5 * (1 + erf) : 0.5 * (1 - erf);
}

function blackScholes(p) {
  const sqrtT = Math.sqrt(p.maturity);
  const d1 = (Math.log(p.spot / p.strike) + (p.rate + 0.5 * p.vol * p.vol) * p.maturity) / (p.vol * sqrtT);
  const d2 = d1 - p.vol * sqrtT;
  const k = p.strike * Math.exp(-p.rate * p.maturity);
  return p.kind === 'call' ? p.spot * cdf(d1) - k * cdf(d2) : k * cdf(-d2) - p.spot * cdf(-d1);
}

test('agrees with Black-Scholes', () => {
  for (const [kind, strike] of [['call', 100], ['put', 110]]) {
    const p = { spot: 100, strike, rate: 0.05, vol: 0.2, maturity: 1, kind, paths: 200000, seed: 7 };
    const out = price(p);
    assert.ok(Math.abs(out.price - blackScholes(p)) < 4 * out.std_error, JSON.stringify(out));
  }
});

test('rejects a bad contract', () => {
  assert.throws(() => price({ spot: 100, strike: 100, vol: 0, maturity: 1 }), TaskError);
});
