// The task's test, with plain Node.js: npm test (node --test)
import assert from 'node:assert/strict';
import test from 'node:test';
import { estimatePi } from '../src/task.js';
import { TaskError } from '../kwq-task/index.js';

test('agrees with pi', () => {
  const out = estimatePi({ samples: 200000, seed: 7 });
  assert.ok(Math.abs(out.estimate - Math.PI) < 4 * out.std_error, JSON.stringify(out));
});

test('rejects no samples', () => {
  assert.throws(() => estimatePi({ samples: 0 }), TaskError);
});
