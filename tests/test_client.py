"""Unit tests of the client SDK.

Conversion and decoding are tested directly; calls go to a small real grpc.aio
server implementing the Dispatcher service with fixed replies and aborts: a
stand-in for the network peer, so that error mapping is tested on genuine gRPC
statuses. End-to-end tests against the real AP live elsewhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest

from apdispatch.client import (
    AsyncClient,
    Client,
    Result,
    StreamRequest,
    Target,
    Timings,
    build_request,
    decode_response,
    encode_inputs,
)
from apdispatch.common import tensors
from apdispatch.common.errors import (
    ApdispatchError,
    InvalidRequestError,
    NotFoundError,
    RejectedError,
    UnavailableError,
)
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.common.protocol import dispatcher_pb2_grpc as pb_grpc
from apdispatch.tools.processes import free_port

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

TARGET = pb.Target(worker="w1", variant="digits-small", cluster="edge-a", accuracy=0.96)

# task -> (status code, message) the fake answers unary calls with
ABORTS = {
    "reject": (grpc.StatusCode.RESOURCE_EXHAUSTED, "no target meets deadline_ms=1"),
    "invalid": (grpc.StatusCode.INVALID_ARGUMENT, "sla.deadline_ms: must be > 0"),
    "unknown": (grpc.StatusCode.NOT_FOUND, "task 'unknown': not found"),
    "down": (grpc.StatusCode.UNAVAILABLE, "worker w1 unreachable"),
    "internal": (grpc.StatusCode.INTERNAL, "boom"),
}


def _ok_reply(request: pb.InferRequest) -> pb.InferResponse:
    """Echo the inputs back as outputs named output0, output1, ..."""
    outputs = [
        pb.Tensor(name=f"output{i}", datatype=t.datatype, shape=t.shape, data=t.data)
        for i, t in enumerate(request.inputs)
    ]
    return pb.InferResponse(
        request_id=request.request_id,
        outcome=pb.OK,
        outputs=outputs,
        served_by=TARGET,
        timings=pb.Timings(queue_ms=0.5, network_ms=1.0, compute_ms=2.0, total_ms=3.5),
    )


class FakeDispatcher(pb_grpc.DispatcherServicer):
    def __init__(self) -> None:
        self.requests: list[pb.InferRequest] = []
        self.hang_time_remaining: list[float | None] = []  # the gRPC deadline as "hang" calls arrive

    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferResponse:
        self.requests.append(request)
        if request.task in ABORTS:
            code, message = ABORTS[request.task]
            await context.abort(code, message)
        if request.task == "hang":
            self.hang_time_remaining.append(context.time_remaining())
            await asyncio.sleep(10)
        if request.task == "late":
            return pb.InferResponse(request_id=request.request_id, outcome=pb.LATE, served_by=TARGET)
        if request.task == "reply-rejected":
            return pb.InferResponse(
                request_id=request.request_id,
                outcome=pb.REJECTED,
                status_code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                error="no target",
            )
        return _ok_reply(request)

    async def InferStream(
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.InferResponse]:
        replies: asyncio.Queue[pb.InferResponse | None] = asyncio.Queue()
        work: set[asyncio.Task[None]] = set()
        quick: set[asyncio.Task[None]] = set()
        # "slow" is answered once the client has finished writing and every
        # other request is answered: completion order that no load can change.
        others_answered = asyncio.Event()

        async def answer(request: pb.InferRequest) -> None:
            if request.task == "slow":
                await others_answered.wait()
            if request.task == "reject":
                reply = pb.InferResponse(
                    request_id=request.request_id,
                    outcome=pb.REJECTED,
                    status_code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                    error="no target meets the SLA",
                )
            elif request.task == "invalid":
                reply = pb.InferResponse(
                    request_id=request.request_id,
                    outcome=pb.FAILED,
                    status_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                    error="inputs.input: expected shape [1, 64]",
                )
            else:
                reply = _ok_reply(request)
            await replies.put(reply)

        async def consume() -> None:
            async for request in request_iterator:
                self.requests.append(request)
                if request.task == "abort":
                    await replies.put(None)
                    return
                task = asyncio.create_task(answer(request))
                work.add(task)
                if request.task != "slow":
                    quick.add(task)
            await asyncio.gather(*quick)
            others_answered.set()
            await asyncio.gather(*work)
            await replies.put(None)

        consumer = asyncio.create_task(consume())
        while (reply := await replies.get()) is not None:
            yield reply
        if self.requests and self.requests[-1].task == "abort":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "AP shutting down")
        await consumer


class ServerThread:
    """The fake server on its own thread and event loop, usable from sync and async tests."""

    def __init__(self) -> None:
        self.servicer = FakeDispatcher()
        self.address = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        server = grpc.aio.server()
        pb_grpc.add_DispatcherServicer_to_server(self.servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.address = f"127.0.0.1:{port}"
        self._ready.set()
        await self._stop.wait()
        await server.stop(0)

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10)

    def stop(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    s = ServerThread()
    s.start()
    yield s
    s.stop()


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.address, timeout_margin_ms=300) as c:
        yield c


def free_address() -> str:
    """An address nothing listens on."""
    return f"127.0.0.1:{free_port()}"


X = np.arange(12, dtype=np.float32).reshape(1, 12)


# ------------------------------------------------------------------ conversion


def test_encode_single_array_is_named_input() -> None:
    (t,) = encode_inputs(X)
    assert (t.name, t.datatype, list(t.shape)) == ("input", "FP32", [1, 12])
    assert t.data == X.tobytes()


def test_encode_mapping_and_array_likes() -> None:
    out = encode_inputs({"a": X, "b": [[1, 2, 3]]})
    assert [t.name for t in out] == ["a", "b"]
    assert out[1].datatype == "INT64" and list(out[1].shape) == [1, 3]


def test_encode_big_endian_and_non_contiguous_as_little_endian_rows() -> None:
    be = X.astype(">f4")
    (t,) = encode_inputs(be)
    assert t.datatype == "FP32" and t.data == X.tobytes()
    strided = np.arange(24, dtype=np.float32).reshape(2, 12)[:, ::2]
    (t,) = encode_inputs(strided)
    assert t.data == np.ascontiguousarray(strided).tobytes()


def test_encode_rejects_unsupported_dtype_and_empty_inputs() -> None:
    with pytest.raises(InvalidRequestError) as err:
        encode_inputs(np.zeros(2, dtype=np.complex64))
    assert err.value.field == "inputs.input"
    with pytest.raises(InvalidRequestError):
        encode_inputs({})


@pytest.mark.parametrize("deadline", [0.0, -5.0, float("nan"), float("inf")])
def test_build_request_rejects_bad_deadline(deadline: float) -> None:
    with pytest.raises(InvalidRequestError) as err:
        build_request("digits", X, deadline_ms=deadline)
    assert err.value.field == "sla.deadline_ms"


def test_build_request_rejects_bad_min_accuracy() -> None:
    with pytest.raises(InvalidRequestError) as err:
        build_request("digits", X, deadline_ms=10, min_accuracy=1.5)
    assert err.value.field == "sla.min_accuracy"


def test_build_request_fields() -> None:
    req = build_request("digits", X, deadline_ms=50, min_accuracy=0.9, app="ar", request_id="r1", variant="v")
    assert (req.task, req.app, req.request_id, req.variant) == ("digits", "ar", "r1", "v")
    assert (req.sla.deadline_ms, req.sla.min_accuracy) == (50.0, pytest.approx(0.9))


# -------------------------------------------------------------------- decoding


def test_decode_response_outputs_are_views_of_the_reply() -> None:
    logits = np.array([[0.1, 2.0, -1.0]], dtype=np.float32)
    reply = pb.InferResponse(
        request_id="r1",
        outcome=pb.INACCURATE,
        outputs=[tensors.to_tensor("logits", logits)],
        served_by=TARGET,
        timings=pb.Timings(queue_ms=1, network_ms=2, compute_ms=3, total_ms=6),
    )
    r = decode_response(reply)
    assert r.outcome == "inaccurate" and r.request_id == "r1"
    np.testing.assert_array_equal(r.output, logits)
    assert r.output.dtype == np.float32 and r.output.shape == (1, 3)
    assert not r.output.flags.owndata and not r.output.flags.writeable
    assert r.served_by == Target("w1", "digits-small", "edge-a", pytest.approx(0.96))
    assert r.served_by is not None and r.served_by.key == "edge-a/w1/digits-small"
    assert r.timings == Timings(1, 2, 3, 6)
    assert r.served and r.exception() is None


def test_decode_response_without_target_or_outputs() -> None:
    r = decode_response(pb.InferResponse(request_id="r2", outcome=pb.LATE))
    assert r.served_by is None and r.outputs == {} and r.timings == Timings()
    with pytest.raises(ValueError, match="no output"):
        _ = r.output


def test_decode_response_several_outputs() -> None:
    reply = pb.InferResponse(
        outcome=pb.OK,
        outputs=[tensors.to_tensor("a", X), tensors.to_tensor("b", X[:, :2])],
    )
    r = decode_response(reply)
    assert set(r.outputs) == {"a", "b"} and r.outputs["b"].shape == (1, 2)
    with pytest.raises(ValueError, match="several outputs"):
        _ = r.output


def test_decode_response_unspecified_outcome_is_failed() -> None:
    r = decode_response(pb.InferResponse(request_id="r3"))
    assert r.outcome == "failed" and "outcome" in r.error


def test_decode_response_bad_tensor() -> None:
    bad = pb.Tensor(name="o", datatype="BYTES", shape=[1], data=b"xx")
    with pytest.raises(ApdispatchError, match=r"outputs\.o"):
        decode_response(pb.InferResponse(outcome=pb.OK, outputs=[bad]))
    short = pb.Tensor(name="o", datatype="FP32", shape=[1, 4], data=b"\0" * 8)
    with pytest.raises(ApdispatchError, match=r"outputs\.o"):
        decode_response(pb.InferResponse(outcome=pb.OK, outputs=[short]))


@pytest.mark.parametrize(
    ("outcome", "code", "error", "exc_type"),
    [
        (pb.REJECTED, grpc.StatusCode.RESOURCE_EXHAUSTED, "no target", RejectedError),
        (pb.REJECTED, None, "", RejectedError),
        (pb.FAILED, grpc.StatusCode.INVALID_ARGUMENT, "inputs.input: bad", InvalidRequestError),
        (pb.FAILED, grpc.StatusCode.NOT_FOUND, "no variant v", NotFoundError),
        (pb.FAILED, grpc.StatusCode.UNAVAILABLE, "worker died", UnavailableError),
        (pb.FAILED, None, "", ApdispatchError),
    ],
)
def test_result_exception_from_reply_status(
    outcome: int, code: grpc.StatusCode | None, error: str, exc_type: type[Exception]
) -> None:
    reply = pb.InferResponse(
        request_id="r4",
        outcome=outcome,  # type: ignore[arg-type]
        status_code=0 if code is None else code.value[0],
        error=error,
    )
    r = decode_response(reply)
    assert not r.served
    exc = r.exception()
    assert type(exc) is exc_type
    assert exc is not None and exc.request_id == "r4"
    if isinstance(exc, InvalidRequestError):
        assert exc.field == "inputs.input"


def test_result_is_frozen_with_slots() -> None:
    r = decode_response(pb.InferResponse(outcome=pb.OK))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.outcome = "late"  # type: ignore[misc]
    assert not hasattr(r, "__dict__")
    assert isinstance(r, Result)


# ------------------------------------------------------------ sync, unary


def test_infer_round_trip(client: Client, server: ServerThread) -> None:
    r = client.infer("digits", X, deadline_ms=5000, min_accuracy=0.9, app="ar", variant="v1")
    assert r.outcome == "ok"
    np.testing.assert_array_equal(r.output, X)
    assert r.served_by is not None and r.served_by.worker == "w1"
    assert r.timings.total_ms == 3.5
    sent = server.servicer.requests[-1]
    assert (sent.app, sent.variant, sent.sla.deadline_ms) == ("ar", "v1", 5000.0)
    assert sent.request_id and sent.request_id == r.request_id


def test_infer_request_ids(client: Client, server: ServerThread) -> None:
    a = client.infer("digits", X, deadline_ms=5000)
    b = client.infer("digits", X, deadline_ms=5000)
    assert a.request_id != b.request_id
    c = client.infer("digits", {"x": X, "y": X[:, :3]}, deadline_ms=5000, request_id="mine")
    assert c.request_id == "mine" and set(c.outputs) == {"output0", "output1"}
    assert server.servicer.requests[-1].variant == ""


def test_infer_late_without_outputs(client: Client) -> None:
    r = client.infer("late", X, deadline_ms=5)
    assert r.outcome == "late" and r.outputs == {}


@pytest.mark.parametrize(
    ("task", "exc_type"),
    [
        ("reject", RejectedError),
        ("invalid", InvalidRequestError),
        ("unknown", NotFoundError),
        ("down", UnavailableError),
        ("internal", ApdispatchError),
        ("reply-rejected", RejectedError),
    ],
)
def test_infer_errors(client: Client, task: str, exc_type: type[Exception]) -> None:
    with pytest.raises(exc_type) as err:
        client.infer(task, X, deadline_ms=5000, request_id="rid")
    assert type(err.value) is exc_type
    assert err.value.request_id == "rid"  # type: ignore[attr-defined]
    if task == "invalid":
        assert err.value.field == "sla.deadline_ms"  # type: ignore[attr-defined]
    if task == "internal":
        assert err.value.code is grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]


def test_infer_timeout_is_deadline_plus_margin(server: ServerThread) -> None:
    with Client(server.address, timeout_margin_ms=100) as c:
        c.infer("digits", X, deadline_ms=5000)  # connect first
        start = time.perf_counter()
        with pytest.raises(ApdispatchError) as err:
            c.infer("hang", X, deadline_ms=50)
        elapsed = time.perf_counter() - start
    assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "150 ms" in str(err.value)
    # The call carried a 150 ms deadline (gRPC rounds what it sends up a
    # little) and was not given up before it: both bounds hold however slow
    # the machine ("hang" never answers).
    seen = server.servicer.hang_time_remaining
    deadline = time.monotonic() + 60
    while not seen and time.monotonic() < deadline:  # the server's thread may lag on a loaded machine
        time.sleep(0.01)
    assert seen and seen[-1] is not None and seen[-1] <= 0.160, seen
    assert elapsed >= 0.14


def test_infer_unreachable_is_unavailable() -> None:
    with Client(free_address()) as c, pytest.raises(UnavailableError):
        c.infer("digits", X, deadline_ms=5000)
    with Client(free_address()) as c, pytest.raises(UnavailableError):
        c.wait_ready(0.2)


def test_client_validates_before_sending(client: Client, server: ServerThread) -> None:
    n = len(server.servicer.requests)
    with pytest.raises(InvalidRequestError):
        client.infer("digits", X, deadline_ms=0)
    assert len(server.servicer.requests) == n


def test_timeout_margin_must_not_be_negative() -> None:
    with pytest.raises(ValueError):
        Client("127.0.0.1:1", timeout_margin_ms=-1)


# ------------------------------------------------------------ sync, stream


def test_stream_mixed_items_and_completion_order(client: Client) -> None:
    requests = [
        StreamRequest("slow", X, 5000.0, request_id="s1"),
        ("digits", X, 5000.0, 0.5, "ar", "f1"),
        StreamRequest("reject", X, 5000.0, request_id="rej"),
        StreamRequest("invalid", X, 5000.0, request_id="bad"),
        build_request("digits", X, deadline_ms=5000),  # no id: the client adds one
    ]
    results = list(client.stream(requests))
    assert len(results) == 5
    by_id = {r.request_id: r for r in results}
    assert results[-1].request_id == "s1"  # replies in completion order
    assert by_id["f1"].outcome == "ok"
    assert by_id["rej"].outcome == "rejected" and by_id["rej"].error
    assert isinstance(by_id["rej"].exception(), RejectedError)
    assert by_id["bad"].outcome == "failed"
    bad = by_id["bad"].exception()
    assert isinstance(bad, InvalidRequestError) and bad.field == "inputs.input"
    assert all(r.request_id for r in results)


def test_stream_reraises_errors_of_the_request_iterator(client: Client) -> None:
    def requests() -> Iterator[tuple[str, np.ndarray, float]]:
        yield ("digits", X, 5000.0)
        raise RuntimeError("camera unplugged")

    with pytest.raises(RuntimeError, match="camera unplugged"):
        list(client.stream(requests()))


def test_stream_bad_item_raises_client_side(client: Client) -> None:
    with pytest.raises(InvalidRequestError):
        list(client.stream([("digits", X, -1.0)]))


def test_stream_ended_by_the_server(client: Client) -> None:
    with pytest.raises(UnavailableError, match="shutting down"):
        list(client.stream([("digits", X, 5000.0), ("abort", X, 5000.0)]))


# --------------------------------------------------------------------- async


async def test_async_infer_and_errors(server: ServerThread) -> None:
    async with AsyncClient(server.address, timeout_margin_ms=300) as c:
        await c.wait_ready(5)
        r = await c.infer("digits", X, deadline_ms=5000, app="ar")
        assert r.outcome == "ok"
        np.testing.assert_array_equal(r.output, X)
        with pytest.raises(RejectedError):
            await c.infer("reject", X, deadline_ms=5000)
        with pytest.raises(InvalidRequestError) as err:
            await c.infer("invalid", X, deadline_ms=5000)
        assert err.value.field == "sla.deadline_ms"
        with pytest.raises(NotFoundError):
            await c.infer("unknown", X, deadline_ms=5000)
        with pytest.raises(ApdispatchError) as timeout:
            await c.infer("hang", X, deadline_ms=10)
        assert timeout.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_async_unreachable() -> None:
    async with AsyncClient(free_address()) as c:
        with pytest.raises(UnavailableError):
            await c.infer("digits", X, deadline_ms=5000)
        with pytest.raises(UnavailableError):
            await c.wait_ready(0.2)


async def test_async_open_stream_sends_without_waiting(server: ServerThread) -> None:
    async with AsyncClient(server.address) as c, c.open_stream() as s:
        # Everything is sent before any reply is read: the writer never waits.
        ids = [await s.send(("slow", X, 5000.0)) for _ in range(3)]
        ids.append(await s.send(StreamRequest("digits", X, 5000.0, request_id="fast")))
        ids.append(await s.send(("reject", X, 5000.0)))
        await s.done_writing()
        results = [r async for r in s]
    assert sorted(r.request_id for r in results) == sorted(ids)
    assert {r.request_id for r in results[:2]} == {"fast", ids[4]}
    assert [r.outcome for r in results[2:]] == ["ok"] * 3


async def test_async_stream_from_async_iterable(server: ServerThread) -> None:
    async def frames() -> AsyncIterator[StreamRequest]:
        for i in range(5):
            yield StreamRequest("digits", X * i, 5000.0, request_id=f"f{i}")

    async with AsyncClient(server.address) as c:
        results = [r async for r in c.stream(frames())]
        assert sorted(r.request_id for r in results) == [f"f{i}" for i in range(5)]
        by_id = {r.request_id: r for r in results}
        np.testing.assert_array_equal(by_id["f3"].output, X * 3)
        plain = [r async for r in c.stream([("reject", X, 5000.0)])]
        assert plain[0].outcome == "rejected"


async def test_async_stream_errors(server: ServerThread) -> None:
    async def broken() -> AsyncIterator[StreamRequest]:
        yield StreamRequest("slow", X, 5000.0)
        raise RuntimeError("camera unplugged")

    async with AsyncClient(server.address) as c:
        with pytest.raises(RuntimeError, match="camera unplugged"):
            _ = [r async for r in c.stream(broken())]
        with pytest.raises(UnavailableError, match="shutting down"):
            _ = [r async for r in c.stream([("digits", X, 5000.0), ("abort", X, 5000.0)])]


async def test_async_send_after_the_stream_ended(server: ServerThread) -> None:
    async with AsyncClient(server.address) as c, c.open_stream() as s:
        await s.send(("abort", X, 5000.0))
        with pytest.raises(UnavailableError):
            while await s.read() is not None:
                pass
        with pytest.raises(UnavailableError):
            await s.send(("digits", X, 5000.0))


async def test_async_cancelled_stream_read_is_an_error_not_a_cancellation(
    server: ServerThread,
) -> None:
    async with AsyncClient(server.address) as c:
        s = c.open_stream()
        await s.send(("slow", X, 5000.0))
        reader = asyncio.create_task(s.read())
        await asyncio.sleep(0.05)
        s.cancel()
        with pytest.raises(ApdispatchError) as err:
            await reader
        assert err.value.code is grpc.StatusCode.CANCELLED


async def test_async_send_copies_a_template_without_id(server: ServerThread) -> None:
    template = build_request("digits", X, deadline_ms=5000)
    async with AsyncClient(server.address) as c, c.open_stream() as s:
        first = await s.send(template)
        second = await s.send(template)
        await s.done_writing()
        results = [r async for r in s]
    assert first != second and template.request_id == ""
    assert sorted(r.request_id for r in results) == sorted([first, second])


# ------------------------------------------------------- the client's deadline


def stepping_clock(step_s: float) -> Any:
    """A clock that moves ``step_s`` on every reading: each reply is judged one step after its send."""
    ticks = itertools.count()
    return lambda: next(ticks) * step_s


def test_ok_after_the_deadline_at_the_client_is_late(server: ServerThread) -> None:
    # Each request is judged 1 s after it was sent: an ok with a 500 ms deadline
    # arrived too late for its application, one with 5 s did not.
    with Client(server.address, clock=stepping_clock(1.0)) as c:
        late = c.infer("digits", X, deadline_ms=500)
        in_time = c.infer("digits", X, deadline_ms=5000)
        results = {r.request_id: r for r in c.stream([
            StreamRequest("digits", X, 500.0, request_id="too-late"),
            StreamRequest("reject", X, 500.0, request_id="rejected"),
        ])}  # fmt: skip
    assert late.outcome == "late" and late.late_at_client
    assert "after the deadline" in late.error and late.output.shape == X.shape  # the answer is kept
    assert in_time.outcome == "ok" and not in_time.late_at_client and in_time.error == ""
    assert results["too-late"].outcome == "late" and results["too-late"].late_at_client
    assert results["rejected"].outcome == "rejected" and not results["rejected"].late_at_client


async def test_async_ok_after_the_deadline_at_the_client_is_late(server: ServerThread) -> None:
    async with AsyncClient(server.address, clock=stepping_clock(1.0)) as c:
        late = await c.infer("digits", X, deadline_ms=500)
        in_time = await c.infer("digits", X, deadline_ms=5000)
        async with c.open_stream() as s:
            await s.send(StreamRequest("digits", X, 500.0, request_id="too-late"))
            await s.send(StreamRequest("digits", X, 5000.0, request_id="in-time"))
            await s.done_writing()
            results = {r.request_id: r for r in [r async for r in s]}
    assert late.outcome == "late" and late.late_at_client
    assert in_time.outcome == "ok" and not in_time.late_at_client
    assert results["too-late"].outcome == "late" and results["too-late"].late_at_client
    assert results["in-time"].outcome == "ok"
