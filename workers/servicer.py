"""The OIP RPCs (``inference.GRPCInferenceService``, Triton's ``ModelStreamInfer``
included) over a worker's models.

Errors become gRPC statuses here and nowhere else (:meth:`InferenceServicer._status`).
``link_delay_ms`` D emulates a network link: D/2 before a request enters the
queue and D/2 after its reply is ready (holding no slot).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from structlog.typing import FilteringBoundLogger

from apdispatch.common import __version__
from apdispatch.common.errors import ApdispatchError, NotFoundError
from apdispatch.common.protocol import oip_pb2 as pb
from apdispatch.common.protocol import oip_pb2_grpc as pb_grpc
from workers.codec import MODEL_VERSION, Model
from workers.metrics import WorkerMetrics

SERVER_NAME = "apdispatch-worker"
EXTENSIONS = ("parameters", "model_stream_infer")


def _with_id(request_id: str, message: str) -> str:
    return f"[request id: {request_id}] {message}" if request_id else message


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The OIP RPCs over a set of :class:`Model`."""

    def __init__(
        self,
        models: dict[str, Model],
        log: FilteringBoundLogger,
        *,
        link_delay_ms: float = 0.0,
    ) -> None:
        self.models = models
        self.log = log
        self.half_delay_s = max(0.0, link_delay_ms) / 2e3
        self.ready = False  # set once serving, cleared when draining
        self.metrics: WorkerMetrics | None = None  # told of every inference request when set

    # Health and metadata ------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        known = request.name in self.models and request.version in ("", MODEL_VERSION)
        return pb.ModelReadyResponse(ready=self.ready and known)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=list(EXTENSIONS))

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        try:
            model = self._model(request.name, request.version)
        except ApdispatchError as err:
            await context.abort(*self._status(err, request.name, ""))
        return model.metadata

    # Inference -----------------------------------------------------------

    def _model(self, name: str, version: str) -> Model:
        model = self.models.get(name)
        if model is None:
            raise NotFoundError(f"Request for unknown model: '{name}' is not found")
        if version not in ("", MODEL_VERSION):
            raise NotFoundError(
                f"Request for unknown model: '{name}' version {version} is not found",
            )
        return model

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        metrics = self.metrics
        if metrics is not None:
            metrics.started()
        try:
            model = self._model(request.model_name, request.model_version)
            inputs, rows = model.decode(request)
            picked = model.requested_outputs(request)
            result = await model.scheduler.infer(inputs, rows, deadline)
        except BaseException as exc:
            if metrics is not None:
                metrics.failed(request.model_name, exc)
            raise
        if metrics is not None:
            metrics.served(model.name, result)
        # A no-op unless the level is debug: nothing above debug per request.
        self.log.debug(
            "served",
            model=model.name,
            request_id=request.id,
            batch_size=result.batch_size,
            queue_ms=result.queue_ms,
            compute_ms=result.compute_ms,
        )
        return model.encode(request, result, picked)

    def _status(self, exc: Exception, model: str, request_id: str) -> tuple[grpc.StatusCode, str]:
        """The status and message a failed call is answered with: errors become statuses here only.

        Ours carry their status; anything else is the model failing (INTERNAL), and is logged.
        """
        if isinstance(exc, ApdispatchError):
            return exc.code, _with_id(request_id, exc.message)
        self.log.error("infer_failed", model=model, request_id=request_id, exc_info=exc)
        return grpc.StatusCode.INTERNAL, _with_id(request_id, f"model '{model}' failed: {exc}")

    @staticmethod
    def _timeout_deadline(request: pb.ModelInferRequest, now: float) -> float | None:
        """Triton's ``timeout`` request parameter (int64 microseconds from arrival), if any."""
        if "timeout" not in request.parameters:
            return None
        micros = request.parameters["timeout"].int64_param
        return now + micros / 1e6 if micros > 0 else None

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        now = asyncio.get_running_loop().time()
        # The SLA arrives as the gRPC deadline; it counts from arrival, link delay included.
        remaining = context.time_remaining()
        deadline = None if remaining is None else now + remaining
        if request.parameters:
            by_param = self._timeout_deadline(request, now)
            if by_param is not None and (deadline is None or by_param < deadline):
                deadline = by_param
        half = self.half_delay_s
        if half:
            await asyncio.sleep(half)
        try:
            response = await self._infer(request, deadline)
        except Exception as exc:
            code, message = self._status(exc, request.model_name, request.id)
            if half:
                await asyncio.sleep(half)
            await context.abort(code, message)
        if half:
            await asyncio.sleep(half)
        return response

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Every request runs concurrently; replies go out as they complete, matched by ``id``.

        Errors travel per message in ``error_message`` (with ``infer_response``
        naming the model and id, and a ``status`` string parameter holding the
        gRPC status name) and never end the stream.
        """
        loop = asyncio.get_running_loop()
        replies: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def handle(request: pb.ModelInferRequest, deadline: float | None) -> None:
            half = self.half_delay_s
            if half:
                await asyncio.sleep(half)
            try:
                response = await self._infer(request, deadline)
                reply = pb.ModelStreamInferResponse(infer_response=response)
            except Exception as exc:
                reply = self._stream_error(request, *self._status(exc, request.model_name, request.id))
            if half:
                await asyncio.sleep(half)
            replies.put_nowait(reply)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    now = loop.time()
                    deadline = self._timeout_deadline(request, now) if request.parameters else None
                    task = loop.create_task(handle(request, deadline))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                # The client closed its side: answer what is in flight, then end.
                while tasks:
                    await asyncio.gather(*tasks)
            finally:
                replies.put_nowait(None)

        reader = loop.create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
            await reader  # re-raises a broken request stream
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    @staticmethod
    def _stream_error(
        request: pb.ModelInferRequest, code: grpc.StatusCode, message: str
    ) -> pb.ModelStreamInferResponse:
        return pb.ModelStreamInferResponse(
            error_message=message,
            infer_response=pb.ModelInferResponse(
                model_name=request.model_name,
                id=request.id,
                parameters={"status": pb.InferParameter(string_param=code.name)},
            ),
        )
