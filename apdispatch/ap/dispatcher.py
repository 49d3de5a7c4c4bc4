"""The data plane: check, admit, decide, forward, classify. One outcome per request.

``Dispatcher.submit`` takes a request and a callback; the callback receives
exactly one thing: a reply (ok, late, inaccurate) or an ApdispatchError
(rejected, invalid, not found, failed), and the outcome has been counted
exactly once by then. Rejections and bad input are answered before
``submit`` returns. ``Dispatcher.infer`` is the awaitable form.

A request that fails on its worker (unreachable, or an error other than bad
input) is sent once more, to another worker, when its deadline still allows;
what became of each worker's requests goes to the outlier detector, which
takes failing and stalling workers out of routing.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from apdispatch.ap.config import APConfig
from apdispatch.ap.forwarder import DeadlineReached, Forwarder, LinkFailed, WorkerReply
from apdispatch.ap.metrics import Stats
from apdispatch.ap.overload import ConcurrencyLimit
from apdispatch.ap.validate import MAX_APP_LEN, CheckedRequest, check_request
from apdispatch.common.errors import ApdispatchError, InvalidRequestError, RejectedError, UnavailableError
from apdispatch.common.outcomes import TO_PROTO, Outcome
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.policies import Policy, RequestView
from apdispatch.routing.cascade import CascadeConfig
from apdispatch.routing.estimator import LatencyEstimator
from apdispatch.routing.outlier import OutlierDetector
from apdispatch.routing.registry import Registry, Target
from apdispatch.routing.router import Decision, Router

Reply = Callable[[pb.InferResponse | ApdispatchError], None]


@dataclass(slots=True, eq=False)
class _InFlight:
    """One forwarded request, from decision to reply."""

    request: pb.InferRequest
    request_id: str
    arrival: float
    decision: Decision
    reply: Reply
    finished: bool = False  # the worker's part is over: released, and nothing more is taken from it
    answered: bool = False  # the outcome is counted and the reply handed over
    retry: bool = False  # the request's second try, on another worker
    # A cascade's second step: the first's decision (the policy's choice, told the outcome).
    origin: Decision | None = None

    @property
    def choice(self) -> Decision:
        """The decision the policy made for this request, and learns the outcome of."""
        return self.origin or self.decision


def _releasing(limit: ConcurrencyLimit, reply: Reply) -> Reply:
    """``reply``, which first gives back the request's place under the limit."""

    def answer(result: pb.InferResponse | ApdispatchError) -> None:
        limit.release()
        reply(result)

    return answer


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
        limit: ConcurrencyLimit | None = None,
        outlier: OutlierDetector | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.estimator = estimator
        # Admission, choice and feedback: the same code the simulator runs.
        self.router = Router(
            policy, estimator, CascadeConfig(enabled=config.cascade, rate_alpha=config.cascade_rate_alpha)
        )
        self.forwarder = forwarder
        self.stats = stats
        self._log = log
        self._debug = debug
        self._ids = itertools.count(1)
        self._late_grace_s = config.late_grace_ms / 1000.0
        self._margin_ms = config.reply_margin_ms
        self.outlier = outlier
        # Requests sent again elsewhere after failing on a worker, by that worker's id.
        self.retried: Counter[str] = Counter()
        # Admission to the AP itself: the overload limit, and no new work while draining.
        self.limit = limit
        self.draining = False

    @property
    def policy(self) -> Policy:
        return self.router.policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self.router.policy = policy

    async def infer(self, request: pb.InferRequest, arrival: float) -> pb.InferResponse:
        """Awaitable form of ``submit``: returns the reply or raises the error."""
        future: asyncio.Future[pb.InferResponse | ApdispatchError] = (
            asyncio.get_running_loop().create_future()
        )

        def reply(result: pb.InferResponse | ApdispatchError) -> None:
            # A call the client cancelled (or whose gRPC deadline passed) has
            # cancelled its future: nobody is left to answer. Setting it
            # raised inside the forwarder's delivery: on a streaming link
            # that closed the worker's stream, and every request in flight
            # there failed with it.
            if not future.done():
                future.set_result(result)

        self.submit(request, arrival, reply)
        result = await future
        if isinstance(result, ApdispatchError):
            raise result
        return result

    def submit(self, request: pb.InferRequest, arrival: float, reply: Reply) -> None:
        # An id too long to be valid (validation says so) is not echoed whole.
        request_id = request.request_id[:MAX_APP_LEN] or f"ap-{next(self._ids)}"
        if self.draining:
            self._fail(UnavailableError("the AP is shutting down"), request, request_id, arrival, None, reply)
            return
        limit = self.limit
        if limit is not None:
            if not limit.try_acquire():
                error = RejectedError(f"AP overloaded: {limit.in_flight} requests in flight, its limit now")
                self._fail(error, request, request_id, arrival, None, reply)
                return
            reply = _releasing(limit, reply)
        try:
            self._dispatch(request, request_id, arrival, reply)
        except ApdispatchError as exc:
            self._fail(exc, request, request_id, arrival, None, reply)
        except Exception as exc:
            # A bug (in a policy, say) still ends in one outcome and a status
            # the client can act on; the traceback goes to the log.
            self._log.exception("dispatch failed", request_id=request_id)
            failure = UnavailableError(f"the AP could not dispatch the request: {exc!r}")
            self._fail(failure, request, request_id, arrival, None, reply)

    def _dispatch(self, request: pb.InferRequest, request_id: str, arrival: float, reply: Reply) -> None:
        checked = check_request(
            request, self.registry, self.config.max_tensor_bytes, self.config.max_deadline_ms
        )
        # The deadline counts from arrival at the AP; time spent here so far is gone.
        now = time.monotonic()
        left_ms = checked.deadline_ms - (now - arrival) * 1000.0 - self._margin_ms
        view = RequestView(checked.task, request.app, left_ms, checked.min_accuracy, now)
        decision = self.router.decide(view, checked.targets)
        self._send(_InFlight(request, request_id, arrival, decision, reply))

    def _send(self, flight: _InFlight) -> None:
        """Forward ``flight``; if that raises, its decision is released before the error goes on."""
        try:
            self._forward(flight)
        except BaseException:
            # Never sent: the worker holds nothing of it, and whatever the link
            # may still report for it is ignored.
            if not flight.finished:
                flight.finished = True
                self.router.release(flight.decision)
            raise

    def _forward(self, flight: _InFlight) -> None:
        request = flight.request
        target = flight.decision.target
        worker = target.worker
        deadline = flight.arrival + request.sla.deadline_ms / 1000.0 + self._late_grace_s
        link = self.forwarder.link(worker.address, worker.streaming)
        link.submit(
            target.variant.name,
            tuple(s.name for s in target.variant.inputs),
            [(t.datatype, tuple(t.shape), t.data) for t in request.inputs],
            target.variant.max_batch_size,
            deadline,
            lambda result: self._complete(flight, result),
        )

    def _complete(self, flight: _InFlight, result: WorkerReply | BaseException) -> None:
        """The link's report on a forwarded request: called once, never raises."""
        if flight.finished:
            return
        flight.finished = True
        self.router.release(flight.decision)
        try:
            self._conclude(flight, result)
        except Exception as exc:
            self._log.exception("completion failed", request_id=flight.request_id)
            if not flight.answered:
                error = UnavailableError(f"the AP could not complete the request: {exc!r}")
                self._fail(
                    error,
                    flight.request,
                    flight.request_id,
                    flight.arrival,
                    flight.decision.target,
                    flight.reply,
                )

    def _conclude(self, flight: _InFlight, result: WorkerReply | BaseException) -> None:
        now = time.monotonic()
        total_ms = (now - flight.arrival) * 1000.0
        late = total_ms + self._margin_ms > flight.request.sla.deadline_ms
        if self.outlier is not None:
            self._judge(self.outlier, flight.decision, result, late)
        if (
            isinstance(result, ApdispatchError)
            and not isinstance(result, InvalidRequestError)
            and not flight.retry
            and not late
            and self._retry(flight)
        ):
            self._observe(flight.choice, Outcome.FAILED, total_ms)
            return
        network_ms = 0.0
        if isinstance(result, DeadlineReached) or (late and isinstance(result, UnavailableError)):
            outcome = Outcome.LATE  # not served by its deadline, whatever the worker said after
        elif isinstance(result, BaseException):
            outcome = Outcome.FAILED
        else:
            network_ms = max(0.0, (now - result.sent_at) * 1000.0 - result.queue_ms - result.compute_ms)
            self.router.learn(flight.decision, network_ms, result.compute_ms)
            decision = flight.decision
            if decision.cascade is None:  # a cascade's prediction covers both steps, not this reply
                self.stats.estimated(
                    decision.target.worker.cluster,
                    decision.chosen.predicted_ms,
                    (now - decision.view.now_s) * 1000.0,
                )
            cascade = decision.cascade
            if cascade is not None and not late:
                # A cascade's first answer: kept when confident enough for the floor, else escalated.
                sure = -1.0 if result.confidence is None else result.confidence
                if not self.router.accepted(decision, sure):
                    if self._escalate(flight):
                        return
                    outcome = Outcome.INACCURATE  # no accurate target left to escalate to
                else:
                    outcome = Outcome.OK
            elif late:
                outcome = Outcome.LATE
            elif flight.decision.target.variant.accuracy < flight.request.sla.min_accuracy:
                outcome = Outcome.INACCURATE
            else:
                outcome = Outcome.OK
        try:
            self._answer(flight, result, outcome, total_ms, network_ms)
        finally:
            # Once the reply has gone, so that what the policy does with an
            # outcome (the learned one refreshes its reservations there)
            # delays no reply; and also when it could not go (a call the
            # client cancelled): the policy learns from every decision.
            self._observe(flight.choice, outcome, total_ms)

    @staticmethod
    def _judge(
        outlier: OutlierDetector, decision: Decision, result: WorkerReply | BaseException, late: bool
    ) -> None:
        """Tell the outlier detector what became of a request on its worker."""
        worker = decision.target.worker
        # A miss is the worker's doing when it was predicted to make the deadline.
        missed = late or isinstance(result, DeadlineReached)
        slow = missed and decision.chosen.predicted_ms <= decision.view.deadline_ms
        if isinstance(result, LinkFailed):
            outlier.link_failed(worker)
        elif isinstance(result, WorkerReply | DeadlineReached):
            if slow:
                outlier.slow(worker)
            elif isinstance(result, WorkerReply):
                outlier.success(worker)
        elif not isinstance(result, InvalidRequestError):  # bad input is the client's doing
            outlier.error(worker)

    def _retry(self, flight: _InFlight) -> bool:
        """Send a request that failed on its worker to another one; False when none can meet its deadline."""
        request = flight.request
        failed = flight.decision.target.worker
        checked = self._recheck(request)
        if checked is None:
            return False  # its task is gone meanwhile: the failure stands
        targets = [t for t in checked.targets if t.worker.worker_id != failed.worker_id]
        if not targets:
            return False
        now = time.monotonic()
        left_ms = checked.deadline_ms - (now - flight.arrival) * 1000.0 - self._margin_ms
        view = RequestView(checked.task, request.app, left_ms, checked.min_accuracy, now)
        try:
            decision = self.router.decide(view, targets)
        except RejectedError:
            return False
        self.retried[failed.worker_id] += 1
        retry = _InFlight(request, flight.request_id, flight.arrival, decision, flight.reply, retry=True)
        self._send(retry)
        return True

    def _escalate(self, flight: _InFlight) -> bool:
        """Send a cascade's request on to an accurate target; False when its task is gone meanwhile."""
        checked = self._recheck(flight.request)
        if checked is None:
            return False
        decision = self.router.escalate(flight.decision, checked.targets, time.monotonic())
        second = _InFlight(flight.request, flight.request_id, flight.arrival, decision, flight.reply)
        second.retry, second.origin = flight.retry, flight.decision
        self._send(second)
        return True

    def _recheck(self, request: pb.InferRequest) -> CheckedRequest | None:
        """The request checked against the registry as it is now; None when it fails."""
        try:
            config = self.config
            return check_request(request, self.registry, config.max_tensor_bytes, config.max_deadline_ms)
        except ApdispatchError:
            return None

    def _observe(self, decision: Decision, outcome: Outcome, total_ms: float) -> None:
        try:
            self.router.observe(decision, outcome, total_ms)
        except Exception:
            # The reply has gone and is counted; a policy that fails to learn
            # from it must not fail the requests beside it.
            self._log.exception("policy observe failed", policy=self.router.policy.name)

    def _answer(
        self,
        flight: _InFlight,
        result: WorkerReply | BaseException,
        outcome: Outcome,
        total_ms: float,
        network_ms: float,
    ) -> None:
        target = flight.decision.target
        flight.answered = True
        if outcome is Outcome.FAILED:
            error = (
                result
                if isinstance(result, ApdispatchError)
                else UnavailableError(f"worker {target.worker.worker_id}: {result!r}")
            )
            self._fail(error, flight.request, flight.request_id, flight.arrival, target, flight.reply)
            return
        response = self._finish(outcome, flight.request, flight.request_id, total_ms, target)
        if isinstance(result, WorkerReply):
            timings = response.timings
            timings.queue_ms = result.queue_ms
            timings.compute_ms = result.compute_ms
            timings.network_ms = network_ms
            response.escalated = flight.origin is not None
            if result.confidence is not None:
                response.confidence = result.confidence
            for tensor in result.outputs:
                response.outputs.add(
                    name=tensor.name, datatype=tensor.datatype, shape=tensor.shape, data=tensor.data
                )
        flight.reply(response)

    def _fail(
        self,
        exc: ApdispatchError,
        request: pb.InferRequest,
        request_id: str,
        arrival: float,
        target: Target | None,
        reply: Reply,
    ) -> None:
        exc.request_id = request_id
        outcome = Outcome.REJECTED if isinstance(exc, RejectedError) else Outcome.FAILED
        total_ms = (time.monotonic() - arrival) * 1000.0
        self._finish(outcome, request, request_id, total_ms, target, error=exc.message)
        reply(exc)

    def _finish(
        self,
        outcome: Outcome,
        request: pb.InferRequest,
        request_id: str,
        total_ms: float,
        target: Target | None,
        error: str = "",
    ) -> pb.InferResponse:
        """Count the outcome and build the reply (outputs are added by the caller)."""
        key = target.key if target else None
        self.stats.record(outcome, request.app, total_ms, key, request.sla.deadline_ms, error)
        if self._debug:
            self._log.debug(
                "request",
                request_id=request_id,
                app=request.app[:MAX_APP_LEN],
                task=request.task[:MAX_APP_LEN],
                outcome=outcome,
                target=target.key if target else None,
                total_ms=round(total_ms, 3),
                error=error or None,
            )
        response = pb.InferResponse(request_id=request_id, outcome=TO_PROTO[outcome], error=error)
        response.timings.total_ms = total_ms
        if target is not None:
            served = response.served_by
            served.worker = target.worker.worker_id
            served.variant = target.variant.name
            served.cluster = target.worker.cluster
            served.accuracy = target.variant.accuracy
        return response
