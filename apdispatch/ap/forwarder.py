"""Sends requests to workers over the Open Inference Protocol and hands back replies.

Requests for the same variant of the same worker that arrive within one turn
of the event loop are coalesced into one OIP request: raw contents are
row-major with the batch dimension first, so joining the requests' bytes *is*
the batched tensor, and slicing the reply's bytes gives each request its rows.
Nothing is decoded or re-encoded. Under load this divides the messages per
request on the AP-to-worker hop by the batch size; alone, a request goes out in
the same loop turn it arrived in.

Two transports, per worker:

- ``stream``: one long-lived ModelStreamInfer call (Triton's streaming
  extension) carries every batch to that worker, replies matched by id. Per
  request this costs a message on an open stream instead of a whole unary call.
  The time left travels as Triton's ``timeout`` parameter (microseconds).
- ``unary``: one ModelInfer per batch, the time left as the gRPC deadline;
  works with any OIP server.

Completion is a callback, not a task per request: the AP's cost per request is
a few dictionary operations and one timer.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import structlog

from apdispatch.common import confidence
from apdispatch.common.errors import ApdispatchError, InvalidRequestError, NotFoundError, UnavailableError
from apdispatch.common.protocol import oip_pb2, oip_pb2_grpc

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
]

_INT64_MAX = 2**63 - 1


class DeadlineReached(Exception):
    """The worker did not answer before the request's deadline."""


class LinkFailed(UnavailableError):
    """The link to the worker broke, or could not be opened: the worker is unreachable."""


@dataclass(frozen=True, slots=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class WorkerReply:
    outputs: tuple[OutputTensor, ...]
    queue_ms: float
    compute_ms: float
    batch: int  # requests coalesced into the OIP request that carried this one
    sent_at: float  # when the batch left the AP (monotonic)
    # A classifier's confidence in this request's answer (its least confident row), when the
    # worker reports one; None otherwise.
    confidence: float | None = None


Done = Callable[[WorkerReply | BaseException], None]


@dataclass(slots=True, eq=False)
class _Entry:
    inputs: Sequence[tuple[str, tuple[int, ...], bytes]]  # datatype, shape, data per input
    rows: int
    deadline: float  # monotonic
    done: Done
    timer: asyncio.TimerHandle | None = None
    finished: bool = False


@dataclass(slots=True, eq=False)
class _Batch:
    variant: str
    names: tuple[str, ...]
    entries: list[_Entry] = field(default_factory=list)
    rows: int = 0


def _worker_error(address: str, code: grpc.StatusCode, details: str) -> ApdispatchError:
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError("inputs", details)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(f"variant: {details}")
    return UnavailableError(f"worker {address}: {code.name}: {details}")


def _stream_error(address: str, reply: oip_pb2.ModelStreamInferResponse) -> BaseException:
    """A worker's per-message error on a stream, by the status it names (a ``status`` parameter)."""
    params = reply.infer_response.parameters
    name = params["status"].string_param if "status" in params else ""
    code = grpc.StatusCode.__members__.get(name, grpc.StatusCode.UNKNOWN)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineReached()
    return _worker_error(address, code, reply.error_message)


def _own_confidence(outputs: list[OutputTensor]) -> float | None:
    """The least confident row of a classifier's logits (one FP32 output of shape (rows, classes))."""
    if len(outputs) != 1 or outputs[0].datatype != "FP32" or len(outputs[0].shape) != 2:
        return None
    out = outputs[0]
    logits = np.frombuffer(out.data, dtype="<f4").reshape(out.shape)
    return confidence.answer_confidence(logits)


def _param(params: object, key: str) -> float:
    value = params.get(key)  # type: ignore[attr-defined]
    return float(value.double_param) if value is not None else 0.0


class WorkerLink:
    """The AP's connection to one worker."""

    def __init__(
        self,
        address: str,
        streaming: bool,
        log: structlog.typing.FilteringBoundLogger,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.address = address
        self.streaming = streaming
        self._log = log.bind(worker_address=address)
        self._loop = asyncio.get_running_loop()
        # Credentials: mutual TLS to the worker; None: plaintext (local development).
        self._channel = (
            grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
            if credentials is not None
            else grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        )
        self._stub = oip_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._ids = itertools.count()
        self._open: dict[tuple[object, ...], _Batch] = {}
        self._flush_scheduled = False
        self._sent: dict[str, tuple[_Batch, float]] = {}
        self._outbox: asyncio.Queue[oip_pb2.ModelInferRequest | None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._unary_calls: set[asyncio.Task[None]] = set()
        self._sending = True  # False once draining: nothing new goes out

    def submit(
        self,
        variant: str,
        names: tuple[str, ...],
        inputs: Sequence[tuple[str, tuple[int, ...], bytes]],
        max_batch: int,
        deadline: float,
        done: Done,
    ) -> None:
        """Queue one request; ``done`` gets a WorkerReply, DeadlineReached or an ApdispatchError."""
        rows = inputs[0][1][0]
        entry = _Entry(inputs, rows, deadline, done)
        entry.timer = self._loop.call_at(deadline, self._expire, entry)
        # Only requests whose tensors agree beyond the batch dimension can share a batch.
        key = (variant, *((dtype, shape[1:]) for dtype, shape, _ in inputs))
        batch = self._open.get(key)
        if batch is not None and batch.rows + rows > max_batch:
            self._send(self._open.pop(key))
            batch = None
        if batch is None:
            batch = self._open[key] = _Batch(variant, names)
        batch.entries.append(entry)
        batch.rows += rows
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batches, self._open = self._open, {}
        for batch in batches.values():
            self._send(batch)

    def _send(self, batch: _Batch) -> None:
        live = [e for e in batch.entries if not e.finished]
        if not live:
            return
        batch.entries = live
        if not self._sending:
            self._fail(batch, LinkFailed(f"worker {self.address}: draining"))
            return
        request = oip_pb2.ModelInferRequest(model_name=batch.variant, id=str(next(self._ids)))
        first = live[0]
        rows = sum(e.rows for e in live)
        for i, (dtype, shape, _) in enumerate(first.inputs):
            request.inputs.add(name=batch.names[i], datatype=dtype, shape=(rows, *shape[1:]))
            request.raw_input_contents.append(
                first.inputs[i][2] if len(live) == 1 else b"".join(e.inputs[i][2] for e in live)
            )
        now = time.monotonic()
        timeout_s = max(1e-4, max(e.deadline for e in live) - now)
        if self.streaming:
            if self._reader is None:
                self._open_stream()
            assert self._outbox is not None
            # Within int64 whatever the deadline: a value out of range raised inside the flush.
            request.parameters["timeout"].int64_param = min(max(1, int(timeout_s * 1e6)), _INT64_MAX)
            self._sent[request.id] = (batch, now)
            self._outbox.put_nowait(request)
        else:
            task = self._loop.create_task(self._unary(request, batch, timeout_s, now))
            self._unary_calls.add(task)
            task.add_done_callback(self._unary_calls.discard)

    async def _unary(
        self, request: oip_pb2.ModelInferRequest, batch: _Batch, timeout_s: float, sent_at: float
    ) -> None:
        try:
            reply = await self._stub.ModelInfer(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self._fail(batch, DeadlineReached())
            elif exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._fail(batch, LinkFailed(f"worker {self.address}: UNAVAILABLE: {exc.details() or ''}"))
            else:
                self._fail(batch, _worker_error(self.address, exc.code(), exc.details() or ""))
            return
        self._deliver(batch, reply, sent_at)

    def _expire(self, entry: _Entry) -> None:
        if not entry.finished:
            entry.finished = True
            entry.done(DeadlineReached())

    def _fail(self, batch: _Batch, error: BaseException) -> None:
        for entry in batch.entries:
            if not entry.finished:
                entry.finished = True
                if entry.timer is not None:
                    entry.timer.cancel()
                entry.done(error)

    def _deliver(self, batch: _Batch, reply: oip_pb2.ModelInferResponse, sent_at: float) -> None:
        queue_ms = _param(reply.parameters, "queue_ms")
        compute_ms = _param(reply.parameters, "compute_ms")
        reported = reply.parameters.get(confidence.PARAMETER)
        entries = batch.entries
        total_rows = sum(e.rows for e in entries)
        tensors = list(zip(reply.outputs, reply.raw_output_contents, strict=False))
        offset = 0
        for entry in entries:
            rows = entry.rows
            if not entry.finished:
                entry.finished = True
                if entry.timer is not None:
                    entry.timer.cancel()
                outputs = []
                for tensor, raw in tensors:
                    if len(entries) == 1:
                        data = raw
                    else:
                        row_bytes = len(raw) // total_rows
                        data = raw[offset * row_bytes : (offset + rows) * row_bytes]
                    shape = (rows, *tensor.shape[1:])
                    outputs.append(OutputTensor(tensor.name, tensor.datatype, shape, data))
                sure = None
                if reported is not None:
                    # The worker's figure covers the whole batch: a request coalesced with others
                    # gets its own rows', from the same logits by the same formula.
                    sure = reported.double_param if len(entries) == 1 else _own_confidence(outputs)
                entry.done(WorkerReply(tuple(outputs), queue_ms, compute_ms, len(entries), sent_at, sure))
            offset += rows

    def _open_stream(self) -> None:
        outbox: asyncio.Queue[oip_pb2.ModelInferRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[oip_pb2.ModelInferRequest]:
            while (item := await outbox.get()) is not None:
                yield item

        call = self._stub.ModelStreamInfer(requests())
        self._outbox = outbox
        self._reader = self._loop.create_task(self._read(call, outbox))

    async def _read(
        self,
        call: grpc.aio.StreamStreamCall,
        outbox: asyncio.Queue[oip_pb2.ModelInferRequest | None],
    ) -> None:
        # The stream ended with replies still owed: the worker is gone or going.
        error: BaseException = LinkFailed(f"worker {self.address}: stream closed")
        try:
            async for reply in call:
                inner = reply.infer_response
                sent = self._sent.pop(inner.id, None)
                if sent is None:
                    continue
                batch, sent_at = sent
                if reply.error_message:
                    self._fail(batch, _stream_error(self.address, reply))
                else:
                    self._deliver(batch, inner, sent_at)
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            error = LinkFailed(f"worker {self.address}: stream broke: {exc.code().name}: {details}")
            self._log.warning("worker stream broke", code=exc.code().name, details=exc.details())
        except asyncio.CancelledError:
            pass
        finally:
            # Whatever was waiting on this stream fails now; the next request
            # opens a new one.
            if self._outbox is outbox:
                self._outbox = None
                self._reader = None
            outbox.put_nowait(None)
            sent_batches, self._sent = self._sent, {}
            for batch, _ in sent_batches.values():
                self._fail(batch, error)

    async def drain(self, timeout_s: float) -> None:
        """Send what is queued, then nothing more; wait (at most ``timeout_s``) for the replies owed; close.

        On a stream, this half-closes it: the worker answers what it has,
        then ends the stream, and no request in flight fails.
        """
        self._flush()
        self._sending = False
        if self._outbox is not None:
            self._outbox.put_nowait(None)
        waiting = [t for t in (self._reader, *self._unary_calls) if t is not None]
        if waiting:
            await asyncio.wait(waiting, timeout=timeout_s)
        await self.close()

    def owed_s(self) -> float:
        """Seconds until the last deadline of the requests sent and not answered (0 when none)."""
        deadlines = [e.deadline for batch, _ in self._sent.values() for e in batch.entries if not e.finished]
        return max(0.0, max(deadlines, default=0.0) - time.monotonic())

    async def probe(self, timeout_s: float) -> bool:
        """Whether the worker answers OIP ServerReady with ready, within ``timeout_s``."""
        try:
            reply = await self._stub.ServerReady(oip_pb2.ServerReadyRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.ready)

    async def close(self) -> None:
        self._flush()
        if self._outbox is not None:
            self._outbox.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
        for task in list(self._unary_calls):
            task.cancel()
        await self._channel.close()


class Forwarder:
    """Keeps one WorkerLink per worker address."""

    def __init__(
        self,
        mode: str,
        log: structlog.typing.FilteringBoundLogger,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._mode = mode
        self._log = log
        self._credentials = credentials
        self._links: dict[str, WorkerLink] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    def link(self, address: str, streaming: bool) -> WorkerLink:
        link = self._links.get(address)
        if link is None:
            link = WorkerLink(address, streaming and self._mode == "stream", self._log, self._credentials)
            self._links[address] = link
        return link

    async def drop(self, address: str) -> None:
        link = self._links.pop(address, None)
        if link is not None:
            await link.close()

    def retire(self, address: str, slack_s: float = 1.0) -> None:
        """Stop sending to a worker that leaves, and close its link once it has answered what it owes.

        In the background: the replies owed may take until their deadlines
        (plus ``slack_s``). A request routed to the address later gets a new link.
        """
        link = self._links.pop(address, None)
        if link is None:
            return
        task = asyncio.get_running_loop().create_task(link.drain(link.owed_s() + slack_s))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def probe(self, address: str, streaming: bool, timeout_s: float) -> bool:
        """Whether the worker at ``address`` is ready (OIP ServerReady), over its link."""
        return await self.link(address, streaming).probe(timeout_s)

    async def close(self) -> None:
        links, self._links = self._links, {}
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(
            *(link.close() for link in links.values()), *self._retiring, return_exceptions=True
        )
