"""Routing policies by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

# Trained policies (apdispatch/policies/learned): they import torch for their
# learner, so they are built only when asked for.
LEARNED_POLICIES: tuple[str, ...] = ("aset", "actor-critic", "learned")

__all__ = [
    "LEARNED_POLICIES",
    "STATIC_POLICIES",
    "Candidate",
    "Feedback",
    "Policy",
    "RequestView",
    "make_policy",
    "policy_names",
]


def policy_names() -> tuple[str, ...]:
    return STATIC_POLICIES + LEARNED_POLICIES


def make_policy(
    name: str,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    *,
    background: bool | str = True,
    **options: Any,
) -> Policy:
    """A fresh policy; randomised ones draw from their own seeded generator.

    Learned policies start from ``checkpoint`` (default: the shipped one) and
    keep learning; ``background=False`` runs their updates inline instead of
    in a background process or thread (reproducible simulations). ``options`` go to learned
    policies only (e.g. ``explore=False``, ``learn=False``).
    """
    if name in LEARNED_POLICIES:
        from apdispatch.policies.learned import make_learned_policy

        return make_learned_policy(name, seed, checkpoint, background=background, **options)
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
