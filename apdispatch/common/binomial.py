"""A one-sided lower confidence bound on a success rate measured from a count (Clopper-Pearson).

Measured accuracy is k right answers out of n; the rate it stands for is at
least ``lower_bound(k, n)`` at the stated level: exact (from the binomial),
conservative, and valid at any n, small ones included.
"""

from __future__ import annotations

from scipy.special import betaincinv

LEVEL = 0.95


def lower_bound(successes: int, n: int, level: float = LEVEL) -> float:
    """The rate p such that k or more of n succeed with probability 1 - ``level`` (0 when k = 0)."""
    if not 0 <= successes <= n:
        raise ValueError(f"successes: expected 0 <= successes <= n, got {successes} of {n}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected in (0, 1), got {level}")
    if successes == 0:
        return 0.0
    return float(betaincinv(successes, n - successes + 1, 1.0 - level))
