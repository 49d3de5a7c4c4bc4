"""Fixed routing rules (ASET's static policies)."""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

import numpy as np

from apdispatch.routing.policy import Candidate, Policy, RequestView


def _load(c: Candidate) -> float:
    return c.in_flight / c.slots


# Keys are called once per candidate per request: attrgetter is a C-level key,
# and the lambdas below inline _load rather than call it.
_predicted_ms = attrgetter("predicted_ms")


class StaticPolicy(Policy):
    """A fixed rule: it learns nothing and keeps no state worth saving."""

    name = "static"


class RandomPolicy(StaticPolicy):
    name = "random"

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng

    def choose(self, request: RequestView, candidates: Sequence[Candidate]) -> Candidate:
        return candidates[int(self._rng.integers(len(candidates)))]


class RoundRobinPolicy(StaticPolicy):
    """Cycles through the candidates of each task in turn."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def choose(self, request: RequestView, candidates: Sequence[Candidate]) -> Candidate:
        i = self._next.get(request.task, 0)
        self._next[request.task] = i + 1
        return candidates[i % len(candidates)]


class ClosestPolicy(StaticPolicy):
    """Lowest round trip; ties go to the less loaded."""

    name = "closest"

    def choose(self, request: RequestView, candidates: Sequence[Candidate]) -> Candidate:
        return min(candidates, key=lambda c: (c.rtt_ms, c.in_flight / c.slots))


class FastestPolicy(StaticPolicy):
    """Lowest predicted completion time."""

    name = "fastest"

    def choose(self, request: RequestView, candidates: Sequence[Candidate]) -> Candidate:
        return min(candidates, key=_predicted_ms)


class MostAccuratePolicy(StaticPolicy):
    """Highest accuracy; ties go to the faster."""

    name = "most-accurate"

    def choose(self, request: RequestView, candidates: Sequence[Candidate]) -> Candidate:
        return min(candidates, key=lambda c: (-c.accuracy, c.predicted_ms))


class LeastLoadedPolicy(StaticPolicy):
    """Fewest requests in flight per slot; ties go to the faster."""

    name = "least-loaded"

    def choose(self, request: RequestView, candidates: Sequence[Candidate]) -> Candidate:
        return min(candidates, key=lambda c: (c.in_flight / c.slots, c.predicted_ms))


class PowerOfTwoChoicesPolicy(StaticPolicy):
    """Two candidates at random, the less loaded of them."""

    name = "p2c"

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng

    def choose(self, request: RequestView, candidates: Sequence[Candidate]) -> Candidate:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        i = int(self._rng.integers(n))
        j = int(self._rng.integers(n - 1))
        j += j >= i
        a, b = candidates[i], candidates[j]
        return a if (_load(a), a.predicted_ms) <= (_load(b), b.predicted_ms) else b


STATIC_POLICIES: tuple[str, ...] = (
    "random",
    "round-robin",
    "closest",
    "fastest",
    "most-accurate",
    "least-loaded",
    "p2c",
)


def make_static_policy(name: str, seed: int = 0) -> Policy:
    """A fresh static policy; randomised ones draw from their own seeded generator."""
    rng = np.random.default_rng(seed)
    match name:
        case "random":
            return RandomPolicy(rng)
        case "round-robin":
            return RoundRobinPolicy()
        case "closest":
            return ClosestPolicy()
        case "fastest":
            return FastestPolicy()
        case "most-accurate":
            return MostAccuratePolicy()
        case "least-loaded":
            return LeastLoadedPolicy()
        case "p2c":
            return PowerOfTwoChoicesPolicy(rng)
    raise KeyError(f"unknown static policy {name!r} (known: {', '.join(STATIC_POLICIES)})")
