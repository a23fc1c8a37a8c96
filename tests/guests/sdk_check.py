"""The Python SDK's promises, checked by tests/all/languages.rs."""

from kwq_task import TaskError, attempt, init, log, progress, results, state, task, task_id

INITS = 0


@init
def warm(key):
    global INITS
    INITS += 1
    return {"key": key, "count": 0}


@task
def run(payload):
    if payload is None:  # a fan-in task: its input is a job's results
        values = list(results())
        return {"count": len(values), "sum": sum(values)}
    op = payload["op"]
    if op == "count":
        s = state()
        s["count"] += 1
        return {"key": s["key"], "count": s["count"], "inits": INITS,
                "task_id": task_id(), "attempt": attempt()}
    if op == "log":
        log("hello from the guest", "warn")
        progress(0.75)
        return {}
    if op == "fail":
        raise TaskError("asked to fail")
    if op == "crash":
        return {"x": 1 / 0}
    raise TaskError(f"unknown op {op}")
