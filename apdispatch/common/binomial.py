"""A one-sided lower confidence bound on a success rate measured from a count (Clopper-Pearson).

Measured accuracy is k right answers out of n; the rate it stands for is at
least ``lower_bound(k, n)`` at the stated level: exact (from the binomial),
conservative, and valid at any n, small ones included. Plain numpy (every
role imports it, edge workers included, which have no scipy): the binomial
tail in log space, solved for the rate by bisection.
"""

from __future__ import annotations

import numpy as np

LEVEL = 0.95
_BISECTIONS = 60  # halvings of [0, 1]: well below float precision of a rate


def upper_tail(successes: int, n: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(n, p)."""
    if successes <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    j = np.arange(successes, n + 1, dtype=np.float64)
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])
    ji = j.astype(np.int64)
    log_terms = log_fact[n] - log_fact[ji] - log_fact[n - ji] + j * np.log(p) + (n - j) * np.log1p(-p)
    top = log_terms.max()
    return float(min(1.0, np.exp(top) * np.exp(log_terms - top).sum()))


def lower_bound(successes: int, n: int, level: float = LEVEL) -> float:
    """The rate p at which k or more of n succeed with probability 1 - ``level`` (0 when k = 0)."""
    if not 0 <= successes <= n:
        raise ValueError(f"successes: expected 0 <= successes <= n, got {successes} of {n}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected in (0, 1), got {level}")
    if successes == 0:
        return 0.0
    alpha = 1.0 - level
    if successes == n:
        return float(alpha ** (1.0 / n))  # P(n of n) = p^n, exactly
    lo, hi = 0.0, successes / n  # the tail grows with p; at p = k / n it is about 1/2 > alpha
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if upper_tail(successes, n, mid) < alpha:
            lo = mid
        else:
            hi = mid
    return lo
