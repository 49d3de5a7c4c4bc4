"""Per-candidate features, normalised so that one network scores any candidate set.

Every feature is a ratio or a bounded count: times are divided by the time
left until the request's deadline, load by the worker's slots, accuracy is a
margin over the request's floor. A shared network scores each candidate from
its own row, so the action space is whatever candidate set a request has:
any number of clusters, workers, variants and apps.

``Margins`` adds what the estimator's mean prediction misses: per target, a
running mean and spread of (observed latency - predicted latency) over the
replies to the policy's own decisions, kept as one safety margin (mean +
``GuardConfig.spread`` sd). Network jitter, interference from requests that arrived later, a
batching delay: whatever makes a target's replies come later than predicted,
or less predictably, shows up there, online, in the AP and the simulator
alike. The moments are saved in a learned policy's checkpoint (``state``,
``load``): an AP that restarts keeps what it learned of its targets.

The hot path builds the rows in plain Python floats and converts them with
one ``np.array`` call: for 4-16 candidates that is cheaper than a dozen
vectorised numpy calls on tiny arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import erfc, isfinite, sqrt

import numpy as np
from scipy.special import stdtrit

from apdispatch.learned.guard_config import GuardConfig
from apdispatch.routing.policy import Candidate, RequestView

DEFAULT_GUARDS = GuardConfig()

FEATURES: tuple[str, ...] = (
    "slack",  # (deadline_left - predicted) / deadline_left: > 0 is predicted in time
    "behind_fastest",  # (predicted - fastest predicted) / deadline_left: 0 for the fastest
    "accuracy_margin",  # (accuracy - min_accuracy) * 10: 1 = ten points above the floor
    "most_accurate",  # 1 for the most accurate candidates of the set
    "load",  # in_flight / slots
    "free_slot",  # 1 when a slot is free (the request would not queue)
    "rtt",  # rtt / deadline_left
    "behind_closest",  # (rtt - smallest rtt) / deadline_left: 0 for the closest
    "bias",  # constant 1: the first layer's bias lives in its weights
)
N_FEATURES = len(FEATURES)

# Clipping keeps an odd candidate (a queue of 50, a deadline nearly gone)
# inside the range the network was trained on.
LOW = np.array([-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
HIGH = np.array([1.0, 2.0, 1.0, 1.0, 4.0, 1.0, 2.0, 2.0, 1.0])
LOW.flags.writeable = False
HIGH.flags.writeable = False

# The safety margin covers ``GuardConfig.spread`` sd of a target's lateness.
# The mean corrects the estimator's bias; the spread trades a target's own
# late replies against the load it then pushes onto the targets it is
# trusted less than (more than 1 sd is too cautious on a jittery network).
#
# The risk guard's wider margin (``risk_spread`` sd) is estimated from the
# target's own replies, and from a few of them it comes out too small, which
# makes a little-known target look safer than a well-known one. So its sd
# become the same one-sided quantile of Student's t with n - 1 degrees of
# freedom, for a target known from n replies (at 2 sd: x2.26 at 3, x1.32 at
# 6, x1.03 at 40, x1.003 at 400, and exactly 1 from ``small_sample_max``).
# Below 3 replies the spread is left as it is (t with 1 df is 7x wider): a
# new target must be tried to be known.


def small_sample_factors(risk_spread: float, small_sample_max: int) -> tuple[float, ...]:
    """Per replies seen, below ``small_sample_max``: t_{n-1} at the quantile of ``risk_spread`` sd, / it."""
    quantile = 1.0 - 0.5 * erfc(risk_spread / sqrt(2.0))
    t = stdtrit(np.arange(2, small_sample_max - 1), quantile) / risk_spread
    return (1.0, 1.0, 1.0, *[float(q) for q in t])


SQRT2 = sqrt(2.0)
INF = float("inf")

# Below this the deadline is as good as gone; avoids dividing by ~0.
MIN_DEADLINE_MS = 1e-3


def _margin(mean: float, sq: float, spread: float) -> float:
    """mean + ``spread`` sd of the residuals, never below 0, from their first two moments."""
    return max(0.0, mean + spread * sqrt(max(0.0, sq - mean * mean)))


class Margins:
    """Per target key: how much later than predicted its replies come (mean + ``spread`` sd, >= 0).

    Updated from every feedback (O(1)); read by the features with one dict
    lookup per candidate. A late reply counts with the latency the AP saw
    (about the deadline): a lower bound, which still widens the margin.
    """

    __slots__ = ("_alpha", "_moments", "_risk_spread", "_small", "_spread", "frozen", "margin", "risk")

    def __init__(self, config: GuardConfig = DEFAULT_GUARDS) -> None:
        self._alpha = config.margin_alpha
        self._spread = config.spread
        self._risk_spread = config.risk_spread
        self._small = small_sample_factors(config.risk_spread, config.small_sample_max)
        # Per key: [mean residual, mean squared residual, replies seen].
        self._moments: dict[str, list[float]] = {}
        self.margin: dict[str, float] = {}
        self.risk: dict[str, float] = {}  # the wider margin: mean + risk_spread() sd
        self.frozen = False  # ``freeze``: the margins stay as they are

    def freeze(self) -> None:
        """Learn nothing more: every margin stays as it is now."""
        self.frozen = True

    def observe(self, key: str, predicted_ms: float, latency_ms: float) -> None:
        if self.frozen:
            return
        residual = latency_ms - predicted_ms
        m = self._moments.get(key)
        if m is None:
            # The first residual seeds the mean; the spread starts at zero.
            m = self._moments[key] = [residual, residual * residual, 1.0]
        else:
            # A plain average over the first 1 / alpha replies, then an
            # exponential one. With alpha from the start, the first reply
            # would keep 0.95^(n-1) of the weight (44 % after 17), and one
            # cold start's outlier would hold a target's margin for good.
            m[2] += 1.0
            a = max(self._alpha, 1.0 / m[2])
            m[0] += a * (residual - m[0])
            m[1] += a * (residual * residual - m[1])
        self.margin[key] = _margin(m[0], m[1], self._spread)
        self.risk[key] = _margin(m[0], m[1], self.risk_spread(m[2]))

    def state(self) -> dict[str, dict[str, float]]:
        """Per key, the moments as JSON-ready numbers (for a checkpoint).

        Safe beside ``observe`` in another thread (the AP saves from one):
        the items are copied and each key's moments unpacked in single
        operations the GIL does not split.
        """
        out: dict[str, dict[str, float]] = {}
        for key, m in list(self._moments.items()):
            mean, sq, replies = m
            out[key] = {"mean_ms": mean, "mean_sq_ms2": sq, "replies": int(replies)}
        return out

    def load(self, state: dict[str, dict[str, float]]) -> None:
        """Take up the moments of ``state`` (from ``state()``); its keys replace those known.

        Keys of targets this deployment does not have are kept and never read:
        a target that registers later under that key starts from them.
        """
        for key, s in state.items():
            mean, sq, replies = float(s["mean_ms"]), float(s["mean_sq_ms2"]), float(s["replies"])
            if not (isfinite(mean) and isfinite(sq) and replies >= 1):
                raise ValueError(f"margins of {key!r}: {s}")
            self._moments[key] = [mean, sq, replies]
            self.margin[key] = _margin(mean, sq, self._spread)
            self.risk[key] = _margin(mean, sq, self.risk_spread(replies))

    def risk_spread(self, replies: float) -> float:
        """The wider margin's spread, in sd, for a target known from ``replies`` replies."""
        n = int(replies)
        small = self._small
        return self._risk_spread * small[n] if n < len(small) else self._risk_spread

    def late_chance(self, key: str, predicted_ms: float, deadline_ms: float) -> float:
        """The chance that a reply of ``key`` predicted at ``predicted_ms`` comes past the deadline.

        From a normal fit of the residuals; a target with no replies yet, or
        no spread, is late exactly when its corrected prediction is.
        """
        m = self._moments.get(key)
        mean, sq = (0.0, 0.0) if m is None else (m[0], m[1])
        sd = sqrt(max(0.0, sq - mean * mean))
        slack = deadline_ms - predicted_ms - mean
        if sd <= 0.0:
            return 0.0 if slack >= 0.0 else 1.0
        return 0.5 * erfc(slack / (sd * SQRT2))

    def replies(self, key: str) -> int:
        """How many replies the margin of ``key`` was learned from (0: none yet)."""
        m = self._moments.get(key)
        return 0 if m is None else int(m[2])


def candidate_features(
    request: RequestView, candidates: Sequence[Candidate], rows: Sequence[int] | None = None
) -> np.ndarray:
    """Rows of ``FEATURES`` for the candidates at ``rows`` (all when None): a fresh float64 array.

    ``behind_fastest``, ``most_accurate`` and ``behind_closest`` compare a
    candidate with the whole set, whichever rows are asked for: the policy
    builds rows only for the candidates its masks leave open (the learner
    never reads the others), and they must read as in the whole set.
    """
    inv = 1.0 / max(request.deadline_ms, MIN_DEADLINE_MS)
    floor = request.min_accuracy
    fastest = closest = INF
    best = -INF
    for c in candidates:
        p = c.predicted_ms
        if p < fastest:
            fastest = p
        r = c.rtt_ms
        if r < closest:
            closest = r
        a = c.accuracy
        if a > best:
            best = a
    fastest *= inv
    closest *= inv
    flat: list[float] = []
    extend = flat.extend
    # Clipped to [LOW, HIGH] here, row by row: for the few rows a decision
    # builds, a comparison per bounded value costs less than two ufuncs.
    # The lower bounds the others meet by construction (predictions, round
    # trips and queues are >= 0) are not tested again. A candidate is
    # unpacked once: cheaper than eight attribute reads.
    for k in range(len(candidates)) if rows is None else rows:
        _, _, _, _, accuracy, rtt, in_flight, slots, predicted, _ = candidates[k]
        p = predicted * inv
        slack = 1.0 - p
        behind = p - fastest
        margin = (accuracy - floor) * 10.0
        load = in_flight / slots
        r = rtt * inv
        far = r - closest
        extend(
            (
                slack if slack > -1.0 else -1.0,
                behind if behind < 2.0 else 2.0,
                (margin if margin < 1.0 else 1.0) if margin > 0.0 else 0.0,
                accuracy >= best,
                load if load < 4.0 else 4.0,
                in_flight < slots,
                r if r < 2.0 else 2.0,
                far if far < 2.0 else 2.0,
                1.0,
            )
        )
    x = np.array(flat, dtype=np.float64).reshape(-1, N_FEATURES)
    return x
