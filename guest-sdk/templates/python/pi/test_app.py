"""The task's test, with plain CPython: python3 -m unittest"""

import math
import unittest

from app import estimate_pi
from kwq_task import TaskError


class PiTest(unittest.TestCase):
    def test_agrees_with_pi(self):
        out = estimate_pi({"samples": 200_000, "seed": 7})
        self.assertLess(abs(out["estimate"] - math.pi), 4 * out["std_error"], out)

    def test_rejects_no_samples(self):
        with self.assertRaisesRegex(TaskError, "samples must be a positive integer"):
            estimate_pi({"samples": 0})


if __name__ == "__main__":
    unittest.main()
