"""Cascades: a light variant answers first, and an accurate one only when the light one is unsure.

For a request whose accuracy floor no edge variant reaches on average, a
variant with a calibrated acceptance threshold for that floor
(``Variant.acceptance``, announced at registration) can still answer the
inputs it is confident on: its answers above the threshold reach the floor.
A cascade sends the request there first, accepts the answer when its
confidence clears the threshold, and otherwise escalates it to a target that
meets the floor on its own (the soonest predicted, when the escalation is
sent).

``cascade_candidates`` offers one cascade per such first target, planned only
when both steps fit the deadline (predicted first step plus predicted
escalation); the policy sees each as an ordinary candidate whose prediction
is the first step plus the escalation weighted by its rate, and whose
accuracy is the floor. ``EscalationRates`` learns, per (variant, floor), the
share of first answers escalated, starting from the calibration's
(1 - coverage).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from apdispatch.common.confidence import Acceptance, acceptance_for
from apdispatch.routing.estimator import LatencyEstimator
from apdispatch.routing.policy import Candidate, RequestView
from apdispatch.routing.registry import Target

_new = tuple.__new__  # Candidate(...) without its Python-level constructor (see router.py)


@dataclass(frozen=True, slots=True)
class CascadeConfig:
    """Whether the router offers cascades, and how fast it learns their escalation rates."""

    enabled: bool = False
    # Weight of one first answer in its (variant, floor) escalation rate: about the
    # last 1 / rate_alpha answers count.
    rate_alpha: float = 0.02

    def __post_init__(self) -> None:
        if not 0.0 < self.rate_alpha <= 1.0:
            raise ValueError(f"cascade rate_alpha: must be in (0, 1], got {self.rate_alpha}")


@dataclass(frozen=True, slots=True)
class Cascade:
    """Send to ``first``; accept its answer at ``acceptance.threshold`` or more, else escalate."""

    first: Target
    acceptance: Acceptance  # the first variant's entry for the request's floor
    planned_escalation: Target  # the accurate target the plan counted on


class EscalationRates:
    """Per (variant, floor), the share of first answers escalated: an average from the calibrated rate."""

    def __init__(self, alpha: float) -> None:
        self._alpha = alpha
        self._rates: dict[tuple[str, float], float] = {}

    def rate(self, variant: str, entry: Acceptance) -> float:
        return self._rates.get((variant, entry.floor), 1.0 - entry.coverage)

    def observe(self, variant: str, entry: Acceptance, escalated: bool) -> None:
        r = self.rate(variant, entry)
        self._rates[(variant, entry.floor)] = r + self._alpha * ((1.0 if escalated else 0.0) - r)


def cascade_candidates(
    view: RequestView,
    targets: Sequence[Target],
    accurate: Sequence[Candidate],
    estimator: LatencyEstimator,
    rates: EscalationRates,
) -> list[Candidate]:
    """The cascades a request may take, beside its ``accurate`` candidates (as ``build_candidates`` gives).

    None when an edge target meets the floor on its own, or nothing does (nowhere to escalate to).
    """
    if not accurate or any(c.ref.worker.kind == "edge" for c in accurate):  # type: ignore[attr-defined]
        return []
    floor = view.min_accuracy
    fallback = min(accurate, key=lambda c: c.predicted_ms)
    escalation_ms = fallback.predicted_ms
    out: list[Candidate] = []
    for t in targets:
        variant = t.variant
        if variant.accuracy >= floor or not variant.acceptance:
            continue
        entry = acceptance_for(variant.acceptance, floor)
        if entry is None:
            continue
        first_ms = estimator.predict(t, None, view.now_s)
        if first_ms + escalation_ms > view.deadline_ms:
            continue  # no time for both steps: only the accurate targets, as without cascades
        worker = t.worker
        expected_ms = first_ms + rates.rate(variant.name, entry) * escalation_ms
        plan = Cascade(t, entry, fallback.ref)  # type: ignore[arg-type]
        out.append(
            _new(
                Candidate,
                (
                    f"{t.key}>{fallback.key}",
                    worker.worker_id,
                    worker.cluster,
                    variant.name,
                    entry.floor,
                    estimator.network_ms(worker),
                    worker.in_flight,
                    worker.slots,
                    expected_ms,
                    plan,
                ),
            )
        )
    return out
