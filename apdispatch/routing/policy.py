"""The one policy interface, shared by the live AP and the simulator.

A policy sees a request (its task, app and SLA) and the candidates: every
target able to serve the task with at least the requested accuracy, each with
what the AP (or the simulator) knows of it now. It returns one of them. It
never knows which of the two drives it. Admission (rejecting when no
candidate is predicted to meet the deadline) happens before a policy runs.

``RequestView``, ``Candidate`` and ``Feedback`` are named tuples: immutable
values, built on the hot path for every request (a candidate for every
eligible target of every request), where a named tuple costs a third of what
a frozen dataclass does to build. Each request gets its own ``RequestView``
object, and its ``Feedback`` carries that very object back.

``RequestView.now_s`` is the driver's clock (seconds, ``time.monotonic()`` in
the live AP, simulated time in the simulator): a policy that needs time (ASET's
windows) reads it there, so that it keeps the simulator's runs reproducible
and never asks the wall clock itself. It comes last, with a default, so that
views built by hand (tests, benches) need not name it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, NamedTuple

from apdispatch.common.outcomes import Outcome


class RequestView(NamedTuple):
    task: str
    app: str
    deadline_ms: float  # time left until the deadline, at the decision
    min_accuracy: float
    now_s: float = 0.0  # the driver's clock at the decision, seconds (only differences mean anything)


class Candidate(NamedTuple):
    """One target as seen at decision time. ``ref`` is opaque to policies."""

    key: str  # "<cluster>/<worker>/<variant>", stable across decisions
    worker: str
    cluster: str
    variant: str
    accuracy: float
    rtt_ms: float  # estimated network round trip
    in_flight: int  # requests sent to the worker and not yet answered
    slots: int
    predicted_ms: float  # estimated completion if this request went there now
    ref: object = None


class Feedback(NamedTuple):
    """What became of one decision."""

    request: RequestView
    chosen: Candidate
    outcome: Outcome  # ok, late, inaccurate or failed: what became of the decision
    latency_ms: float


class Policy(ABC):
    """Base class of every routing policy.

    A subclass implements ``choose``; the hooks below do nothing by default, so
    drivers (the AP, the simulator, the benches) call them on any policy.
    """

    name: str = "policy"
    # Whether the policy learns online and has parameters worth checkpointing.
    learns: ClassVar[bool] = False

    @abstractmethod
    def choose(self, request: RequestView, candidates: Sequence[Candidate]) -> Candidate:
        """Pick one of ``candidates`` (never empty)."""

    def observe(self, feedback: Feedback) -> None:  # noqa: B027 (a hook: doing nothing is its default)
        """Learn from an outcome. Must be cheap: it runs after every reply."""

    def rejected(self, request: RequestView) -> None:  # noqa: B027
        """Told of every request that admission rejected before the policy could choose.

        Its outcomes alone would hide those: a window where admission turned away
        half the requests would look as good as its admitted half.
        """

    def telemetry(self) -> dict[str, float]:
        """A learning policy's state for monitoring (reward, updates, loss...); read-only, {} here."""
        return {}

    def save(self, path: Path | str) -> Path | None:
        """Write a checkpoint of the parameters to ``path``; None when there is nothing to save."""
        return None

    def close(self) -> None:  # noqa: B027
        """Stop whatever runs in the background (a learner); the policy decides no more after."""
