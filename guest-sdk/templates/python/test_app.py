"""The task's test, with plain CPython: python3 -m unittest"""

import math
import unittest

from app import price
from kwq_task import TaskError


def black_scholes(p):
    """The closed-form price the Monte Carlo estimate must agree with."""
    cdf = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))
    sqrt_t = math.sqrt(p["maturity"])
    d1 = (math.log(p["spot"] / p["strike"]) + (p["rate"] + 0.5 * p["vol"] ** 2) * p["maturity"]) / (p["vol"] * sqrt_t)
    d2 = d1 - p["vol"] * sqrt_t
    k = p["strike"] * math.exp(-p["rate"] * p["maturity"])
    if p["kind"] == "call":
        return p["spot"] * cdf(d1) - k * cdf(d2)
    return k * cdf(-d2) - p["spot"] * cdf(-d1)


class PriceTest(unittest.TestCase):
    def test_agrees_with_black_scholes(self):
        for kind, strike in (("call", 100), ("put", 110)):
            p = {"spot": 100, "strike": strike, "rate": 0.05, "vol": 0.2,
                 "maturity": 1, "kind": kind, "paths": 40_000, "seed": 7}
            out = price(p)
            self.assertLess(abs(out["price"] - black_scholes(p)), 4 * out["std_error"], out)

    def test_rejects_a_bad_contract(self):
        with self.assertRaisesRegex(TaskError, "vol must be a positive number"):
            price({"spot": 100, "strike": 100, "vol": 0, "maturity": 1})


if __name__ == "__main__":
    unittest.main()
