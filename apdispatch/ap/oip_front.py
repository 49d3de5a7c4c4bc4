"""The Open Inference Protocol front: ``inference.GRPCInferenceService`` on the AP's own port.

A thin servicer over the data plane, as the native Dispatcher's: convert
(:mod:`apdispatch.ap.oip_codec`), call :class:`Dispatcher`, convert back.
Each task is one model. Health and metadata come from the registry: the
server is ready while at least one worker is registered and the AP is not
draining; a model is ready while a worker serves its task.

Errors become gRPC statuses here, with the codes the native API answers with;
on ``ModelStreamInfer`` (Triton's streaming extension) each request gets one
reply, an error one carrying ``error_message``, and the stream goes on.
With a tokens file every call needs an app token, as the Dispatcher's do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import grpc
from google.protobuf.message import DecodeError, Message

from apdispatch.ap.auth import Gate, TokenEntry
from apdispatch.ap.dispatcher import Dispatcher
from apdispatch.ap.oip_codec import (
    MODEL_VERSION,
    model_metadata,
    oip_message,
    to_infer_request,
    to_model_infer_response,
    to_stream_error,
)
from apdispatch.ap.overload import Overload
from apdispatch.ap.streams import serve_stream
from apdispatch.common import __version__
from apdispatch.common.errors import ApdispatchError, InvalidRequestError, NotFoundError
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.common.protocol import oip_pb2 as oip
from apdispatch.common.protocol import oip_pb2_grpc as oip_grpc
from apdispatch.common.tensors import TensorSpec
from apdispatch.routing.registry import Registry

SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "apdispatch-ap"
EXTENSIONS = ("parameters", "model_stream_infer")


class UndecodableOIP(InvalidRequestError):
    """A request message that is not an ``inference.ModelInferRequest``: bad input, not a crash."""

    def __init__(self, why: str) -> None:
        super().__init__("request", f"not a valid inference.ModelInferRequest ({why})")


def decode_model_infer_request(data: bytes) -> oip.ModelInferRequest | UndecodableOIP:
    # gRPC would turn the generated parser's DecodeError into UNKNOWN for a
    # call, and end a stream, whose later requests would go unanswered.
    try:
        return oip.ModelInferRequest.FromString(data)
    except DecodeError as exc:
        return UndecodableOIP(str(exc))


class OIPServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        dispatcher: Dispatcher,
        registry: Registry,
        overload: Overload | None = None,
        gate: Gate | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self._registry = registry
        self._overload = overload
        self._gate = gate or Gate(None, mtls=False)
        self._draining = asyncio.Event()
        # Per task, rebuilt when the registry's workers change.
        self._outputs_of: dict[str, list[TensorSpec]] = {}
        self._outputs_version = -1

    def drain(self) -> None:
        """Open streams stop being read, answer what they took, and end with UNAVAILABLE."""
        self._draining.set()

    # -- helpers -------------------------------------------------------------

    def _arrival(self) -> float:
        """When the request being handled arrived: before now by what the AP's loop lags."""
        now = time.monotonic()
        return now if self._overload is None else self._overload.arrival(now)

    def _app(self, context: grpc.aio.ServicerContext) -> TokenEntry | None:
        """The caller's app token (None without a tokens file); raises when it has none."""
        return self._gate.app(context.invocation_metadata())

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, exc: ApdispatchError) -> NoReturn:
        await context.abort(exc.code, oip_message(exc.message))
        raise AssertionError("abort returned") from exc

    @property
    def _ready(self) -> bool:
        return not self._dispatcher.draining and not self._draining.is_set()

    def _outputs(self, task: str) -> list[TensorSpec]:
        """The task's outputs over the variants serving it, each name once, in the order first seen."""
        if self._outputs_version != self._registry.version:
            self._outputs_of.clear()
            self._outputs_version = self._registry.version
        outputs = self._outputs_of.get(task)
        if outputs is None:
            seen: dict[str, TensorSpec] = {}
            for target in self._registry.all_targets(task):
                for spec in target.variant.outputs:
                    seen.setdefault(spec.name, spec)
            outputs = list(seen.values())
            if outputs:  # known tasks only: a client's made-up names are not kept
                self._outputs_of[task] = outputs
        return outputs

    def _convert(
        self,
        request: oip.ModelInferRequest | UndecodableOIP,
        entry: TokenEntry | None,
        time_remaining_s: float | None,
        arrival: float,
    ) -> pb.InferRequest:
        if isinstance(request, UndecodableOIP):
            raise request
        task = request.model_name
        outputs = self._outputs(task)
        try:
            converted = to_infer_request(
                request,
                self._registry.inputs(task),
                [s.name for s in outputs] if outputs else None,
                time_remaining_s,
                time.monotonic() - arrival,
                self._dispatcher.config.max_deadline_ms,
            )
        except ApdispatchError as exc:
            exc.request_id = exc.request_id or request.id[:128]
            raise
        if entry is not None:
            refusal = self._gate.admit(entry, converted)
            if refusal is not None:
                raise refusal
        return converted

    # -- health and metadata ---------------------------------------------------

    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerLiveResponse:
        try:
            self._app(context)
        except ApdispatchError as exc:
            await self._abort(context, exc)
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerReadyResponse:
        try:
            self._app(context)
        except ApdispatchError as exc:
            await self._abort(context, exc)
        return oip.ServerReadyResponse(ready=self._ready and bool(self._registry.workers()))

    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelReadyResponse:
        try:
            self._app(context)
        except ApdispatchError as exc:
            await self._abort(context, exc)
        known = request.version in ("", MODEL_VERSION) and bool(self._registry.targets(request.name))
        return oip.ModelReadyResponse(ready=self._ready and known)

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        try:
            self._app(context)
        except ApdispatchError as exc:
            await self._abort(context, exc)
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=list(EXTENSIONS))

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        try:
            self._app(context)
            inputs = self._registry.inputs(request.name)
            if inputs is None:
                known = ", ".join(self._registry.tasks()) or "none registered"
                raise NotFoundError(f"name: unknown model {request.name[:64]!r} (known: {known})")
            if request.version not in ("", MODEL_VERSION):
                raise NotFoundError(
                    f"version: model {request.name!r} has version {MODEL_VERSION} only, "
                    f"not {request.version[:32]!r}"
                )
        except ApdispatchError as exc:
            await self._abort(context, exc)
        return model_metadata(request.name, inputs, self._outputs(request.name))

    # -- inference ---------------------------------------------------------------

    async def ModelInfer(
        self, request: oip.ModelInferRequest | UndecodableOIP, context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse:
        arrival = self._arrival()
        try:
            entry = self._app(context)
            converted = self._convert(request, entry, context.time_remaining(), arrival)
            reply = await self._dispatcher.infer(converted, arrival)
        except ApdispatchError as exc:
            await self._abort(context, exc)
        assert not isinstance(request, UndecodableOIP)
        return to_model_infer_response(reply, request)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[oip.ModelInferRequest | UndecodableOIP],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        """Replies in completion order, matched by ``id``; as ``Dispatcher/InferStream`` otherwise.

        A client that does not read its replies stops being read once
        ``stream_max_pending`` replies wait for it; when the AP drains, the
        stream stops being read, answers what it took and ends with UNAVAILABLE.
        """
        try:
            entry = self._app(context)
        except ApdispatchError as exc:
            await self._abort(context, exc)

        def take(
            request: oip.ModelInferRequest | UndecodableOIP,
            answer: Callable[[oip.ModelStreamInferResponse], None],
        ) -> None:
            arrival = self._arrival()
            empty = oip.ModelInferRequest()
            try:
                converted = self._convert(request, entry, context.time_remaining(), arrival)
            except ApdispatchError as exc:
                answer(to_stream_error(exc, empty if isinstance(request, UndecodableOIP) else request))
                return
            assert not isinstance(request, UndecodableOIP)

            def reply(result: pb.InferResponse | ApdispatchError) -> None:
                if isinstance(result, ApdispatchError):
                    answer(to_stream_error(result, request))
                else:
                    answer(
                        oip.ModelStreamInferResponse(infer_response=to_model_infer_response(result, request))
                    )

            self._dispatcher.submit(converted, arrival, reply)

        async for response in serve_stream(
            request_iterator,
            take,
            _same,
            context=context,
            stats=self._dispatcher.stats,
            max_pending=self._dispatcher.config.stream_max_pending,
            draining=self._draining,
        ):
            yield response


def _same(reply: oip.ModelStreamInferResponse) -> oip.ModelStreamInferResponse:
    return reply


def add_oip_to_server(servicer: OIPServicer, server: grpc.aio.Server) -> None:
    """``add_GRPCInferenceServiceServicer_to_server`` with inference requests decoded leniently."""
    simple: dict[str, tuple[type[Message], type[Message]]] = {
        "ServerLive": (oip.ServerLiveRequest, oip.ServerLiveResponse),
        "ServerReady": (oip.ServerReadyRequest, oip.ServerReadyResponse),
        "ModelReady": (oip.ModelReadyRequest, oip.ModelReadyResponse),
        "ServerMetadata": (oip.ServerMetadataRequest, oip.ServerMetadataResponse),
        "ModelMetadata": (oip.ModelMetadataRequest, oip.ModelMetadataResponse),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )
        for name, (request_type, response_type) in simple.items()
    }
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer,
        request_deserializer=decode_model_infer_request,
        response_serializer=oip.ModelInferResponse.SerializeToString,
    )
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer,
        request_deserializer=decode_model_infer_request,
        response_serializer=oip.ModelStreamInferResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
