// A KWQ task: the price of a European option by Monte Carlo, with
// antithetic variates.
//
// In:  {"spot":100,"strike":100,"rate":0.05,"vol":0.2,"maturity":1,"kind":"call","paths":100000,"seed":1}
// Out: {"price":10.4...,"std_error":0.04...,"paths":100000}

import { TaskError, log, progress, task } from '../kwq-task/index.js';

export const run = task(async (payload) => {
  log(`pricing ${payload.paths} paths`);
  return price(payload, progress);
});

/** Price the option in `p`; `onProgress` gets the fraction done. */
export function price(p, onProgress = () => {}) {
  for (const name of ['spot', 'strike', 'vol', 'maturity']) {
    const value = p[name];
    if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) {
      throw new TaskError(`${name} must be a positive number, got ${JSON.stringify(value)}`);
    }
  }
  const kind = p.kind ?? 'call';
  if (kind !== 'call' && kind !== 'put') {
    throw new TaskError(`kind must be "call" or "put", got ${JSON.stringify(kind)}`);
  }
  const paths = Math.floor(p.paths ?? 10000);
  if (!(paths >= 1)) throw new TaskError('paths must be at least 1');
  const rate = p.rate ?? 0;
  const pairs = Math.ceil(paths / 2);
  const forward = p.spot * Math.exp((rate - 0.5 * p.vol * p.vol) * p.maturity);
  const diffusion = p.vol * Math.sqrt(p.maturity);
  const sign = kind === 'call' ? 1 : -1;
  const payoff = (terminal) => Math.max(sign * (terminal - p.strike), 0);
  const normal = normals(p.seed ?? 0);
  let sum = 0;
  let sumSq = 0;
  const reportEvery = Math.max(Math.floor(pairs / 10), 1);
  for (let i = 0; i < pairs; i++) {
    const shock = Math.exp(diffusion * normal());
    const sample = 0.5 * (payoff(forward * shock) + payoff(forward / shock));
    sum += sample;
    sumSq += sample * sample;
    if ((i + 1) % reportEvery === 0) onProgress((i + 1) / pairs);
  }
  const mean = sum / pairs;
  const variance = (Math.max(sumSq / pairs - mean * mean, 0) * pairs) / Math.max(pairs - 1, 1);
  const discount = Math.exp(-rate * p.maturity);
  return { price: discount * mean, std_error: discount * Math.sqrt(variance / pairs), paths: pairs * 2 };
}

/** Standard normal draws from a seed: sfc32 uniforms, Box-Muller. */
function normals(seed) {
  let a = 0x9e3779b9;
  let b = 0x243f6a88;
  let c = 0xb7e15162;
  let d = seed >>> 0;
  const uniform = () => {
    a >>>= 0; b >>>= 0; c >>>= 0; d >>>= 0;
    const t = (a + b + d) >>> 0;
    d = (d + 1) >>> 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) >>> 0;
    c = (c << 21) | (c >>> 11);
    c = (c + t) >>> 0;
    return (t + 1) / 4294967297;
  };
  for (let i = 0; i < 12; i++) uniform();
  let spare = null;
  return () => {
    if (spare !== null) {
      const z = spare;
      spare = null;
      return z;
    }
    const radius = Math.sqrt(-2 * Math.log(uniform()));
    const angle = 2 * Math.PI * uniform();
    spare = radius * Math.sin(angle);
    return radius * Math.cos(angle);
  };
}
