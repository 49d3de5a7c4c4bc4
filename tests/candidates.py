"""Candidate sets for hand cases: one variant's target on a worker of its own cluster."""

from __future__ import annotations

from apdispatch.routing.policy import Candidate


def candidate(
    worker: str,
    variant: str,
    *,
    rtt: float,
    predicted: float,
    slots: int = 1,
    in_flight: int = 0,
    accuracy: float = 0.95,
) -> Candidate:
    return Candidate(
        key=f"{worker}/{worker}/{variant}",
        worker=worker,
        cluster=worker,
        variant=variant,
        accuracy=accuracy,
        rtt_ms=rtt,
        in_flight=in_flight,
        slots=slots,
        predicted_ms=predicted,
    )
