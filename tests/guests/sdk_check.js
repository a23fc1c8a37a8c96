// The JavaScript SDK's promises, checked by tests/all/languages.rs.
import { TaskError, attempt, log, progress, results, setup, state, task, taskId } from '../kwq-task/index.js';

let inits = 0;

export const init = setup((key) => {
  inits += 1;
  return { key, count: 0 };
});

export const run = task(async (payload) => {
  if (payload === null) {
    // A fan-in task: its input is a job's results.
    let count = 0;
    let sum = 0;
    for (const value of results()) {
      count += 1;
      sum += value;
    }
    return { count, sum };
  }
  switch (payload.op) {
    case 'count': {
      const s = state();
      s.count += 1;
      return { key: s.key, count: s.count, inits, task_id: taskId(), attempt: attempt() };
    }
    case 'log':
      log('hello from the guest', 'warn');
      progress(0.75);
      return {};
    case 'fetch':
      // The sandbox has no network: the host refuses every request.
      try {
        const response = await fetch('http://127.0.0.1:9/');
        return { fetched: response.status };
      } catch (error) {
        return { refused: String(error) };
      }
    case 'fail':
      throw new TaskError('asked to fail');
    case 'crash':
      // Not a TaskError: a plain exception, as a bug would throw.
      throw new RangeError('division by zero');
    default:
      throw new TaskError(`unknown op ${payload.op}`);
  }
});
