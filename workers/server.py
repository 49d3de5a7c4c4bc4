"""A worker process: an Open Inference Protocol (KServe v2) gRPC server over model variants.

``apdispatch worker edge|cloud ...`` ends up in :func:`main`. The pieces:

- :class:`Model`: one served variant: its runtime, its scheduler and the wire
  codec (validation of inputs, raw little-endian replies).
- :class:`InferenceServicer`: the ``inference.GRPCInferenceService`` RPCs,
  Triton's ``ModelStreamInfer`` included. Replies always carry outputs as
  ``raw_output_contents`` (the only thing tritonclient reads) and the
  parameters ``queue_ms``, ``compute_ms`` (double) and ``batch_size`` (int64).
- :class:`Worker`: loads the variants, runs the grpc.aio server, registers
  with the AP, shuts down gracefully.

**Emulation**, so that one machine can host a heterogeneous topology:
``slowdown`` F holds each slot F times as long as the real compute took
(:class:`workers.runtime.Slots`); ``link_delay_ms`` D adds a round trip to every
request, D/2 before it enters the queue and D/2 after its reply is ready
(holding no slot). Both ride on asyncio timers, which an idle loop fires up to
a millisecond late; the ``queue_ms`` and ``compute_ms`` a reply carries are
measured, not computed from the settings.

The edge worker must not import torch: ``workers.cloud`` is imported only when a
cloud worker starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from structlog.typing import FilteringBoundLogger

from apdispatch.common import __version__
from apdispatch.common.errors import ApdispatchError, InvalidInputError, NotFoundError
from apdispatch.common.manifest import TensorSpec, Variant, load_manifest
from apdispatch.common.protocol import dispatcher_pb2 as dpb
from apdispatch.common.protocol import oip_pb2 as pb
from apdispatch.common.protocol import oip_pb2_grpc as pb_grpc
from apdispatch.common.tensors import DATATYPE_TO_DTYPE, FLOAT_DATATYPES, all_finite
from workers.config import WorkerConfig
from workers.logging import make_logger
from workers.registration import Registrar
from workers.runtime import (
    DirectScheduler,
    InferResult,
    Runtime,
    Scheduler,
    Slots,
    format_shape,
)

SERVER_NAME = "apdispatch-worker"
EXTENSIONS = ("parameters", "model_stream_infer")
MODEL_VERSION = "1"
# ONNX variants whose measured execution at full batch takes less than this
# run inline on the event loop: handing them to a thread costs more than the
# model itself. Measured on digits-tiny (about 0.01 ms): inline serves about
# 1.7x the streamed requests per second of a thread hop, at a lower p50.
INLINE_BELOW_MS = 0.3
# Message limits: large tensors are fine on loopback and in a LAN.
GRPC_OPTIONS = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # An explicit port must fail when taken, not be silently shared.
    ("grpc.so_reuseport", 0),
)

# Which InferTensorContents field carries each datatype when not sent raw.
_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


@dataclass(frozen=True, slots=True)
class _InputSpec:
    index: int
    name: str
    datatype: str
    dtype: np.dtype
    shape: tuple[int, ...]  # -1 = any size
    is_float: bool
    # The common case, all dimensions but the batch fixed, is checked with one
    # tuple comparison: the per-request path stays short.
    tail: tuple[int, ...] | None  # shape[1:] when all fixed, else None


class Model:
    """One served variant: runtime, scheduler and the OIP codec for its tensors."""

    def __init__(self, runtime: Runtime, scheduler: Scheduler, *, max_batch_size: int) -> None:
        self.runtime = runtime
        self.scheduler = scheduler
        self.name = runtime.name
        self.variant: Variant = runtime.variant
        self.max_batch_size = max_batch_size
        self._inputs = {
            t.name: _InputSpec(
                index=i,
                name=t.name,
                datatype=t.datatype,
                dtype=DATATYPE_TO_DTYPE[t.datatype],
                shape=tuple(t.shape),
                is_float=t.datatype in FLOAT_DATATYPES,
                tail=tuple(t.shape[1:]) if all(d >= 0 for d in t.shape[1:]) else None,
            )
            for i, t in enumerate(runtime.inputs)
        }
        self._n_inputs = len(runtime.inputs)
        self._outputs = {t.name: i for i, t in enumerate(runtime.outputs)}
        self._output_specs = runtime.outputs
        self._output_dtypes = [DATATYPE_TO_DTYPE[t.datatype] for t in runtime.outputs]
        self._all_outputs = list(range(len(runtime.outputs)))
        self.metadata = pb.ModelMetadataResponse(
            name=self.name,
            versions=[MODEL_VERSION],
            platform=runtime.platform,
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape))
                for t in runtime.inputs
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape))
                for t in runtime.outputs
            ],
        )

    def decode(self, request: pb.ModelInferRequest) -> tuple[list[np.ndarray], int]:
        """The request's input arrays (in the variant's input order) and its batch size.

        Raises :class:`InvalidInputError` naming the input and the model for
        anything the model cannot run. Raw contents become read-only views
        (``np.frombuffer``), not copies.
        """
        m = self.name
        tensors = request.inputs
        if len(tensors) != self._n_inputs:
            expected = ", ".join(f"'{n}'" for n in self._inputs)
            raise InvalidInputError(
                f"expected {self._n_inputs} inputs but got {len(tensors)} inputs"
                f" for model '{m}' (inputs: {expected})",
            )
        raw = request.raw_input_contents
        if raw and len(raw) != len(tensors):
            raise InvalidInputError(
                f"raw_input_contents for model '{m}' has {len(raw)} entries,"
                f" expected one per input ({len(tensors)})",
            )
        arrays: list[np.ndarray | None] = [None] * self._n_inputs
        rows = -1
        first = ""
        for pos, tensor in enumerate(tensors):
            name = tensor.name
            spec = self._inputs.get(name)
            if spec is None:
                raise InvalidInputError(f"unexpected inference input '{name}' for model '{m}'")
            if arrays[spec.index] is not None:
                raise InvalidInputError(f"input '{name}' for model '{m}' is given more than once")
            if tensor.datatype != spec.datatype:
                raise InvalidInputError(
                    f"inference input '{name}' data-type is '{tensor.datatype}',"
                    f" but model '{m}' expects '{spec.datatype}'",
                )
            shape = tuple(tensor.shape)
            fast = spec.tail is not None and len(shape) > 0 and shape[0] > 0 and shape[1:] == spec.tail
            if not fast and (
                len(shape) != len(spec.shape)
                or any(d < 0 or (e >= 0 and d != e) for d, e in zip(shape, spec.shape, strict=True))
            ):
                raise InvalidInputError(
                    f"unexpected shape for input '{name}' for model '{m}'."
                    f" Expected {format_shape(spec.shape)}, got {format_shape(shape)}",
                )
            count = 1
            for d in shape:
                count *= d
            if count == 0:
                raise InvalidInputError(
                    f"input '{name}' for model '{m}' is empty (shape {format_shape(shape)})"
                )
            batch = shape[0]
            if batch > self.max_batch_size:
                raise InvalidInputError(
                    f"inference request batch-size must be <= {self.max_batch_size}"
                    f" for model '{m}', got {batch} (input '{name}')",
                )
            if rows < 0:
                rows, first = batch, name
            elif batch != rows:
                raise InvalidInputError(
                    f"input '{name}' for model '{m}' has batch size {batch}, but input '{first}' has {rows}",
                )
            if raw:
                if tensor.HasField("contents"):
                    raise InvalidInputError(
                        f"input '{name}' for model '{m}' has both typed contents and raw_input_contents",
                    )
                data = raw[pos]
                expected_bytes = count * spec.dtype.itemsize
                if len(data) != expected_bytes:
                    raise InvalidInputError(
                        f"unexpected total byte size {len(data)} for input '{name}'"
                        f" for model '{m}', expecting {expected_bytes}"
                        f" (shape {format_shape(shape)} of {spec.datatype})",
                    )
                array = np.frombuffer(data, dtype=spec.dtype).reshape(shape)
            else:
                array = self._typed(tensor, spec, shape, count)
            if spec.is_float and not all_finite(array):
                raise InvalidInputError(f"input '{name}' for model '{m}' holds NaN or infinite values")
            arrays[spec.index] = array
        return arrays, rows  # type: ignore[return-value]  # every slot was filled above

    def _typed(
        self,
        tensor: pb.ModelInferRequest.InferInputTensor,
        spec: _InputSpec,
        shape: tuple[int, ...],
        count: int,
    ) -> np.ndarray:
        field = _CONTENTS_FIELD.get(spec.datatype)
        m, name = self.name, spec.name
        if field is None:
            raise InvalidInputError(
                f"input '{name}' for model '{m}': {spec.datatype} travels only as raw_input_contents",
            )
        values = getattr(tensor.contents, field)
        if len(values) == 0:
            raise InvalidInputError(
                f"input '{name}' for model '{m}' has no data: neither raw_input_contents"
                f" nor contents.{field}",
            )
        if len(values) != count:
            raise InvalidInputError(
                f"input '{name}' for model '{m}' has {len(values)} values in"
                f" contents.{field}, expected {count} for shape {format_shape(shape)}",
            )
        try:
            return np.array(values, dtype=spec.dtype).reshape(shape)
        except OverflowError:
            raise InvalidInputError(
                f"input '{name}' for model '{m}' holds values out of range for {spec.datatype}"
            ) from None

    def requested_outputs(self, request: pb.ModelInferRequest) -> list[int]:
        if not request.outputs:
            return self._all_outputs
        picked = []
        for out in request.outputs:
            index = self._outputs.get(out.name)
            if index is None:
                raise InvalidInputError(f"unexpected inference output '{out.name}' for model '{self.name}'")
            picked.append(index)
        return picked

    def encode(
        self, request: pb.ModelInferRequest, result: InferResult, picked: list[int]
    ) -> pb.ModelInferResponse:
        tensors = []
        raw = []
        for i in picked:
            array = result.outputs[i]
            # The spec's dtypes are explicitly little-endian: anything else
            # (another width, big-endian) is converted, so the raw bytes below
            # are what the wire wants.
            if array.dtype != self._output_dtypes[i]:
                array = array.astype(self._output_dtypes[i])
            spec = self._output_specs[i]
            tensors.append(
                pb.ModelInferResponse.InferOutputTensor(
                    name=spec.name, datatype=spec.datatype, shape=array.shape
                )
            )
            raw.append(array.tobytes())  # row-major, whatever the array's strides
        return pb.ModelInferResponse(
            model_name=self.name,
            model_version=MODEL_VERSION,
            id=request.id,
            parameters={
                "queue_ms": pb.InferParameter(double_param=result.queue_ms),
                "compute_ms": pb.InferParameter(double_param=result.compute_ms),
                "batch_size": pb.InferParameter(int64_param=result.batch_size),
            },
            outputs=tensors,
            raw_output_contents=raw,
        )


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
        model = self._model(request.model_name, request.model_version)
        inputs, rows = model.decode(request)
        picked = model.requested_outputs(request)
        result = await model.scheduler.infer(inputs, rows, deadline)
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


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen must be HOST:PORT, got {listen!r}")
    return host, int(port)


class Worker:
    """Loads the variants, serves them over OIP gRPC, registers with the AP.

    ``await start()`` returns the bound address; ``await stop()`` shuts down
    gracefully. Usable in-process (tests) or through :func:`main`.
    """

    def __init__(
        self,
        config: WorkerConfig,
        log: FilteringBoundLogger | None = None,
        *,
        inline_below_ms: float = INLINE_BELOW_MS,
    ) -> None:
        if config.kind not in ("edge", "cloud"):
            raise ValueError(f"worker kind must be 'edge' or 'cloud', got {config.kind!r}")
        self.config = config
        self.log = (log or make_logger()).bind(kind=config.kind, cluster=config.cluster)
        self.inline_below_ms = inline_below_ms
        self.models: dict[str, Model] = {}
        self.slots: Slots | None = None
        self.address = ""
        self.worker_id = ""
        self.registrar: Registrar | None = None
        self._server: grpc.aio.Server | None = None
        self._servicer: InferenceServicer | None = None
        self._stopping = False
        self._stopped = asyncio.Event()

    # Start-up ------------------------------------------------------------

    def _load_models(self, slots: Slots) -> dict[str, Model]:
        config = self.config
        manifest = load_manifest(config.models)
        models: dict[str, Model] = {}
        for name in config.variants:
            try:
                variant = manifest.variant(name)
            except KeyError as err:
                raise ValueError(str(err.args[0])) from None
            path = manifest.path(variant)
            runtime = self._make_runtime(variant, path)
            runtime.load()
            ms_1 = runtime.warmup(1)
            ms_max = runtime.warmup(runtime.max_batch_size)
            scheduler: Scheduler
            if config.kind == "cloud":
                from workers.cloud import BatchingScheduler

                scheduler = BatchingScheduler(
                    runtime,
                    slots,
                    max_batch_size=config.max_batch_size,
                    max_wait_ms=config.max_wait_ms,
                )
                mode = "batching"
            else:
                inline = ms_max < self.inline_below_ms
                scheduler = DirectScheduler(runtime, slots, inline=inline)
                mode = "inline" if inline and not slots.emulates() else "thread"
            models[name] = Model(runtime, scheduler, max_batch_size=config.max_batch_size)
            self.log.info(
                "model_loaded",
                model=name,
                platform=runtime.platform,
                mode=mode,
                measured_ms_batch1=round(ms_1, 4),
                measured_ms_batch_max=round(ms_max, 4),
                max_batch_size=config.max_batch_size,
                manifest_ms_batch1=variant.latency_ms_batch1,
            )
        return models

    def _make_runtime(self, variant: Variant, path: Path) -> Runtime:
        config = self.config
        if variant.runtime == "onnx":
            from workers.edge import OnnxRuntime

            return OnnxRuntime(variant, path, max_batch_size=config.max_batch_size)
        if variant.runtime == "torch":
            if config.kind != "cloud":
                raise ValueError(
                    f"variant '{variant.name}' needs PyTorch: serve it from a cloud worker"
                    " (edge workers run ONNX variants only)"
                )
            from workers.cloud import TorchRuntime, configure_threads

            configure_threads(config.slots)
            return TorchRuntime(variant, path, max_batch_size=config.max_batch_size, device=config.device)
        raise ValueError(f"variant '{variant.name}' has unknown runtime {variant.runtime!r}")

    async def start(self) -> str:
        """Load, bind, serve, register; returns the bound ``host:port``."""
        config = self.config
        if not config.variants:
            raise ValueError("no variants to serve")
        host, _ = _split_listen(config.listen)
        slots = Slots(config.slots, slowdown=config.slowdown)
        self.slots = slots
        self.models = self._load_models(slots)
        for model in self.models.values():
            model.scheduler.start()

        servicer = InferenceServicer(self.models, self.log, link_delay_ms=config.link_delay_ms)
        server = grpc.aio.server(options=list(GRPC_OPTIONS))
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        try:
            port = server.add_insecure_port(config.listen)
        except RuntimeError as err:
            raise OSError(f"cannot listen on {config.listen}: {err}") from None
        if port == 0:
            raise OSError(f"cannot listen on {config.listen}")
        await server.start()
        self._server, self._servicer = server, servicer
        self.address = f"{host}:{port}"
        self.worker_id = config.worker_id or f"{config.kind}-{config.cluster}-{port}"
        self.log = self.log.bind(worker_id=self.worker_id)
        servicer.log = self.log
        servicer.ready = True
        # One line a parent process can wait for; the logger flushes each line.
        self.log.info(
            "serving",
            address=self.address,
            variants=list(self.models),
            slots=config.slots,
            slowdown=config.slowdown,
            link_delay_ms=config.link_delay_ms,
        )
        if config.ap:
            self.registrar = Registrar(
                config.ap,
                self.register_request(),
                self.log,
                heartbeat_s=config.heartbeat_s,
            )
            self.registrar.start()
        return self.address

    def advertised_address(self) -> str:
        if self.config.advertise:
            return self.config.advertise
        host, port = _split_listen(self.address)
        if host in ("", "0.0.0.0", "[::]", "::"):
            # A wildcard bind is reachable under this machine's name.
            host = socket.gethostname()
        return f"{host}:{port}"

    def register_request(self) -> dpb.RegisterRequest:
        config = self.config
        factor = max(1.0, config.slowdown)
        return dpb.RegisterRequest(
            worker_id=self.worker_id,
            address=self.advertised_address(),
            cluster=config.cluster,
            kind=config.kind,
            slots=config.slots,
            link_delay_ms=config.link_delay_ms,
            streaming=True,
            variants=[
                dpb.VariantInfo(
                    name=m.name,
                    task=m.variant.task,
                    accuracy=m.variant.accuracy,
                    latency_ms=m.variant.latency_ms_batch1 * factor,
                    latency_ms_batch8=m.variant.latency_ms_batch8 * factor,
                    inputs=_specs(m.variant.inputs),
                    outputs=_specs(m.variant.outputs),
                    max_batch_size=m.max_batch_size,
                )
                for m in self.models.values()
            ],
        )

    # Shut-down -------------------------------------------------------------

    async def stop(self, grace: float | None = None, force: asyncio.Event | None = None) -> bool:
        """Deregister, stop accepting, let in-flight requests finish within ``grace`` seconds.

        Setting ``force`` cuts the grace period short. Returns False when forced.
        """
        if self._stopping:
            await self._stopped.wait()
            return True
        self._stopping = True
        graceful = True
        grace = self.config.shutdown_grace_s if grace is None else grace
        slots = self.slots
        self.log.info(
            "stopping",
            grace_s=grace,
            running=slots.busy if slots else 0,
            queued=slots.waiting if slots else 0,
        )
        if self._servicer is not None:
            self._servicer.ready = False
        if self.registrar is not None:
            await self.registrar.stop()
        if self._server is not None:
            stopping = asyncio.ensure_future(self._server.stop(grace))
            if force is not None:
                forced = asyncio.ensure_future(force.wait())
                await asyncio.wait({stopping, forced}, return_when=asyncio.FIRST_COMPLETED)
                if not stopping.done():
                    graceful = False
                    self.log.warning("forced_stop")
                    await self._server.stop(None)
                forced.cancel()
            await stopping
        for model in self.models.values():
            await model.scheduler.close()
            model.runtime.unload()
        if self.slots is not None:
            self.slots.close()
        self.log.info("stopped", graceful=graceful)
        self._stopped.set()
        return graceful

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _specs(specs: Iterable[TensorSpec]) -> list[dpb.TensorSpec]:
    return [dpb.TensorSpec(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in specs]


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    """The WorkerConfig for ``apdispatch worker edge|cloud`` flags."""
    variants = tuple(v.strip() for v in str(args.variants).split(",") if v.strip())
    defaults = WorkerConfig(kind=args.kind, listen=args.listen, models=Path(args.models), variants=variants)
    return WorkerConfig(
        kind=args.kind,
        listen=args.listen,
        models=Path(args.models),
        variants=variants,
        ap=args.ap or None,
        cluster=args.cluster,
        slots=args.slots,
        slowdown=args.slowdown,
        link_delay_ms=args.link_delay_ms,
        worker_id=args.worker_id or None,
        advertise=args.advertise or None,
        max_batch_size=getattr(args, "max_batch_size", defaults.max_batch_size),
        max_wait_ms=getattr(args, "max_wait_ms", defaults.max_wait_ms),
        device=getattr(args, "device", defaults.device),
    )


async def serve(config: WorkerConfig, log: FilteringBoundLogger) -> int:
    """Run a worker until SIGINT/SIGTERM; a second signal cuts the grace period short."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    force = asyncio.Event()
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        if len(received) == 1:
            log.info("shutdown_requested", signal=sig.name)
            stop.set()
        else:
            log.warning("forced_exit_requested", signal=sig.name)
            force.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    worker = Worker(config, log)
    try:
        try:
            await worker.start()
        except (OSError, ValueError, KeyError) as err:
            # Expected failures (a taken port, a missing zoo, an unknown variant): one line.
            log.error("startup_failed", error=str(err))
            await worker.stop(grace=0)
            return 1
        except Exception:
            log.exception("startup_failed")
            await worker.stop(grace=0)
            return 1
        await stop.wait()
        graceful = await worker.stop(config.shutdown_grace_s, force=force)
        return 0 if graceful else 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``apdispatch worker edge|cloud``."""
    log = make_logger(args.log_level, args.log_format)
    try:
        config = config_from_args(args)
    except ValueError as err:
        log.error("bad_arguments", error=str(err))
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(serve(config, log))
    return 130
