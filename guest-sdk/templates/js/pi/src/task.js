// A KWQ task: pi by Monte Carlo, the share of random points in the unit
// square that fall inside the quarter circle, times four.
//
// In:  {"samples": 200000, "seed": 1}
// Out: {"estimate": 3.14..., "std_error": 0.003..., "inside": ..., "samples": 200000}

import { TaskError, progress, task } from '../kwq-task/index.js';

export const run = task((payload) => estimatePi(payload, progress));

/** Estimate pi from `p.samples` points; `onProgress` gets the fraction done. */
export function estimatePi(p, onProgress = () => {}) {
  const samples = p.samples;
  if (!Number.isInteger(samples) || samples < 1) {
    throw new TaskError(`samples must be a positive integer, got ${JSON.stringify(samples)}`);
  }
  const uniform = sfc32(p.seed ?? 0);
  let inside = 0;
  const reportEvery = Math.max(Math.floor(samples / 10), 1);
  for (let i = 0; i < samples; i++) {
    const x = uniform();
    const y = uniform();
    if (x * x + y * y <= 1) inside++;
    if ((i + 1) % reportEvery === 0) onProgress((i + 1) / samples);
  }
  const share = inside / samples;
  return {
    estimate: 4 * share,
    std_error: 4 * Math.sqrt((share * (1 - share)) / samples),
    inside,
    samples,
  };
}

/** Uniform draws in (0, 1) from a seed (sfc32). */
function sfc32(seed) {
  let a = 0x9e3779b9;
  let b = 0x243f6a88;
  let c = 0xb7e15162;
  let d = seed >>> 0;
  const next = () => {
    const t = (((a + b) >>> 0) + d) >>> 0;
    d = (d + 1) >>> 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) >>> 0;
    c = ((c << 21) | (c >>> 11)) >>> 0;
    c = (c + t) >>> 0;
    return (t + 1) / 4294967297;
  };
  for (let i = 0; i < 12; i++) next();
  return next;
}
