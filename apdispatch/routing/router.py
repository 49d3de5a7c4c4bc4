"""The routing decision, shared word for word by the live AP and the simulator.

One :class:`Router` holds the policy and the latency estimator. Per request:

1. :meth:`Router.decide` builds the candidates (every target of the task whose
   variant reaches the request's ``min_accuracy``, each with the estimator's
   view of it now), admits or rejects the request (``RejectedError`` when no
   variant is accurate enough, or when every predicted completion is past the
   deadline), lets the policy choose, and counts the request in flight on the
   chosen worker.
2. When the reply (or the deadline, or an error) comes back:
   :meth:`Router.release` takes it off the worker's in-flight count,
   :meth:`Router.learn` feeds a served reply's timings to the estimator and
   :meth:`Router.observe` tells the policy what became of its choice.

A request that admission rejects never reaches the policy's ``choose``; its
``rejected`` hook is told of it (ASET's reward is a window's success over
every request, rejected ones included).

``apdispatch.ap.dispatcher`` (the live AP) and ``apdispatch.sim`` (the simulator)
both drive a ``Registry``'s targets through these calls and nothing else, so a
policy, and the estimator, cannot tell which of the two runs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from apdispatch.common.errors import RejectedError
from apdispatch.routing.cascade import Cascade, CascadeConfig, EscalationRates, cascade_candidates
from apdispatch.routing.estimator import LatencyEstimator
from apdispatch.routing.policy import Candidate, Feedback, Policy, RequestView
from apdispatch.routing.registry import Target

# Builds a named tuple from its fields in order, without the Python-level
# call of ``Candidate(...)``, which costs more than the tuple on the hot path.
_new = tuple.__new__


@dataclass(slots=True, eq=False)
class Decision:
    """One admitted request's routing: what the policy saw and chose."""

    view: RequestView
    chosen: Candidate
    target: Target
    in_flight_at_dispatch: int  # requests the worker had in flight before this one
    cascade: Cascade | None = None  # the plan when ``target`` is a cascade's first step


def build_candidates(
    targets: Sequence[Target], min_accuracy: float, estimator: LatencyEstimator, now_s: float | None = None
) -> list[Candidate]:
    """Every target accurate enough, as a policy sees it now."""
    network_ms = estimator.network_ms
    predict = estimator.predict
    return [
        _new(
            Candidate,
            (
                t.key,  # key
                t.worker.worker_id,  # worker
                t.worker.cluster,  # cluster
                t.variant.name,  # variant
                t.variant.accuracy,  # accuracy
                network_ms(t.worker),  # rtt_ms
                t.worker.in_flight,  # in_flight
                t.worker.slots,  # slots
                predict(t, None, now_s),  # predicted_ms
                t,  # ref
            ),
        )
        for t in targets
        if t.variant.accuracy >= min_accuracy
    ]


def admit(view: RequestView, targets: Sequence[Target], candidates: Sequence[Candidate]) -> None:
    """Reject at once when no target can meet the SLA."""
    if not candidates:
        best = max(t.variant.accuracy for t in targets)
        raise RejectedError(
            f"sla.min_accuracy: no variant of {view.task!r} reaches {view.min_accuracy:g} (best {best:.4f})"
        )
    deadline_ms = view.deadline_ms
    for c in candidates:
        if c.predicted_ms <= deadline_ms:
            return  # one is enough: the request is admitted
    fastest = min([c.predicted_ms for c in candidates])
    raise RejectedError(
        f"sla.deadline_ms: every predicted completion is past the deadline "
        f"(fastest {fastest:.2f} ms, {deadline_ms:.2f} ms left)"
    )


class Router:
    """Admission, choice and feedback around one policy and one estimator."""

    __slots__ = ("_policy", "cascade", "escalations", "estimator")

    def __init__(
        self, policy: Policy, estimator: LatencyEstimator, cascade: CascadeConfig | None = None
    ) -> None:
        self.policy = policy
        self.estimator = estimator
        self.cascade = cascade or CascadeConfig()
        self.escalations = EscalationRates(self.cascade.rate_alpha)

    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self._policy = policy

    def decide(self, view: RequestView, targets: Sequence[Target]) -> Decision:
        """Admit and route one request, or raise ``RejectedError`` (told to the policy's ``rejected``).

        The chosen worker counts the request in flight from here on; every
        decision must be released exactly once.
        """
        candidates = build_candidates(targets, view.min_accuracy, self.estimator, view.now_s)
        if self.cascade.enabled:
            # After the plain ones: the learned policy's guards look for cascades at the end.
            candidates += cascade_candidates(view, targets, candidates, self.estimator, self.escalations)
        try:
            admit(view, targets, candidates)
        except RejectedError:
            self._policy.rejected(view)
            raise
        chosen = self._policy.choose(view, candidates)
        plan = chosen.ref
        if isinstance(plan, Cascade):
            return self._dispatch(view, chosen, plan.first, plan)
        return self._dispatch(view, chosen, plan)  # type: ignore[arg-type]

    def _dispatch(
        self, view: RequestView, chosen: Candidate, target: Target, cascade: Cascade | None = None
    ) -> Decision:
        worker = target.worker
        decision = Decision(view, chosen, target, worker.in_flight, cascade)
        self.estimator.dispatched(target, view.now_s)
        worker.in_flight += 1
        return decision

    def accepted(self, decision: Decision, confidence: float) -> bool:
        """A cascade's first answer is back: whether it is kept (else the caller escalates).

        Counts towards the (variant, floor) escalation rate.
        """
        plan = decision.cascade
        assert plan is not None, "not a cascade"
        keep = confidence >= plan.acceptance.threshold
        self.escalations.observe(plan.first.variant.name, plan.acceptance, not keep)
        return keep

    def escalate(self, decision: Decision, targets: Sequence[Target], now_s: float) -> Decision:
        """The second step of a cascade whose first answer was not kept: the soonest accurate target now.

        The returned decision is in flight and must be released; feedback to the
        policy stays with the first (``observe(decision, ...)``), whose choice it was.
        """
        view = decision.view
        candidates = build_candidates(targets, view.min_accuracy, self.estimator, now_s)
        if not candidates:
            assert decision.cascade is not None
            target = decision.cascade.planned_escalation  # it left the registry: the plan's, if it answers
            return self._dispatch(view, decision.chosen, target)
        chosen = min(candidates, key=lambda c: c.predicted_ms)
        return self._dispatch(view, chosen, chosen.ref)  # type: ignore[arg-type]

    @staticmethod
    def release(decision: Decision) -> None:
        """The request is no longer in flight (answered, failed, or past its deadline)."""
        decision.target.worker.in_flight -= 1

    def learn(self, decision: Decision, network_ms: float, compute_ms: float) -> None:
        """A served reply's timings: the estimator's only input."""
        self.estimator.observe(decision.target, decision.in_flight_at_dispatch, network_ms, compute_ms)

    def observe(self, decision: Decision, outcome: str, latency_ms: float) -> None:
        """Tell the policy the outcome of its choice (never for rejections: it made none)."""
        self._policy.observe(_new(Feedback, (decision.view, decision.chosen, outcome, latency_ms)))
