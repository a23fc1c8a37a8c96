"""A KWQ task: pi by Monte Carlo, the share of random points in the unit
square that fall inside the quarter circle, times four.

In:  {"samples": 200000, "seed": 1}
Out: {"estimate": 3.14..., "std_error": 0.003..., "inside": ..., "samples": 200000}
"""

import math
import random

from kwq_task import TaskError, progress, task


@task
def run(payload: dict) -> dict:
    return estimate_pi(payload, progress)


def estimate_pi(p: dict, on_progress=lambda fraction: None) -> dict:
    """Estimate pi from ``p["samples"]`` points; ``on_progress`` gets the fraction done."""
    samples = p.get("samples")
    if not isinstance(samples, int) or samples < 1:
        raise TaskError(f"samples must be a positive integer, got {samples!r}")
    rng = random.Random(p.get("seed", 0))
    inside = 0
    report_every = max(samples // 10, 1)
    for i in range(samples):
        x, y = rng.random(), rng.random()
        if x * x + y * y <= 1.0:
            inside += 1
        if (i + 1) % report_every == 0:
            on_progress((i + 1) / samples)
    share = inside / samples
    return {
        "estimate": 4.0 * share,
        "std_error": 4.0 * math.sqrt(share * (1.0 - share) / samples),
        "inside": inside,
        "samples": samples,
    }
