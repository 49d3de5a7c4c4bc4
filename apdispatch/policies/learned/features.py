"""Per-candidate features, normalised so that one network scores any candidate set.

Every feature is a ratio or a bounded count: times are divided by the time
left until the request's deadline, load by the worker's slots, accuracy is a
margin over the request's floor. A shared network scores each candidate from
its own row, so the action space is whatever candidate set a request has:
any number of clusters, workers, variants and apps.

``Margins`` adds what the estimator's mean prediction misses: per target, a
running mean and spread of (observed latency - predicted latency) over the
replies to the policy's own decisions, kept as one safety margin (mean + 3
sd, ``SPREAD``). Network jitter, interference from requests that arrived later, a
batching delay: whatever makes a target's replies come later than predicted,
or less predictably, shows up there, online, in the AP and the simulator
alike.

The hot path builds the rows in plain Python floats and converts them with
one ``np.array`` call: for 4-16 candidates that is cheaper than a dozen
vectorised numpy calls on tiny arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import sqrt

import numpy as np

from apdispatch.policies.base import Candidate, RequestView

FEATURES: tuple[str, ...] = (
    "slack",  # (deadline_left - predicted) / deadline_left: > 0 is predicted in time
    "behind_fastest",  # (predicted - fastest predicted) / deadline_left: 0 for the fastest
    "accuracy_margin",  # (accuracy - min_accuracy) * 10: 1 = ten points above the floor
    "most_accurate",  # 1 for the most accurate candidates of the set
    "load",  # in_flight / slots
    "free_slot",  # 1 when a slot is free (the request would not queue)
    "rtt",  # rtt / deadline_left
    "behind_closest",  # (rtt - smallest rtt) / deadline_left: 0 for the closest
    "risk",  # the target's safety margin / deadline_left: slack - risk > 0 is safely in time
    "bias",  # constant 1: the first layer's bias lives in its weights
)
N_FEATURES = len(FEATURES)
SLACK = FEATURES.index("slack")

# Clipping keeps an odd candidate (a queue of 50, a deadline nearly gone)
# inside the range the network was trained on.
LOW = np.array([-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
HIGH = np.array([1.0, 2.0, 1.0, 1.0, 4.0, 1.0, 2.0, 2.0, 2.0, 1.0])
LOW.flags.writeable = False
HIGH.flags.writeable = False

# Standard deviations of a target's lateness its safety margin covers: with
# 3, "predicted + margin <= deadline" is in time with high confidence even
# where replies scatter (jitter, batching), and a target whose replies come
# reliably as predicted keeps a margin near zero.
SPREAD = 3.0

# Below this the deadline is as good as gone; avoids dividing by ~0.
MIN_DEADLINE_MS = 1e-3


class Margins:
    """Per target key: how much later than predicted its replies come (mean + 3 sd, >= 0).

    Updated from every feedback (O(1)); read by the features with one dict
    lookup per candidate. A late reply counts with the latency the AP saw
    (about the deadline): a lower bound, which still widens the margin.
    """

    __slots__ = ("_alpha", "_moments", "margin")

    def __init__(self, alpha: float = 0.05) -> None:
        self._alpha = alpha
        self._moments: dict[str, list[float]] = {}
        self.margin: dict[str, float] = {}

    def observe(self, key: str, predicted_ms: float, latency_ms: float) -> None:
        residual = latency_ms - predicted_ms
        m = self._moments.get(key)
        if m is None:
            # The first residual seeds the mean; the spread starts at zero.
            m = self._moments[key] = [residual, residual * residual]
        else:
            a = self._alpha
            m[0] += a * (residual - m[0])
            m[1] += a * (residual * residual - m[1])
        mean, sq = m
        self.margin[key] = max(0.0, mean + SPREAD * sqrt(max(0.0, sq - mean * mean)))


def candidate_features(
    request: RequestView, candidates: Sequence[Candidate], margins: dict[str, float] | None = None
) -> np.ndarray:
    """Rows of ``FEATURES`` for ``candidates``: a fresh ``(n, N_FEATURES)`` float64 array."""
    return candidate_features_late(request, candidates, margins)[0]


def candidate_features_late(
    request: RequestView, candidates: Sequence[Candidate], margins: dict[str, float] | None = None
) -> tuple[np.ndarray, list[int]]:
    """The features, and the indices of candidates predicted past the deadline (slack < 0)."""
    inv = 1.0 / max(request.deadline_ms, MIN_DEADLINE_MS)
    floor = request.min_accuracy
    fastest = min([c.predicted_ms for c in candidates]) * inv
    closest = min([c.rtt_ms for c in candidates]) * inv
    best = max([c.accuracy for c in candidates])
    margin = (margins or {}).get
    flat: list[float] = []
    late: list[int] = []
    extend = flat.extend
    for k, c in enumerate(candidates):
        p = c.predicted_ms * inv
        if p > 1.0:
            late.append(k)
        r = c.rtt_ms * inv
        busy = c.in_flight
        slots = c.slots
        extend(
            (
                1.0 - p,
                p - fastest,
                (c.accuracy - floor) * 10.0,
                c.accuracy >= best,
                busy / slots,
                busy < slots,
                r,
                r - closest,
                margin(c.key, 0.0) * inv,
                1.0,
            )
        )
    x = np.array(flat, dtype=np.float64).reshape(-1, N_FEATURES)
    np.clip(x, LOW, HIGH, out=x)
    return x, late
