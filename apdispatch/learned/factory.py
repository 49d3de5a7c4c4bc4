"""Building a learned policy by name, from a checkpoint (the shipped one by default) or fresh."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from apdispatch.learned import LEARNED_POLICIES
from apdispatch.learned.checkpoint import (
    CHECKPOINTS,
    CheckpointedPolicy,
    CheckpointError,
    load_checkpoint,
)

if TYPE_CHECKING:
    import torch

    from apdispatch.learned.aset import AsetPolicy
    from apdispatch.learned.policy import ActorCriticPolicy

__all__ = [
    "checkpoint_kind",
    "default_checkpoint",
    "make_learned_policy",
    "uses_checkpoint",
]


def default_checkpoint(name: str) -> Path | None:
    """The shipped checkpoint a learned policy starts from when none is given."""
    path = CHECKPOINTS / f"{name}.pt"
    if name == "learned" or path.is_file():
        return path
    return None


def checkpoint_kind(path: Path | str) -> str | None:
    """The kind ("actor-critic" or "aset") of the checkpoint at ``path``, None when there is none."""
    from apdispatch.learned.checkpoint import exists

    if not exists(path):
        return None
    return str(load_checkpoint(path)[1].get("kind"))


def uses_checkpoint(name: str, kind: str | None) -> bool:
    """Whether policy ``name`` starts from (and saves to) a checkpoint of ``kind`` (None: none yet).

    A checkpoint that does not exist yet is ``learned``'s to create.
    """
    if kind is None:
        return name == "learned"
    return name == "learned" or name == kind


def make_learned_policy(
    name: str,
    seed: int = 0,
    checkpoint: Path | str | None = None,
    *,
    background: bool | str = True,
    learn: bool = True,
    fresh: bool = False,
    save_to: Path | str | None = None,
    guards: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> CheckpointedPolicy:
    """A learned policy, from ``checkpoint`` (or the shipped one), or fresh when there is none.

    ``fresh=True``: newly initialised weights, whatever is shipped (``train`` starts so).
    ``save_to``: ``close()`` writes the checkpoint there (a simulated run's "shutdown").
    ``background``: where the learner's updates run. True (the AP): in a
    process of their own for the actor-critic kinds (``process.py``), in a
    thread for ASET; ``"thread"``; False: inline, in ``observe``, so that a
    seeded simulation is reproducible. ``overrides`` replace config
    entries (``explore``, ``mask_late``, ``window_s``, ...) of a fresh or loaded policy;
    ``guards`` replaces fields of its ``GuardConfig`` (the checkpoint's, or the defaults).
    """
    if name not in LEARNED_POLICIES:
        raise KeyError(name)
    if fresh:
        if name == "learned":
            raise KeyError("a fresh policy is 'actor-critic' or 'aset'; 'learned' is what is shipped")
        path = None
    else:
        path = Path(checkpoint) if checkpoint is not None else default_checkpoint(name)
    state: dict[str, Any] | None = None
    meta: dict[str, Any] = {}
    if path is not None:
        state, meta = load_checkpoint(path)
    kind = meta.get("kind", "aset" if name == "aset" else "actor-critic")
    if name != "learned" and kind != name:
        raise CheckpointError(f"{path}: a {kind!r} checkpoint, not {name!r}")
    meta = {**meta, **overrides}
    if guards:
        meta["guards"] = {**(meta.get("guards") or {}), **guards}
    try:
        policy = _restore(name, kind, state, meta, seed=seed, background=background, learn=learn)
    except (KeyError, TypeError, ValueError) as exc:
        if path is None or isinstance(exc, CheckpointError):
            raise  # the caller's own arguments, or already said
        # A config entry of the wrong shape (or an override that does not fit it).
        raise CheckpointError(f"{path}: {type(exc).__name__}: {exc}") from exc
    policy.save_to = save_to
    return policy


class _Restorable(Protocol):
    updates: int
    samples: int

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def _resume(algo: _Restorable, state: dict[str, torch.Tensor] | None, meta: dict[str, Any]) -> None:
    """The parameters and counters of a checkpoint (none: a fresh start) into ``algo``."""
    if state is not None:
        algo.load_state_dict(state)
    algo.updates = int(meta.get("updates", 0))
    algo.samples = int(meta.get("samples", 0))


def _restore(
    name: str,
    kind: str,
    state: dict[str, torch.Tensor] | None,
    meta: dict[str, Any],
    *,
    seed: int,
    background: bool | str,
    learn: bool,
) -> AsetPolicy | ActorCriticPolicy:
    """The policy of ``kind`` from a checkpoint's ``state`` and config ``meta`` (with the overrides)."""
    if kind == "aset":
        from apdispatch.learned.aset import ACTIONS, AsetAlgo, AsetConfig, AsetPolicy
        from apdispatch.learned.guard_config import GuardConfig
        from apdispatch.learned.slack import RULE_POLICIES, make_rule_policy
        from apdispatch.routing.static import make_static_policy

        if meta.get("actions", list(ACTIONS)) != list(ACTIONS):
            raise ValueError(f"ASET actions {meta['actions']}, not {list(ACTIONS)}")
        aset_algo = AsetAlgo(AsetConfig.from_json(meta), seed=seed)
        _resume(aset_algo, state, meta)
        guards = GuardConfig.from_json(meta.get("guards"))
        statics = [
            make_rule_policy(a, guards) if a in RULE_POLICIES else make_static_policy(a, seed=seed)
            for a in ACTIONS
        ]
        return AsetPolicy(name, aset_algo, statics, seed=seed, background=background, learn=learn, meta=meta)
    if kind == "actor-critic":
        from apdispatch.learned.actor_critic import ActorCriticAlgo, ActorCriticConfig
        from apdispatch.learned.features import FEATURES
        from apdispatch.learned.policy import ActorCriticPolicy

        if meta.get("features", list(FEATURES)) != list(FEATURES):
            # A network scores feature rows by position: other features, other meaning.
            raise ValueError(f"features {meta['features']}, not {list(FEATURES)}")
        algo = ActorCriticAlgo(ActorCriticConfig.from_json(meta), seed=seed)
        _resume(algo, state, meta)
        from apdispatch.learned.guard_config import GuardConfig

        guard_config = GuardConfig.from_json(meta.get("guards"))
        policy = ActorCriticPolicy(
            name, algo, seed=seed, background=background, learn=learn, meta=meta, guards=guard_config
        )
        # What the AP learned of its targets before it stopped (checkpoints before these had none).
        policy.margins.load(meta.get("margins") or {})
        return policy
    raise ValueError(f"unknown kind {kind!r}")
