// KWQ guest SDK for JavaScript: write one function, get a KWQ task module.
//
//   import { task } from '../kwq-task/index.js';
//   export const run = task(async (payload) => ({ sum: payload.a + payload.b }));
//
// Build with `kwq build` (it runs componentize-js on kwq-task/entry.js,
// which imports your src/task.js and exports `kwq:task/task`).
//
// - A plain `export function run(payload)` (and `init(affinityKey)`) works
//   too; `task()` and `setup()` only mark them, so any export name will do.
// - The payload is decoded from JSON and the returned value (or the value a
//   returned promise resolves to) encoded as JSON.
// - `export const init = setup((affinityKey) => state)` runs once per
//   instance; what it returns is kept for every later task of that instance:
//   `state()` returns it. Module-level variables survive between tasks too.
// - `throw new TaskError('...')` fails the task with that message
//   (`guest_error`). Any other throw fails it the same way, with its message,
//   and the stack is logged.
// - `log`, `progress`, `taskId` and `attempt` call the host.
// - `results()` yields a fan-in task's input: the results of the job it
//   reads, a page at a time.
//
// Outside a component (`node --test`) the host calls fall back to the
// console and dummy values, so task code can be tested with plain Node.js.

let host = null;
// The host's `kwq:task/inputs` (a fan-in task's input), set by component().
let inputs = null;
let kept;

/** Fail the current task with this message (`guest_error`). */
export class TaskError extends Error {}

/** Mark `fn(payload) -> result` (sync or async) as the module's task. */
export function task(fn) {
  if (typeof fn !== 'function') throw new TypeError('task() takes a function');
  fn.kwqTask = true;
  return fn;
}

/** Mark `fn(affinityKey) -> state` as the per-instance set-up. */
export function setup(fn) {
  if (typeof fn !== 'function') throw new TypeError('setup() takes a function');
  fn.kwqSetup = true;
  return fn;
}

/** What the `init` function returned for this instance (undefined without one). */
export function state() {
  return kept;
}

const LEVELS = ['trace', 'debug', 'info', 'warn', 'error'];

/** Write one log line; the host keeps it with the task's result. */
export function log(message, level = 'info') {
  if (!LEVELS.includes(level)) throw new RangeError(`log level must be one of ${LEVELS}`);
  if (host) host.log(level, String(message));
  else console.error(`[${level}] ${message}`);
}

/** Report how far the task has got, 0.0 ..= 1.0 (shown live in status). */
export function progress(fraction) {
  if (host) host.progress(Math.min(1, Math.max(0, Number(fraction))));
}

/** The id of the task being run. */
export function taskId() {
  return host ? host.taskId() : 'local';
}

/** Which attempt of the task this is, starting at 1. */
export function attempt() {
  return host ? host.attempt() : 1;
}

function failure(error) {
  if (error instanceof TaskError) return error.message;
  if (error instanceof Error) {
    log(error.stack || String(error), 'error');
    return `${error.name}: ${error.message}`;
  }
  return String(error);
}

/**
 * The results of the job a fan-in task reads (one submitted with
 * `"input": {"results_of": JOB}`; its payload is then null), in task
 * order, each parsed from JSON, fetched from the host a page at a time as
 * the loop goes on: `for (const r of results()) { ... }`. Nothing for a
 * task without an input, or outside a component.
 */
export function* results() {
  if (!inputs) return;
  const decoder = new TextDecoder();
  for (;;) {
    const page = inputs.nextResults(512);
    if (page.length === 0) return;
    for (const entry of page) yield JSON.parse(decoder.decode(entry.output));
  }
}

/**
 * The `kwq:task/task` export for a module namespace (entry.js calls this):
 * `context` is the host's `kwq:task/context` import, `hostInputs` its
 * `kwq:task/inputs` (absent in projects made before kwq:task@0.2.0).
 */
export function component(context, module, hostInputs) {
  host = context;
  inputs = hostInputs;
  // The functions marked by task() and setup(); plain exports named `run`
  // and `init` also do.
  const marked = (flag, name) =>
    Object.values(module).find((f) => typeof f === 'function' && f[flag]) ??
    (typeof module[name] === 'function' ? module[name] : undefined);
  const run = marked('kwqTask', 'run');
  const init = marked('kwqSetup', 'init');
  const decoder = new TextDecoder();
  const encoder = new TextEncoder();
  return {
    init(config) {
      if (!init) return;
      try {
        kept = init(decoder.decode(config));
      } catch (error) {
        throw failure(error);
      }
    },
    run(payload) {
      if (!run) throw 'src/task.js exports no task: export const run = task((payload) => ...)';
      let input;
      try {
        input = payload.length ? JSON.parse(decoder.decode(payload)) : null;
      } catch (error) {
        throw `invalid payload: ${error.message}`;
      }
      let output;
      try {
        output = run(input);
      } catch (error) {
        throw failure(error);
      }
      return finish(output, encoder);
    },
  };
}

function finish(output, encoder) {
  const encode = (v) => encoder.encode(JSON.stringify(v === undefined ? null : v));
  if (!output || typeof output.then !== 'function') return encode(output);
  return output.then(encode, (error) => { throw failure(error); });
}
