"""Routing policies by name."""

from __future__ import annotations

import numpy as np

from apdispatch.policies.base import Candidate, Feedback, Policy, RequestView
from apdispatch.policies.static import (
    ClosestPolicy,
    FastestPolicy,
    LeastLoadedPolicy,
    MostAccuratePolicy,
    PowerOfTwoChoicesPolicy,
    RandomPolicy,
    RoundRobinPolicy,
)

STATIC_POLICIES: tuple[str, ...] = (
    "random",
    "round-robin",
    "closest",
    "fastest",
    "most-accurate",
    "least-loaded",
    "p2c",
)

__all__ = [
    "STATIC_POLICIES",
    "Candidate",
    "Feedback",
    "Policy",
    "RequestView",
    "make_policy",
    "policy_names",
]


def policy_names() -> tuple[str, ...]:
    return STATIC_POLICIES


def make_policy(name: str, seed: int = 0) -> Policy:
    """A fresh policy; randomised ones draw from their own seeded generator."""
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
    raise KeyError(f"unknown policy {name!r} (known: {', '.join(policy_names())})")
