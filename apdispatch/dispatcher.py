"""The data plane: check, admit, decide, forward, classify. One outcome per request.

``Dispatcher.infer`` either returns a reply (ok, late, inaccurate) or raises an
ApdispatchError (rejected, invalid, not found, failed); in both cases the
outcome has been counted exactly once.
"""

from __future__ import annotations

import itertools
import time

import structlog

from apdispatch.config import APConfig
from apdispatch.errors import ApdispatchError, RejectedError, UnavailableError
from apdispatch.estimator import LatencyEstimator
from apdispatch.forwarder import DeadlineReached, Forwarder
from apdispatch.metrics import Stats
from apdispatch.policies import Candidate, Feedback, Policy, RequestView
from apdispatch.protocol import dispatcher_pb2 as pb
from apdispatch.protocol import oip_pb2
from apdispatch.registry import Registry, Target
from apdispatch.validate import check_request

OUTCOME_PB = {
    "ok": pb.OK,
    "late": pb.LATE,
    "inaccurate": pb.INACCURATE,
    "rejected": pb.REJECTED,
    "failed": pb.FAILED,
}


def _double(params: object, key: str) -> float:
    value = params.get(key)  # type: ignore[attr-defined]
    return float(value.double_param) if value is not None else 0.0


class Dispatcher:
    def __init__(
        self,
        config: APConfig,
        registry: Registry,
        estimator: LatencyEstimator,
        policy: Policy,
        forwarder: Forwarder,
        stats: Stats,
        log: structlog.typing.FilteringBoundLogger,
        debug: bool = False,
    ) -> None:
        self.config = config
        self.registry = registry
        self.estimator = estimator
        self.policy = policy
        self.forwarder = forwarder
        self.stats = stats
        self._log = log
        self._debug = debug
        self._ids = itertools.count(1)
        self._late_grace_s = config.late_grace_ms / 1000.0

    async def infer(self, request: pb.InferRequest, arrival: float) -> pb.InferResponse:
        request_id = request.request_id or f"ap-{next(self._ids)}"
        try:
            return await self._infer(request, request_id, arrival)
        except ApdispatchError as exc:
            exc.request_id = request_id
            outcome = "rejected" if isinstance(exc, RejectedError) else "failed"
            self._finish(outcome, request, request_id, arrival, None, error=exc.message)
            raise

    async def _infer(self, request: pb.InferRequest, request_id: str, arrival: float) -> pb.InferResponse:
        checked = check_request(request, self.registry, self.config.max_tensor_bytes)
        # The deadline counts from arrival at the AP; time spent here so far is gone.
        left_ms = checked.deadline_ms - (time.monotonic() - arrival) * 1000.0
        view = RequestView(checked.task, request.app, left_ms, checked.min_accuracy)
        candidates = self._candidates(checked.targets, checked.min_accuracy)
        self._admit(view, checked.targets, candidates)
        chosen = self.policy.choose(view, candidates)
        target: Target = chosen.ref  # type: ignore[assignment]
        return await self._forward(request, request_id, arrival, view, chosen, target)

    def _candidates(self, targets: list[Target], min_accuracy: float) -> list[Candidate]:
        estimator = self.estimator
        return [
            Candidate(
                key=t.key,
                worker=t.worker.worker_id,
                cluster=t.worker.cluster,
                variant=t.variant.name,
                accuracy=t.variant.accuracy,
                rtt_ms=estimator.network_ms(t.worker),
                in_flight=t.worker.in_flight,
                slots=t.worker.slots,
                predicted_ms=estimator.predict(t),
                ref=t,
            )
            for t in targets
            if t.variant.accuracy >= min_accuracy
        ]

    @staticmethod
    def _admit(view: RequestView, targets: list[Target], candidates: list[Candidate]) -> None:
        """Reject at once when no target can meet the SLA."""
        if not candidates:
            best = max(t.variant.accuracy for t in targets)
            raise RejectedError(
                f"sla.min_accuracy: no variant of {view.task!r} reaches {view.min_accuracy:g} "
                f"(best {best:.4f})"
            )
        fastest = min(c.predicted_ms for c in candidates)
        if fastest > view.deadline_ms:
            raise RejectedError(
                f"sla.deadline_ms: every predicted completion is past the deadline "
                f"(fastest {fastest:.2f} ms, {view.deadline_ms:.2f} ms left)"
            )

    async def _forward(
        self,
        request: pb.InferRequest,
        request_id: str,
        arrival: float,
        view: RequestView,
        chosen: Candidate,
        target: Target,
    ) -> pb.InferResponse:
        worker = target.worker
        forward = oip_pb2.ModelInferRequest(model_name=target.variant.name)
        for tensor, spec in zip(request.inputs, target.variant.inputs, strict=True):
            forward.inputs.add(name=spec.name, datatype=tensor.datatype, shape=tensor.shape)
            forward.raw_input_contents.append(tensor.data)
        link = self.forwarder.link(worker.address, worker.streaming)
        in_flight = worker.in_flight
        worker.in_flight = in_flight + 1
        sent = time.monotonic()
        timeout_s = max(1e-4, view.deadline_ms / 1000.0 - (sent - arrival) + self._late_grace_s)
        try:
            reply = await link.infer(forward, timeout_s)
        except DeadlineReached:
            self._feedback(view, chosen, "late", arrival)
            return self._finish("late", request, request_id, arrival, target)
        except ApdispatchError as exc:
            # An error that arrives after the deadline is a late request, not a failed one.
            if (time.monotonic() - arrival) * 1000.0 > view.deadline_ms and isinstance(
                exc, UnavailableError
            ):
                self._feedback(view, chosen, "late", arrival)
                return self._finish("late", request, request_id, arrival, target, error=exc.message)
            self._feedback(view, chosen, "failed", arrival)
            raise
        finally:
            worker.in_flight -= 1
        done = time.monotonic()
        queue_ms = _double(reply.parameters, "queue_ms")
        compute_ms = _double(reply.parameters, "compute_ms")
        network_ms = max(0.0, (done - sent) * 1000.0 - queue_ms - compute_ms)
        self.estimator.observe(target, in_flight, network_ms, compute_ms)
        total_ms = (done - arrival) * 1000.0
        if total_ms > request.sla.deadline_ms:
            outcome = "late"
        elif target.variant.accuracy < request.sla.min_accuracy:
            outcome = "inaccurate"
        else:
            outcome = "ok"
        self._feedback(view, chosen, outcome, arrival)
        response = self._finish(outcome, request, request_id, arrival, target)
        timings = response.timings
        timings.queue_ms = queue_ms
        timings.compute_ms = compute_ms
        timings.network_ms = network_ms
        for tensor, raw in zip(reply.outputs, reply.raw_output_contents, strict=False):
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape, data=raw)
        return response

    def _feedback(self, view: RequestView, chosen: Candidate, outcome: str, arrival: float) -> None:
        latency_ms = (time.monotonic() - arrival) * 1000.0
        self.policy.observe(Feedback(view, chosen, outcome, latency_ms))

    def _finish(
        self,
        outcome: str,
        request: pb.InferRequest,
        request_id: str,
        arrival: float,
        target: Target | None,
        error: str = "",
    ) -> pb.InferResponse:
        """Count the outcome and build the reply (outputs are added by the caller)."""
        total_ms = (time.monotonic() - arrival) * 1000.0
        self.stats.record(outcome, request.app, total_ms, target.key if target else None)
        if self._debug:
            self._log.debug(
                "request",
                request_id=request_id,
                app=request.app,
                task=request.task,
                outcome=outcome,
                target=target.key if target else None,
                total_ms=round(total_ms, 3),
                error=error or None,
            )
        response = pb.InferResponse(request_id=request_id, outcome=OUTCOME_PB[outcome], error=error)
        response.timings.total_ms = total_ms
        if target is not None:
            served = response.served_by
            served.worker = target.worker.worker_id
            served.variant = target.variant.name
            served.cluster = target.worker.cluster
            served.accuracy = target.variant.accuracy
        return response
