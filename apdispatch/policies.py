"""Every routing policy by name: the static ones of ``routing``, the rules and the learned ones."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from apdispatch.common.choices import choose
from apdispatch.learned import LEARNED_POLICIES, RULE_POLICIES
from apdispatch.routing.policy import Candidate, Feedback, Policy, RequestView
from apdispatch.routing.static import STATIC_POLICIES, make_static_policy

__all__ = [
    "LEARNED_POLICIES",
    "RULE_POLICIES",
    "STATIC_POLICIES",
    "Candidate",
    "Feedback",
    "Policy",
    "RequestView",
    "make_policy",
    "policy_names",
    "resolve_policies",
]


def policy_names() -> tuple[str, ...]:
    return STATIC_POLICIES + RULE_POLICIES + LEARNED_POLICIES


def resolve_policies(text: str) -> list[str]:
    """``--policies``: names, ``all`` or ``static``, comma-separated (``common.choices.choose``)."""
    known = policy_names()
    return choose(
        text, known, option="--policies", what="policy", groups={"all": known, "static": STATIC_POLICIES}
    )


def make_policy(
    name: str,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    *,
    background: bool | str = True,
    resume_from: str | Path | None = None,
    guards: Mapping[str, Any] | None = None,
    **options: Any,
) -> Policy:
    """A fresh policy; randomised ones draw from their own seeded generator.

    Learned policies start from ``checkpoint`` (default: the shipped one) and
    keep learning; ``background=False`` runs their updates inline instead of
    in a background process or thread (reproducible simulations). ``options`` go to learned
    policies only (e.g. ``explore=False``, ``learn=False``). ``resume_from``: a
    deployment's own checkpoint, started from when it exists (static policies ignore it).
    ``guards``: ``GuardConfig`` fields to override, for the policies with guards or margins
    (the rules, ``actor-critic`` and ``learned``; a checkpoint's own come first).
    """
    if name in LEARNED_POLICIES:
        # Learned policies import torch for their learner: built only when asked for.
        from apdispatch.learned.checkpoint import exists
        from apdispatch.learned.factory import make_learned_policy

        if checkpoint is None and resume_from and exists(resume_from):
            checkpoint = resume_from
        if guards:
            options["guards"] = guards
        return make_learned_policy(name, seed, checkpoint, background=background, **options)
    if name in RULE_POLICIES:
        from apdispatch.learned.guard_config import GuardConfig
        from apdispatch.learned.slack import make_rule_policy

        return make_rule_policy(name, GuardConfig.from_json(guards))
    if name in STATIC_POLICIES:
        return make_static_policy(name, seed)
    raise KeyError(f"unknown policy {name!r} (known: {', '.join(policy_names())})")
