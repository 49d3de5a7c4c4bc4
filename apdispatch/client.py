"""Client SDK for the access point's Dispatcher API.

``Client`` (blocking) and ``AsyncClient`` (asyncio, ``grpc.aio``) send SLA-tagged
inference requests and return :class:`Result` objects.

Unary calls (``infer``) end in a Result for the outcomes ``ok``, ``late`` and
``inaccurate``, and raise for everything else: :class:`RejectedError` (no target
can meet the SLA), :class:`InvalidRequestError`, :class:`NotFoundError`,
:class:`UnavailableError` (the AP or its worker cannot be reached). Streams
(``stream``, ``open_stream``) never raise per request: a rejected or failed
request comes back as a Result with that outcome and ``error`` set, so one bad
frame does not end a camera's stream.

The deadline is the application's: an ``ok`` reply that reaches the client after
the request's deadline, counted from when it was handed to the SDK, comes back
``late`` (with ``late_at_client`` set), as a gRPC client's deadline would end it.

Example::

    with Client("127.0.0.1:50051") as client:
        r = client.infer("digits", x[0:1], deadline_ms=50, min_accuracy=0.9)
        print(r.outcome, r.output.argmax(), r.served_by)
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType, TracebackType
from typing import Any, Final, Self

import grpc
import grpc.aio
import numpy as np
import numpy.typing as npt

from apdispatch.common import tensors
from apdispatch.common.errors import (
    ApdispatchError,
    InvalidRequestError,
    UnavailableError,
    from_status,
)
from apdispatch.common.outcomes import FROM_PROTO, OUTCOMES, SERVED, Outcome
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.common.protocol import dispatcher_pb2_grpc as pb_grpc
from apdispatch.common.tls import TLSFiles, aio_channel, sync_channel

__all__ = [
    "DEFAULT_ADDRESS",
    "OUTCOMES",
    "AsyncClient",
    "AsyncStream",
    "Client",
    "Result",
    "StreamItem",
    "StreamRequest",
    "Target",
    "Timings",
    "build_request",
    "decode_response",
    "encode_inputs",
]

DEFAULT_ADDRESS: Final = "127.0.0.1:50051"
DEFAULT_TIMEOUT_MARGIN_MS: Final = 1000.0
INPUT_NAME: Final = "input"

_STATUS_BY_INT: Final = MappingProxyType({c.value[0]: c for c in grpc.StatusCode})

# Images can exceed gRPC's 4 MiB default receive limit; the AP passes tensors
# through, so the client accepts whatever it sends.
_DEFAULT_CHANNEL_OPTIONS: Final = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
)

# The AP's default max_message_bytes: it refuses a bigger request with
# RESOURCE_EXHAUSTED, so the client refuses it before sending, naming the input.
MAX_REQUEST_BYTES: Final = 16 * 1024 * 1024

Inputs = npt.ArrayLike | Mapping[str, npt.ArrayLike]


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request ran: a (worker, variant) pair and the worker's cluster."""

    worker: str
    variant: str
    cluster: str
    accuracy: float

    @property
    def key(self) -> str:
        """``cluster/worker/variant``, a stable label for counting."""
        return f"{self.cluster}/{self.worker}/{self.variant}"


@dataclass(frozen=True, slots=True)
class Timings:
    """Where the time went, as measured by the AP (all in milliseconds)."""

    queue_ms: float = 0.0
    network_ms: float = 0.0
    compute_ms: float = 0.0
    total_ms: float = 0.0


_NO_TIMINGS: Final = Timings()


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one request.

    ``outputs`` are read-only numpy views over the reply's bytes. ``status_code``
    is the integer gRPC status of a rejected or failed request (0 otherwise).
    """

    request_id: str
    outcome: Outcome
    outputs: dict[str, np.ndarray]
    served_by: Target | None
    timings: Timings
    error: str = ""
    status_code: int = 0
    # The AP answered ok, and the reply reached this client after the deadline: outcome is late.
    late_at_client: bool = False
    # A classifier's confidence in its answer (top softmax probability), when the worker reports one.
    confidence: float | None = None
    # The answer came from a cascade's second step (the light variant's first answer was unsure).
    escalated: bool = False

    @property
    def output(self) -> np.ndarray:
        """The single output array; ValueError when there is not exactly one."""
        if len(self.outputs) != 1:
            if not self.outputs:
                why = f": {self.error}" if self.error else ""
                raise ValueError(f"request {self.request_id!r} ({self.outcome}) has no output{why}")
            names = ", ".join(sorted(self.outputs))
            raise ValueError(f"request {self.request_id!r} has several outputs: {names}")
        return next(iter(self.outputs.values()))

    @property
    def served(self) -> bool:
        """True for ok, late and inaccurate: a worker ran the request."""
        return self.outcome in SERVED

    def exception(self) -> ApdispatchError | None:
        """The exception a unary call would have raised, or None when served."""
        if self.outcome not in (Outcome.REJECTED, Outcome.FAILED):
            return None
        code = _STATUS_BY_INT.get(self.status_code)
        if code is None or code is grpc.StatusCode.OK:
            # A reply without a usable status: rejected is by definition
            # RESOURCE_EXHAUSTED; anything else is an unspecified failure.
            code = (
                grpc.StatusCode.RESOURCE_EXHAUSTED
                if self.outcome == Outcome.REJECTED
                else grpc.StatusCode.UNKNOWN
            )
        return from_status(code, self.error or self.outcome, request_id=self.request_id)


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """One request on a stream; tuples in the same field order are accepted too."""

    task: str
    inputs: Inputs
    deadline_ms: float
    min_accuracy: float = 0.0
    app: str = ""
    request_id: str | None = None
    variant: str | None = None


StreamItem = StreamRequest | tuple[Any, ...] | pb.InferRequest


class _IdFactory:
    """Request ids unique per client: a random prefix plus a counter.

    ``next`` on itertools.count is atomic under the GIL, so the sync client can
    share one factory between threads.
    """

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(4).hex()
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}-{next(self._counter)}"


def encode_inputs(inputs: Inputs) -> list[pb.Tensor]:
    """Tensors for ``inputs``: one array (named ``input``) or a mapping name -> array."""
    items = inputs.items() if isinstance(inputs, Mapping) else ((INPUT_NAME, inputs),)
    out = []
    for name, value in items:
        array = value if isinstance(value, np.ndarray) else np.asarray(value)
        _check_size(f"inputs.{name}", array.nbytes, array.nbytes)
        try:
            out.append(tensors.to_tensor(name, array))
        except TypeError as exc:
            raise InvalidRequestError(f"inputs.{name}", str(exc)) from None
    if not out:
        raise InvalidRequestError("inputs", "at least one input is needed")
    return out


def _check_size(field: str, nbytes: int, request_bytes: int) -> None:
    if request_bytes > MAX_REQUEST_BYTES:
        raise InvalidRequestError(
            field,
            f"{nbytes} bytes (a request of {request_bytes} bytes) is over the limit of "
            f"{MAX_REQUEST_BYTES} bytes a request may have (the AP's max_message_bytes)",
        )


def _check_sla(deadline_ms: float, min_accuracy: float) -> None:
    # Checked here as well as at the AP: the client's own gRPC timeout derives
    # from the deadline, and a bad deadline would otherwise surface as a
    # confusing DEADLINE_EXCEEDED instead of the AP's INVALID_ARGUMENT.
    if not (deadline_ms > 0 and math.isfinite(deadline_ms)):
        raise InvalidRequestError("sla.deadline_ms", "must be > 0")
    if not 0.0 <= min_accuracy <= 1.0:
        raise InvalidRequestError("sla.min_accuracy", "must be in [0, 1]")


def build_request(
    task: str,
    inputs: Inputs,
    *,
    deadline_ms: float,
    min_accuracy: float = 0.0,
    app: str = "",
    request_id: str = "",
    variant: str | None = None,
) -> pb.InferRequest:
    """The wire message for one request (validated as far as the client can)."""
    _check_sla(deadline_ms, min_accuracy)
    request = pb.InferRequest(
        task=task,
        inputs=encode_inputs(inputs),
        sla=pb.SLA(deadline_ms=deadline_ms, min_accuracy=min_accuracy),
        request_id=request_id,
        app=app,
        variant=variant or "",
    )
    largest = max(request.inputs, key=lambda t: len(t.data))
    _check_size(f"inputs.{largest.name}", len(largest.data), request.ByteSize())
    return request


def decode_outputs(response: pb.InferResponse) -> dict[str, np.ndarray]:
    outputs: dict[str, np.ndarray] = {}
    for t in response.outputs:
        try:
            outputs[t.name] = tensors.from_tensor(t)
        except (KeyError, ValueError) as exc:
            raise ApdispatchError(
                f"outputs.{t.name}: cannot decode {t.datatype} {list(t.shape)}: {exc}",
                request_id=response.request_id,
            ) from None
    return outputs


def decode_response(response: pb.InferResponse) -> Result:
    """A Result for one reply, outputs as numpy views."""
    outcome = FROM_PROTO.get(response.outcome)
    error = response.error
    if outcome is None:
        outcome = Outcome.FAILED
        error = error or f"reply without an outcome ({response.outcome})"
    served_by = None
    if response.HasField("served_by"):
        s = response.served_by
        served_by = Target(s.worker, s.variant, s.cluster, s.accuracy)
    timings = _NO_TIMINGS
    if response.HasField("timings"):
        t = response.timings
        timings = Timings(t.queue_ms, t.network_ms, t.compute_ms, t.total_ms)
    return Result(
        request_id=response.request_id,
        outcome=outcome,
        outputs=decode_outputs(response),
        served_by=served_by,
        timings=timings,
        error=error,
        status_code=response.status_code,
        confidence=response.confidence if response.HasField("confidence") else None,
        escalated=response.escalated,
    )


def _due(request: pb.InferRequest, clock: Callable[[], float]) -> float:
    """When ``request``, sent now, falls due on the client's clock."""
    return clock() + request.sla.deadline_ms / 1000.0


def _judged(result: Result, due: float, clock: Callable[[], float]) -> Result:
    """``result`` as the application sees it: an ok that arrived after ``due`` is late."""
    if result.outcome is not Outcome.OK:
        return result
    over_ms = (clock() - due) * 1000.0
    if over_ms <= 0:
        return result
    return replace(
        result,
        outcome=Outcome.LATE,
        late_at_client=True,
        error=f"answered ok by the AP; the reply arrived {over_ms:.1f} ms after the deadline",
    )


class _Deadlines:
    """A stream's requests sent and not answered yet, with when each falls due."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._due: dict[str, float] = {}

    def sent(self, request: pb.InferRequest) -> None:
        self._due.setdefault(request.request_id, _due(request, self._clock))

    def judge(self, result: Result) -> Result:
        due = self._due.pop(result.request_id, None)
        return result if due is None else _judged(result, due, self._clock)


def _stream_request(item: StreamItem, new_id: _IdFactory) -> pb.InferRequest:
    """The wire message of one stream item; always with a request id."""
    if isinstance(item, pb.InferRequest):
        if item.request_id:
            return item
        # A copy: the caller's message may be a template sent many times.
        copy = pb.InferRequest()
        copy.CopyFrom(item)
        copy.request_id = new_id()
        return copy
    req = item if isinstance(item, StreamRequest) else StreamRequest(*item)
    return build_request(
        req.task,
        req.inputs,
        deadline_ms=req.deadline_ms,
        min_accuracy=req.min_accuracy,
        app=req.app,
        request_id=req.request_id or new_id(),
        variant=req.variant,
    )


def _rpc_error(exc: grpc.RpcError, request_id: str = "") -> ApdispatchError:
    """The SDK exception for a failed call; works for sync and aio errors."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(code)
    return from_status(code, details, request_id=request_id)


def _timeout_error(deadline_ms: float, margin_ms: float, request_id: str) -> ApdispatchError:
    # The AP answers LATE by the deadline; no reply within deadline + margin
    # means the AP itself is stuck or too slow to answer at all.
    return from_status(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"no reply from the AP within {deadline_ms + margin_ms:.0f} ms "
        f"(deadline {deadline_ms:g} ms + margin {margin_ms:g} ms)",
        request_id=request_id,
    )


class _Client:
    """What both clients share: options and request building."""

    def __init__(self, address: str, timeout_margin_ms: float, clock: Callable[[], float]) -> None:
        if timeout_margin_ms < 0:
            raise ValueError("timeout_margin_ms must be >= 0")
        self.address = address
        self.timeout_margin_ms = float(timeout_margin_ms)
        self._new_id = _IdFactory()
        self._clock = clock

    def _request(
        self,
        task: str,
        inputs: Inputs,
        deadline_ms: float,
        min_accuracy: float,
        app: str,
        request_id: str | None,
        variant: str | None,
    ) -> tuple[pb.InferRequest, float]:
        req = build_request(
            task,
            inputs,
            deadline_ms=deadline_ms,
            min_accuracy=min_accuracy,
            app=app,
            request_id=request_id or self._new_id(),
            variant=variant,
        )
        return req, (deadline_ms + self.timeout_margin_ms) / 1000.0

    def _unary_result(self, response: pb.InferResponse, due: float) -> Result:
        result = _judged(decode_response(response), due, self._clock)
        # Unary calls raise for rejected/failed; an AP that answers them as a
        # reply instead of a status still gets the same treatment.
        exc = result.exception()
        if exc is not None:
            raise exc
        return result


def _tls(ca: str | None, cert: str | None, key: str | None) -> TLSFiles | None:
    """TLS when any file is named: ``ca`` checks the AP (default: the system's roots);
    ``cert`` + ``key`` are presented when the AP asks every caller for a certificate."""
    if not (ca or cert or key):
        return None
    try:
        return TLSFiles(ca=str(ca or ""), cert=str(cert or ""), key=str(key or ""))
    except ValueError as exc:
        raise ValueError(f"cert, key: {exc}") from None


def _channel_options(extra: Iterable[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    options = dict(_DEFAULT_CHANNEL_OPTIONS)
    options.update(extra or ())
    return list(options.items())


class Client(_Client):
    """Blocking client; one channel, reused by every call. Thread-safe."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout_margin_ms: float = DEFAULT_TIMEOUT_MARGIN_MS,
        channel_options: Iterable[tuple[str, Any]] | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        token: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(address, timeout_margin_ms, clock)
        self._channel = sync_channel(
            address, _tls(ca, cert, key), token, options=_channel_options(channel_options)
        )
        stub = pb_grpc.DispatcherStub(self._channel)
        self._infer = stub.Infer
        self._infer_stream = stub.InferStream

    def wait_ready(self, timeout_s: float = 5.0) -> None:
        """Block until the AP accepts connections; UnavailableError after ``timeout_s``."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise UnavailableError(
                f"AP at {self.address} unreachable: not ready within {timeout_s:g} s"
            ) from None

    def infer(
        self,
        task: str,
        inputs: Inputs,
        *,
        deadline_ms: float,
        min_accuracy: float = 0.0,
        app: str = "",
        request_id: str | None = None,
        variant: str | None = None,
    ) -> Result:
        """Run one request; a Result for ok/late/inaccurate, an exception otherwise."""
        req, timeout = self._request(task, inputs, deadline_ms, min_accuracy, app, request_id, variant)
        due = _due(req, self._clock)
        try:
            response = self._infer(req, timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                raise _timeout_error(deadline_ms, self.timeout_margin_ms, req.request_id) from exc
            raise _rpc_error(exc, req.request_id) from exc
        return self._unary_result(response, due)

    def stream(self, requests: Iterable[StreamItem], *, timeout_s: float | None = None) -> Iterator[Result]:
        """One client stream: Results in completion order, matched by ``request_id``.

        ``requests`` is consumed on a gRPC thread while replies are read here,
        so a slow reader never holds back sending. Requests without an id get
        one. Rejected and failed requests come back as Results; an exception
        is raised only when the whole stream fails (AP unreachable, ...).
        """
        new_id = self._new_id
        raised: list[BaseException] = []
        deadlines = _Deadlines(self._clock)

        def wire() -> Iterator[pb.InferRequest]:
            try:
                for item in requests:
                    request = _stream_request(item, new_id)
                    deadlines.sent(request)
                    yield request
            except Exception as exc:
                # gRPC would swallow this on its thread and just cancel the
                # call; keep it to re-raise on the reader's side.
                raised.append(exc)
                raise

        call = self._infer_stream(wire(), timeout=timeout_s)
        try:
            for response in call:
                yield deadlines.judge(decode_response(response))
        except grpc.RpcError as exc:
            if raised:
                raise raised[0] from None
            raise _rpc_error(exc) from exc
        finally:
            call.cancel()
        if raised:
            raise raised[0]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncStream:
    """One open client stream: send and read independently (open loop).

    ``send`` returns once the message is handed to gRPC; it never waits for a
    reply. Read replies with ``read()`` or ``async for``, best from another task.
    """

    def __init__(
        self, call: grpc.aio.StreamStreamCall, new_id: _IdFactory, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._call = call
        self._new_id = new_id
        self._writing_done = False
        self._deadlines = _Deadlines(clock)

    async def send(self, item: StreamItem) -> str:
        """Send one request (StreamRequest, tuple or InferRequest); its request id.

        Raises only when the stream itself has ended (the error says how).
        """
        req = _stream_request(item, self._new_id)
        self._deadlines.sent(req)
        try:
            await self._call.write(req)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, req.request_id) from exc
        except asyncio.InvalidStateError as exc:
            # gRPC raises this for writes after the call has ended.
            raise await self._ended_error(req.request_id) from exc
        except asyncio.CancelledError:
            self._raise_if_task_cancelled()
            raise await self._ended_error(req.request_id) from None
        return req.request_id

    async def done_writing(self) -> None:
        """No more requests; replies to the ones sent still come."""
        if self._writing_done:
            return
        self._writing_done = True
        try:
            await self._call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError):
            return  # the call has already ended; read() reports how
        except asyncio.CancelledError:
            self._raise_if_task_cancelled()

    async def read(self) -> Result | None:
        """The next reply as a Result, None at the end of the stream."""
        try:
            response = await self._call.read()
        except grpc.RpcError as exc:
            raise _rpc_error(exc) from exc
        except asyncio.CancelledError:
            self._raise_if_task_cancelled()
            raise await self._ended_error("") from None
        if response is grpc.aio.EOF:
            return None
        assert isinstance(response, pb.InferResponse)
        return self._deadlines.judge(decode_response(response))

    def __aiter__(self) -> AsyncIterator[Result]:
        return self._results()

    async def _results(self) -> AsyncIterator[Result]:
        while (result := await self.read()) is not None:
            yield result

    def cancel(self) -> bool:
        """End the stream now; replies not read yet are lost."""
        return self._call.cancel()

    def done(self) -> bool:
        return self._call.done()

    @staticmethod
    def _raise_if_task_cancelled() -> None:
        # grpc.aio raises CancelledError from read/write when the *call* was
        # cancelled locally (cancel() from another task); only a cancellation
        # of the running task itself should propagate as CancelledError.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError

    async def _ended_error(self, request_id: str) -> ApdispatchError:
        if not self._call.done():
            return UnavailableError("stream is closed for writing", request_id=request_id)
        code = await self._call.code()
        details = await self._call.details()
        if code is grpc.StatusCode.OK:
            return UnavailableError("stream has ended", request_id=request_id)
        return from_status(code, details or str(code), request_id=request_id)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._call.cancel()


class AsyncClient(_Client):
    """asyncio client over ``grpc.aio``; create it inside the running loop."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout_margin_ms: float = DEFAULT_TIMEOUT_MARGIN_MS,
        channel_options: Iterable[tuple[str, Any]] | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        token: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(address, timeout_margin_ms, clock)
        self._channel = aio_channel(
            address, _tls(ca, cert, key), token, options=_channel_options(channel_options)
        )
        stub = pb_grpc.DispatcherStub(self._channel)
        self._infer = stub.Infer
        self._infer_stream = stub.InferStream

    async def wait_ready(self, timeout_s: float = 5.0) -> None:
        """Wait until the AP accepts connections; UnavailableError after ``timeout_s``."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout_s)
        except TimeoutError:
            raise UnavailableError(
                f"AP at {self.address} unreachable: not ready within {timeout_s:g} s"
            ) from None

    async def infer(
        self,
        task: str,
        inputs: Inputs,
        *,
        deadline_ms: float,
        min_accuracy: float = 0.0,
        app: str = "",
        request_id: str | None = None,
        variant: str | None = None,
    ) -> Result:
        """Run one request; a Result for ok/late/inaccurate, an exception otherwise."""
        req, timeout = self._request(task, inputs, deadline_ms, min_accuracy, app, request_id, variant)
        due = _due(req, self._clock)
        try:
            response = await self._infer(req, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise _timeout_error(deadline_ms, self.timeout_margin_ms, req.request_id) from exc
            raise _rpc_error(exc, req.request_id) from exc
        return self._unary_result(response, due)

    def open_stream(self, *, timeout_s: float | None = None) -> AsyncStream:
        """A new client stream to write to and read from (see AsyncStream)."""
        return AsyncStream(self._infer_stream(timeout=timeout_s), self._new_id, self._clock)

    async def stream(
        self,
        requests: Iterable[StreamItem] | AsyncIterable[StreamItem],
        *,
        timeout_s: float | None = None,
    ) -> AsyncIterator[Result]:
        """One client stream: Results in completion order, matched by ``request_id``.

        Requests are sent from their own task while replies are yielded here.
        Rejected and failed requests come back as Results; an exception is raised
        only when the whole stream fails, or when ``requests`` raised.
        """
        stream = self.open_stream(timeout_s=timeout_s)
        raised: list[BaseException] = []

        async def writer() -> None:
            try:
                if isinstance(requests, AsyncIterable):
                    async for item in requests:
                        await stream.send(item)
                else:
                    for item in requests:
                        await stream.send(item)
                await stream.done_writing()
            except UnavailableError:
                # The stream ended under us; the reader sees why.
                pass
            except Exception as exc:
                raised.append(exc)
                stream.cancel()

        task = asyncio.create_task(writer())
        try:
            while True:
                try:
                    result = await stream.read()
                except ApdispatchError:
                    # The writer cancels the call when ``requests`` raised:
                    # that error, not CANCELLED, is what the caller needs.
                    if raised:
                        raise raised[0] from None
                    raise
                if result is None:
                    break
                yield result
            await task
            if raised:
                raise raised[0]
        finally:
            if not task.done():
                task.cancel()
            stream.cancel()

    async def close(self, grace_s: float | None = None) -> None:
        await self._channel.close(grace_s)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
