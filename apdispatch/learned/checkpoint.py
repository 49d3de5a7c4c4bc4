"""Checkpoints: a torch state_dict (``X.pt``) and a JSON config beside it (``X.json``).

No pickled Python objects: the ``.pt`` holds only tensors and is loaded with
``weights_only=True``; everything else (architecture, hyperparameters, how
it was trained) is JSON. Both files are written to a temporary name first and
renamed, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import torch

from apdispatch.routing.policy import Policy

CHECKPOINTS = Path(__file__).parent / "checkpoints"
SHIPPED = CHECKPOINTS / "learned.pt"
FORMAT = 1


class CheckpointError(ValueError):
    pass


def paths(path: Path | str) -> tuple[Path, Path]:
    """``(weights, config)`` for a checkpoint named by either file or by its stem."""
    p = Path(path)
    if p.suffix in (".pt", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".pt"), p.with_name(p.name + ".json")


def exists(path: Path | str) -> bool:
    weights, config = paths(path)
    return weights.is_file() and config.is_file()


def save_checkpoint(path: Path | str, state: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    weights, meta = paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp_w = weights.with_name(f".{weights.name}.{os.getpid()}.tmp")
    tmp_m = meta.with_name(f".{meta.name}.{os.getpid()}.tmp")
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp_w)
    tmp_m.write_text(json.dumps({"format": FORMAT, **config}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_w, weights)
    os.replace(tmp_m, meta)
    return weights


def load_checkpoint(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    weights, meta = paths(path)
    try:
        config = json.loads(meta.read_text())
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{weights}: {exc}") from exc
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{meta}: unknown format {config.get('format')!r}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{weights}: expected a state_dict of tensors")
    return state, config


class _Stoppable(Protocol):
    def close(self) -> None: ...


class CheckpointedPolicy(Policy):
    """What the learned policies share around their checkpoints: ``save``, and ``close`` with ``save_to``.

    A subclass says what to write: ``parameters()`` (the state_dict decisions
    use now) and ``config()`` (the JSON beside it).
    """

    learns = True
    learner: _Stoppable | None = None
    # Where ``close()`` writes the checkpoint: a simulated run's "shutdown".
    save_to: Path | str | None = None

    def parameters(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, path: Path | str) -> Path:
        return save_checkpoint(path, self.parameters(), self.config())

    def close(self) -> None:
        """Write the checkpoint when ``save_to`` is set, then stop the learner."""
        if self.save_to is not None:
            self.save(self.save_to)
            self.save_to = None
        if self.learner is not None:
            self.learner.close()
