"""The fault schedule of a chaos run, drawn up front from one seed.

Five kinds of fault, each followed by a recovery the tool performs itself:

- ``worker-kill``: SIGKILL a worker, restart it on the same address after ``hold_s``;
- ``worker-term``: SIGTERM a worker (it drains and exits), restart it after ``hold_s``;
- ``worker-stop``: SIGSTOP a worker (frozen, its sockets open), SIGCONT after ``hold_s``;
- ``ap-term``: SIGTERM the AP (it drains and exits), start a new one on the same address
  after ``hold_s``;
- ``ap-kill``: SIGKILL the AP, start a new one after ``hold_s``.

Faults run one at a time: the next is injected at its planned time, or once the
previous one has recovered, whichever is later (a fault that finds the system
already broken measures nothing of its own).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from apdispatch.common.choices import choose

WORKER_KILL: Final = "worker-kill"
WORKER_TERM: Final = "worker-term"
WORKER_STOP: Final = "worker-stop"
AP_TERM: Final = "ap-term"
AP_KILL: Final = "ap-kill"
FAULT_KINDS: Final = (WORKER_KILL, WORKER_TERM, WORKER_STOP, AP_TERM, AP_KILL)
AP_TARGET: Final = "ap"

# Seconds a worker stays down or frozen, and the AP stays down, drawn uniformly.
WORKER_HOLD_S: Final = (0.5, 2.0)
AP_HOLD_S: Final = (0.0, 0.5)


class FaultError(ValueError):
    """A fault schedule that cannot be drawn (unknown kind, no worker to hit)."""


@dataclass(frozen=True, slots=True)
class Fault:
    index: int  # from 1
    kind: str
    target: str  # a worker id, or "ap"
    at_s: float  # planned injection time, seconds after the load starts
    hold_s: float  # down or frozen for this long before the recovery starts

    @property
    def on_ap(self) -> bool:
        return self.target == AP_TARGET

    def describe(self) -> str:
        return f"{self.kind} {self.target}"


def parse_kinds(text: str) -> tuple[str, ...]:
    """``--faults``: fault kinds or ``all``, comma-separated (``common.choices.choose``)."""
    try:
        return tuple(choose(text, FAULT_KINDS, option="--faults", what="fault", groups={"all": FAULT_KINDS}))
    except ValueError as exc:
        raise FaultError(str(exc)) from None


def plan_faults(
    kinds: Sequence[str],
    workers: Sequence[str],
    *,
    duration_s: float,
    seed: int,
    mean_gap_s: float,
    first_at_s: float,
    end_margin_s: float,
) -> list[Fault]:
    """The faults of a run of ``duration_s`` seconds of load, in order.

    The first ``len(kinds)`` faults are a seeded permutation of ``kinds``, so that a run
    long enough for that many has every kind at least once; later kinds are drawn
    uniformly. Gaps between one fault's recovery and the next are drawn from
    ``mean_gap_s * U(0.5, 1.5)``; no fault is planned after ``duration_s - end_margin_s``.
    """
    if not kinds:
        raise FaultError("no fault kind given")
    if any(k.startswith("worker-") for k in kinds) and not workers:
        raise FaultError("worker faults need at least one worker")
    rng = random.Random(seed)
    order = list(kinds)
    rng.shuffle(order)
    faults: list[Fault] = []
    at = first_at_s
    while at <= duration_s - end_margin_s:
        kind = order[len(faults)] if len(faults) < len(order) else rng.choice(list(kinds))
        if kind.startswith("worker-"):
            target = rng.choice(list(workers))
            hold = rng.uniform(*WORKER_HOLD_S)
        else:
            target = AP_TARGET
            hold = rng.uniform(*AP_HOLD_S)
        faults.append(Fault(len(faults) + 1, kind, target, round(at, 3), round(hold, 3)))
        at += hold + mean_gap_s * rng.uniform(0.5, 1.5)
    return faults
