"""A KWQ task: the price of a European option by Monte Carlo, with
antithetic variates.

In:  {"spot":100,"strike":100,"rate":0.05,"vol":0.2,"maturity":1,"kind":"call","paths":20000,"seed":1}
Out: {"price":10.4...,"std_error":0.1...,"paths":20000}
"""

import math
import random

from kwq_task import TaskError, log, progress, task


@task
def run(payload: dict) -> dict:
    log(f"pricing {payload.get('paths')} paths")
    return price(payload, progress)


def price(p: dict, on_progress=lambda fraction: None) -> dict:
    """Price the option in ``p``; ``on_progress`` gets the fraction done."""
    for name in ("spot", "strike", "vol", "maturity"):
        value = p.get(name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise TaskError(f"{name} must be a positive number, got {value!r}")
    kind = p.get("kind", "call")
    if kind not in ("call", "put"):
        raise TaskError(f"kind must be 'call' or 'put', got {kind!r}")
    paths = int(p.get("paths", 10_000))
    if paths < 1:
        raise TaskError("paths must be at least 1")
    spot, strike, rate = p["spot"], p["strike"], p.get("rate", 0.0)
    vol, maturity = p["vol"], p["maturity"]
    rng = random.Random(p.get("seed", 0))
    pairs = (paths + 1) // 2
    forward = spot * math.exp((rate - 0.5 * vol * vol) * maturity)
    diffusion = vol * math.sqrt(maturity)
    call = kind == "call"
    total = total_sq = 0.0
    report_every = max(pairs // 10, 1)
    for i in range(pairs):
        shock = math.exp(diffusion * rng.gauss(0.0, 1.0))
        up, down = forward * shock, forward / shock
        if call:
            sample = 0.5 * (max(up - strike, 0.0) + max(down - strike, 0.0))
        else:
            sample = 0.5 * (max(strike - up, 0.0) + max(strike - down, 0.0))
        total += sample
        total_sq += sample * sample
        if (i + 1) % report_every == 0:
            on_progress((i + 1) / pairs)
    mean = total / pairs
    variance = max(total_sq / pairs - mean * mean, 0.0) * pairs / max(pairs - 1, 1)
    discount = math.exp(-rate * maturity)
    return {
        "price": discount * mean,
        "std_error": discount * math.sqrt(variance / pairs),
        "paths": pairs * 2,
    }
