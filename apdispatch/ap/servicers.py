"""Thin gRPC servicers: convert, call the data plane or registry, convert back.

Errors become gRPC statuses here and nowhere else.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
import structlog
from google.protobuf.message import DecodeError

from apdispatch.ap.auth import Gate
from apdispatch.ap.dispatcher import Dispatcher, Reply
from apdispatch.ap.forwarder import Forwarder
from apdispatch.ap.overload import Overload
from apdispatch.ap.streams import serve_stream
from apdispatch.common.errors import ApdispatchError, InvalidRequestError
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.common.protocol import dispatcher_pb2_grpc as pb_grpc
from apdispatch.routing.estimator import LatencyEstimator
from apdispatch.routing.registry import Registry


def error_reply(exc: ApdispatchError) -> pb.InferResponse:
    """A stream's reply for a request that ended in an error status."""
    outcome = pb.REJECTED if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED else pb.FAILED
    return pb.InferResponse(
        request_id=exc.request_id, outcome=outcome, status_code=exc.code.value[0], error=exc.message
    )


def _within_client_deadline(
    request: pb.InferRequest, time_remaining_s: float | None, arrival: float, max_deadline_ms: float
) -> None:
    """Tighten a valid deadline to the client's gRPC deadline, when that comes first.

    A reply after the client has given up reaches nobody, so admission must count it out.
    """
    if time_remaining_s is None or not time_remaining_s > 0:
        return
    deadline_ms = request.sla.deadline_ms
    if not 0 < deadline_ms <= max_deadline_ms:
        return  # validation names the field
    client_ms = (time.monotonic() - arrival + time_remaining_s) * 1000.0
    if client_ms < deadline_ms:
        request.sla.deadline_ms = client_ms


class Undecodable(InvalidRequestError):
    """A request message that is not an ``apdispatch.v1.InferRequest``: bad input, not a crash."""

    def __init__(self, why: str) -> None:
        super().__init__("request", f"not a valid apdispatch.v1.InferRequest ({why})")


def decode_infer_request(data: bytes) -> pb.InferRequest | Undecodable:
    # In place of the generated FromString: gRPC would turn its DecodeError into
    # UNKNOWN for a call, and end a stream, whose later messages would go unanswered.
    try:
        return pb.InferRequest.FromString(data)
    except DecodeError as exc:
        return Undecodable(str(exc))


def add_dispatcher_to_server(servicer: DispatcherServicer, server: grpc.aio.Server) -> None:
    """``add_DispatcherServicer_to_server`` with requests decoded by ``decode_infer_request``."""
    handlers = {
        "Infer": grpc.unary_unary_rpc_method_handler(
            servicer.Infer,
            request_deserializer=decode_infer_request,
            response_serializer=pb.InferResponse.SerializeToString,
        ),
        "InferStream": grpc.stream_stream_rpc_method_handler(
            servicer.InferStream,
            request_deserializer=decode_infer_request,
            response_serializer=pb.InferResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("apdispatch.v1.Dispatcher", handlers),)
    )


class DispatcherServicer(pb_grpc.DispatcherServicer):
    def __init__(self, dispatcher: Dispatcher, overload: Overload | None = None) -> None:
        self._dispatcher = dispatcher
        self._overload = overload
        self._draining = asyncio.Event()

    def drain(self) -> None:
        """Open streams stop being read, answer what they took, and end with UNAVAILABLE.

        A long-lived client stream would otherwise hold the AP for the whole grace
        period; ended, its client can reconnect (to this AP restarted, or another).
        """
        self._draining.set()

    def _arrival(self) -> float:
        """When the request being handled arrived: before now by what the AP's loop lags."""
        now = time.monotonic()
        return now if self._overload is None else self._overload.arrival(now)

    async def Infer(
        self, request: pb.InferRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.InferResponse:
        arrival = self._arrival()
        try:
            if isinstance(request, Undecodable):
                raise request
            max_deadline_ms = self._dispatcher.config.max_deadline_ms
            _within_client_deadline(request, context.time_remaining(), arrival, max_deadline_ms)
            return await self._dispatcher.infer(request, arrival)
        except ApdispatchError as exc:
            await context.abort(exc.code, exc.message)
            raise AssertionError("abort returned") from exc

    async def InferStream(
        self,
        request_iterator: AsyncIterator[pb.InferRequest | Undecodable],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.InferResponse]:
        submit = self._dispatcher.submit

        def take(request: pb.InferRequest | Undecodable, answer: Reply) -> None:
            if isinstance(request, Undecodable):
                answer(request)  # answered, and the stream goes on
            else:
                submit(request, self._arrival(), answer)

        async for reply in serve_stream(
            request_iterator,
            take,
            _stream_reply,
            context=context,
            stats=self._dispatcher.stats,
            max_pending=self._dispatcher.config.stream_max_pending,
            draining=self._draining,
        ):
            yield reply


def _stream_reply(result: pb.InferResponse | ApdispatchError) -> pb.InferResponse:
    return error_reply(result) if isinstance(result, ApdispatchError) else result


class RegistryServicer(pb_grpc.RegistryServicer):
    """Workers' membership; writes need a worker's credential, ListWorkers an operator's (``Gate``)."""

    def __init__(
        self,
        registry: Registry,
        estimator: LatencyEstimator,
        forwarder: Forwarder,
        policy_name: str,
        log: structlog.typing.FilteringBoundLogger,
        gate: Gate | None = None,
    ) -> None:
        self._registry = registry
        self._estimator = estimator
        self._forwarder = forwarder
        self._policy_name = policy_name
        self._log = log
        self._gate = gate or Gate(None, mtls=False)

    async def _refuse(self, context: grpc.aio.ServicerContext, exc: ApdispatchError, what: str) -> NoReturn:
        if exc.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            self._log.warning("registry call refused", call=what, code=exc.code.name, error=exc.message)
        await context.abort(exc.code, exc.message)
        raise AssertionError("abort returned") from exc

    async def Register(
        self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterResponse:
        old = self._registry.get(request.worker_id)
        try:
            owner = self._gate.worker(context, "Register")
            worker = self._registry.register(request, owner)
        except ApdispatchError as exc:
            await self._refuse(context, exc, "Register")
        if old is not None and old.address != worker.address:
            await self._forwarder.drop(old.address)
        self._log.info(
            "worker registered",
            worker=worker.worker_id,
            address=worker.address,
            cluster=worker.cluster,
            kind=worker.kind,
            slots=worker.slots,
            variants=sorted(worker.variants),
        )
        return pb.RegisterResponse(lease_s=self._registry.lease_s)

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        try:
            known = self._registry.heartbeat(request.worker_id, self._gate.worker(context, "Heartbeat"))
        except ApdispatchError as exc:
            await self._refuse(context, exc, "Heartbeat")
        return pb.HeartbeatResponse(known=known, lease_s=self._registry.lease_s)

    async def Deregister(
        self, request: pb.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeregisterResponse:
        try:
            worker = self._registry.deregister(request.worker_id, self._gate.worker(context, "Deregister"))
        except ApdispatchError as exc:
            await self._refuse(context, exc, "Deregister")
        if worker is not None:
            self._estimator.forget(worker)
            # It is leaving, not gone: the replies it owes still come back on
            # its link, which then closes (a stream is half-closed, not cut).
            self._forwarder.retire(worker.address)
            self._log.info("worker deregistered", worker=worker.worker_id)
        return pb.DeregisterResponse()

    async def ListWorkers(
        self, request: pb.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListWorkersResponse:
        try:
            self._gate.operator(context, "ListWorkers")
        except ApdispatchError as exc:
            await self._refuse(context, exc, "ListWorkers")
        return pb.ListWorkersResponse(
            workers=[
                pb.WorkerStatus(
                    worker=w.registration,
                    in_flight=w.in_flight,
                    lease_left_s=self._registry.lease_left(w),
                )
                for w in self._registry.workers()
            ],
            policy=self._policy_name,
        )
