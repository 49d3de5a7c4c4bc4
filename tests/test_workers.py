"""Workers: real OIP gRPC servers on loopback over real ONNX Runtime and torch models.

Most workers run in-process on the test's event loop; tritonclient (which
registers its own ``inference`` proto package) and the torch-less edge worker
run in subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from apdispatch.cli import build_parser
from apdispatch.common.confidence import is_classifier, top_probability
from apdispatch.common.logs import make_logger
from apdispatch.common.manifest import Manifest, Variant, load_manifest
from apdispatch.common.protocol import dispatcher_pb2 as dpb
from apdispatch.common.protocol import dispatcher_pb2_grpc as dpb_grpc
from apdispatch.common.protocol import oip_pb2 as pb
from apdispatch.common.protocol import oip_pb2_grpc as pb_grpc
from apdispatch.tools.processes import free_port
from workers.config import WorkerConfig
from workers.runtime import ServiceTime, parse_service_times
from workers.server import Worker, config_from_args

REPO = Path(__file__).resolve().parents[1]
TASK = "digits"
MAX_BATCH = 8
Tensor = pb.ModelInferRequest.InferInputTensor


# Fixtures and helpers -------------------------------------------------------


@dataclass(frozen=True)
class Zoo:
    root: Path
    manifest: Manifest
    tiny: Variant  # the lightest ONNX variant of TASK
    small: Variant  # the heaviest ONNX variant of TASK
    large: Variant  # a torch variant of TASK
    x: np.ndarray  # held-out inputs, FP32, shaped as the variants expect
    y: np.ndarray  # held-out labels


@pytest.fixture(scope="session")
def zoo(models_dir: Path) -> Zoo:
    manifest = load_manifest(models_dir)
    of_task = [v for v in manifest.variants if v.task == TASK]
    onnx = sorted((v for v in of_task if v.runtime == "onnx"), key=lambda v: v.params)
    torch_variants = [v for v in of_task if v.runtime == "torch"]
    assert len(onnx) >= 2 and torch_variants, f"zoo at {models_dir} lacks {TASK} variants"
    with np.load(models_dir / "samples" / f"{TASK}.npz") as npz:
        x, y = npz["x"], npz["y"]
    tail = tuple(onnx[0].inputs[0].shape[1:])
    x = np.ascontiguousarray(x, dtype=np.float32).reshape((len(x), *tail))
    return Zoo(models_dir, manifest, onnx[0], onnx[-1], torch_variants[0], x, y)


@pytest.fixture(scope="session")
def hold_factor(zoo: Zoo) -> Callable[[float], float]:
    """Slowdown that makes one 8-row request of ``zoo.small`` hold its slot for about ``ms``.

    Calibrated against the real runtime, the way the worker runs it: in a slot
    thread, one request at a time with idle gaps between. Such a lone call takes
    several times longer than one in a tight loop (cold caches), and the
    slowdown multiplies whatever it takes.
    """
    from workers.edge import OnnxRuntime

    runtime = OnnxRuntime(zoo.small, zoo.manifest.path(zoo.small))
    runtime.load()
    inputs = [zoo.x[:MAX_BATCH]]

    def once() -> float:
        t0 = time.perf_counter()
        runtime.predict(inputs)
        return time.perf_counter() - t0

    times = []
    with ThreadPoolExecutor(1) as pool:
        for _ in range(12):
            times.append(pool.submit(once).result())
            time.sleep(0.01)
    compute_ms = sorted(times)[len(times) // 2] * 1e3
    return lambda ms: max(2.0, ms / compute_ms)


def request(variant: Variant | str, x: np.ndarray, rid: str = "", **params: int) -> pb.ModelInferRequest:
    name = variant if isinstance(variant, str) else variant.name
    x = np.ascontiguousarray(x, dtype=np.float32)
    req = pb.ModelInferRequest(
        model_name=name,
        id=rid,
        inputs=[Tensor(name="input", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[x.tobytes()],
    )
    for key, value in params.items():
        req.parameters[key].int64_param = value
    return req


def logits(reply: pb.ModelInferResponse) -> np.ndarray:
    assert not reply.outputs[0].HasField("contents"), "outputs must travel raw"
    shape = tuple(reply.outputs[0].shape)
    return np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(shape)


def param(reply: pb.ModelInferResponse, key: str) -> float:
    p = reply.parameters[key]
    return p.int64_param if p.WhichOneof("parameter_choice") == "int64_param" else p.double_param


@contextlib.asynccontextmanager
async def serving(
    zoo: Zoo, kind: str, variants: list[Variant], **overrides: Any
) -> AsyncIterator[tuple[Worker, pb_grpc.GRPCInferenceServiceStub]]:
    config = WorkerConfig(
        kind=kind,
        listen="127.0.0.1:0",
        models=zoo.root,
        variants=tuple(v.name for v in variants),
        max_batch_size=MAX_BATCH,
    )
    worker = Worker(replace(config, **overrides), make_logger("warning"))
    await worker.start()
    channel = grpc.aio.insecure_channel(worker.address)
    try:
        yield worker, pb_grpc.GRPCInferenceServiceStub(channel)
    finally:
        await channel.close()
        await worker.stop(grace=1.0)


# For what happens in well under a second on an idle machine: generous, so that
# only something that never happens fails a test.
WAIT_S = 120.0


async def wait_until(check: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def subprocess_env(*extra_path: Path) -> dict[str, str]:
    path = os.pathsep.join([*map(str, extra_path), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path.rstrip(os.pathsep), "PYTHONUNBUFFERED": "1"}


class RecordingRegistry(dpb_grpc.RegistryServicer):
    """A real Registry server that records what workers tell it."""

    def __init__(self) -> None:
        self.registers: list[dpb.RegisterRequest] = []
        self.heartbeats = 0
        self.deregistered: list[str] = []
        self.known: set[str] = set()

    async def Register(
        self, request: dpb.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> dpb.RegisterResponse:
        self.registers.append(request)
        self.known.add(request.worker_id)
        return dpb.RegisterResponse(lease_s=3.0)

    async def Heartbeat(
        self, request: dpb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> dpb.HeartbeatResponse:
        self.heartbeats += 1
        return dpb.HeartbeatResponse(known=request.worker_id in self.known, lease_s=3.0)

    async def Deregister(
        self, request: dpb.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> dpb.DeregisterResponse:
        self.deregistered.append(request.worker_id)
        self.known.discard(request.worker_id)
        return dpb.DeregisterResponse()


@contextlib.asynccontextmanager
async def registry_at(address: str) -> AsyncIterator[RecordingRegistry]:
    registry = RecordingRegistry()
    server = grpc.aio.server()
    dpb_grpc.add_RegistryServicer_to_server(registry, server)
    assert server.add_insecure_port(address)
    await server.start()
    try:
        yield registry
    finally:
        await server.stop(None)


# Metadata ---------------------------------------------------------------------


async def test_metadata_rpcs(zoo: Zoo) -> None:
    async with serving(zoo, "edge", [zoo.tiny, zoo.small]) as (_, stub):
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        assert (await stub.ModelReady(pb.ModelReadyRequest(name=zoo.tiny.name))).ready
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="no-such-model"))).ready
        server = await stub.ServerMetadata(pb.ServerMetadataRequest())
        assert server.name == "apdispatch-worker" and server.version
        assert "model_stream_infer" in server.extensions
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=zoo.small.name))
        assert meta.name == zoo.small.name and meta.platform == "onnxruntime_onnx"
        assert list(meta.versions) == ["1"]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            (t.name, t.datatype, list(t.shape)) for t in zoo.small.inputs
        ]
        assert [t.name for t in meta.outputs] == ["logits"]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelMetadata(pb.ModelMetadataRequest(name="no-such-model"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no-such-model" in (err.value.details() or "")


# Inference --------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", "small"])
async def test_edge_predictions_match_manifest_accuracy(zoo: Zoo, which: str) -> None:
    variant: Variant = getattr(zoo, which)
    async with serving(zoo, "edge", [variant]) as (_, stub):
        preds = []
        for i in range(0, len(zoo.x), MAX_BATCH):
            reply = await stub.ModelInfer(request(variant, zoo.x[i : i + MAX_BATCH], f"r{i}"))
            assert reply.id == f"r{i}" and reply.model_name == variant.name
            assert param(reply, "batch_size") == len(zoo.x[i : i + MAX_BATCH])
            assert param(reply, "queue_ms") >= 0 and param(reply, "compute_ms") > 0
            preds.append(logits(reply).argmax(axis=1))
    accuracy = float((np.concatenate(preds) == zoo.y).mean())
    assert accuracy == pytest.approx(variant.accuracy, abs=0.02)


def test_confidence_is_the_top_softmax_probability_by_hand() -> None:
    # softmax([0, 0]) = (1/2, 1/2); softmax([ln 3, 0]) = (3/4, 1/4); [1000, 0]: 1, without overflow.
    got = top_probability(np.array([[0.0, 0.0], [math.log(3.0), 0.0], [1000.0, 0.0]]))
    np.testing.assert_allclose(got, [0.5, 0.75, 1.0])
    # softmax([ln 3, 0, 0]) = (3/5, 1/5, 1/5).
    np.testing.assert_allclose(top_probability(np.array([[math.log(3.0), 0.0, 0.0]])), [0.6])
    with pytest.raises(ValueError, match="logits"):
        top_probability(np.zeros(3))


async def test_classification_replies_carry_their_confidence(zoo: Zoo) -> None:
    assert is_classifier(zoo.tiny.outputs) and is_classifier(zoo.large.outputs)
    assert not is_classifier(()) and not is_classifier((*zoo.tiny.outputs, *zoo.tiny.outputs))
    confidence, answers = [], []
    async with serving(zoo, "edge", [zoo.tiny]) as (_, stub):
        for i in range(0, len(zoo.x), MAX_BATCH):
            reply = await stub.ModelInfer(request(zoo.tiny, zoo.x[i : i + MAX_BATCH]))
            rows = top_probability(logits(reply))
            # A reply of several rows carries its least confident row's.
            assert param(reply, "confidence") == pytest.approx(rows.min(), rel=1e-6)
            confidence.append(rows)
            answers.append(logits(reply).argmax(axis=1))
        one = await stub.ModelInfer(request(zoo.tiny, zoo.x[:1]))
        assert param(one, "confidence") == pytest.approx(float(top_probability(logits(one))[0]), rel=1e-6)
        assert 0.1 <= param(one, "confidence") <= 1.0  # ten classes
    # The more confident half of the answers is right more often than the rest.
    sure_of = np.concatenate(confidence)
    right = np.concatenate(answers) == zoo.y
    sure = sure_of >= np.median(sure_of)
    assert right[sure].mean() > right[~sure].mean() + 0.05


async def test_typed_contents_match_raw(zoo: Zoo) -> None:
    x = zoo.x[:3]
    typed = pb.ModelInferRequest(
        model_name=zoo.tiny.name,
        inputs=[
            Tensor(
                name="input",
                datatype="FP32",
                shape=list(x.shape),
                contents=pb.InferTensorContents(fp32_contents=x.ravel().tolist()),
            )
        ],
    )
    async with serving(zoo, "edge", [zoo.tiny]) as (_, stub):
        by_typed = await stub.ModelInfer(typed)
        by_raw = await stub.ModelInfer(request(zoo.tiny, x))
    np.testing.assert_array_equal(logits(by_typed), logits(by_raw))


def _bad_requests(zoo: Zoo) -> dict[str, tuple[pb.ModelInferRequest, grpc.StatusCode, str]]:
    """Case name -> (request, expected status, text the message must hold)."""
    name = zoo.tiny.name
    x = zoo.x[:2]
    flat = x.reshape(2, -1)
    features = flat.shape[1]
    inv, nf = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND

    def build(**edits: Any) -> pb.ModelInferRequest:
        req = request(name, x, "bad")
        tensor = req.inputs[0]
        if "datatype" in edits:
            tensor.datatype = edits["datatype"]
        if "shape" in edits:
            del tensor.shape[:]
            tensor.shape.extend(edits["shape"])
        if "raw" in edits:
            del req.raw_input_contents[:]
            req.raw_input_contents.extend(edits["raw"])
        return req

    nan, inf = x.copy(), x.copy()
    nan.flat[5] = np.nan
    inf.flat[7] = -np.inf
    two_inputs = build()
    two_inputs.inputs.append(Tensor(name="extra", datatype="FP32", shape=list(x.shape)))
    two_inputs.raw_input_contents.append(x.tobytes())
    renamed = build()
    renamed.inputs[0].name = "image"
    short_typed = pb.ModelInferRequest(
        model_name=name,
        id="bad",
        inputs=[
            Tensor(
                name="input",
                datatype="FP32",
                shape=list(x.shape),
                contents=pb.InferTensorContents(fp32_contents=[0.5] * 3),
            )
        ],
    )
    no_data = build(raw=[])
    other_output = build()
    other_output.outputs.add(name="probabilities")
    wrong_version = build()
    wrong_version.model_version = "7"
    big = np.repeat(x[:1], MAX_BATCH + 1, axis=0)
    return {
        "unknown-model": (request("no-such-model", x, "bad"), nf, "'no-such-model'"),
        "unknown-version": (wrong_version, nf, f"'{name}'"),
        "datatype": (build(datatype="FP64", raw=[x.astype("<f8").tobytes()]), inv, "FP64"),
        "rank": (build(shape=[x.size]), inv, "unexpected shape"),
        "dimension": (
            build(shape=[1, 2 * features], raw=[x.tobytes()])
            if len(x.shape) == 2
            else build(shape=[2, *x.shape[1:-1], x.shape[-1] + 1]),
            inv,
            "unexpected shape",
        ),
        "negative-dimension": (build(shape=[-1, *x.shape[1:]]), inv, "unexpected shape"),
        "byte-size": (build(raw=[x.tobytes()[:-4]]), inv, "byte size"),
        "empty": (build(shape=[0, *x.shape[1:]], raw=[b""]), inv, "empty"),
        "batch-too-big": (request(name, big, "bad"), inv, "batch-size must be <= 8"),
        "input-count": (two_inputs, inv, "expected 1 inputs but got 2"),
        "input-name": (renamed, inv, "unexpected inference input 'image'"),
        "nan": (build(raw=[nan.tobytes()]), inv, "NaN or infinite"),
        "inf": (build(raw=[inf.tobytes()]), inv, "NaN or infinite"),
        "typed-count": (short_typed, inv, "contents.fp32_contents"),
        "no-data": (no_data, inv, "no data"),
        "raw-count": (build(raw=[x.tobytes(), x.tobytes()]), inv, "raw_input_contents"),
        "output-name": (other_output, inv, "unexpected inference output 'probabilities'"),
    }


BAD_CASES = [
    "unknown-model", "unknown-version", "datatype", "rank", "dimension", "negative-dimension",
    "byte-size", "empty", "batch-too-big", "input-count", "input-name", "nan", "inf",
    "typed-count", "no-data", "raw-count", "output-name",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
async def test_bad_input_is_rejected_and_server_keeps_serving(zoo: Zoo, case: str) -> None:
    bad, code, text = _bad_requests(zoo)[case]
    async with serving(zoo, "edge", [zoo.tiny]) as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(bad, timeout=WAIT_S)
        details = err.value.details() or ""
        assert err.value.code() == code, details
        assert details.startswith("[request id: bad] "), details
        assert text in details, details
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert f"model '{zoo.tiny.name}'" in details
            if case not in ("raw-count", "output-name", "batch-too-big", "input-count"):
                assert "input '" in details
        ok = await stub.ModelInfer(request(zoo.tiny, zoo.x[:1], "good"), timeout=WAIT_S)
        assert logits(ok).shape == (1, 10)


# Slots, emulation and deadlines ---------------------------------------------


async def test_slots_serialize_and_slowdown_holds_them(
    zoo: Zoo, hold_factor: Callable[[float], float]
) -> None:
    slowdown = hold_factor(40)
    x8 = zoo.x[:MAX_BATCH]
    # The test holds every slot until all four requests are queued: however the
    # machine spreads their arrivals, they then start together (one slot: in turn).
    async with serving(zoo, "edge", [zoo.small], slots=1, slowdown=slowdown) as (worker, stub):
        slots = worker.slots
        assert slots is not None
        await slots.acquire()
        t0 = time.perf_counter()
        calls = [asyncio.ensure_future(stub.ModelInfer(request(zoo.small, x8, f"r{i}"))) for i in range(4)]
        await wait_until(lambda: slots.waiting == 4)
        slots.release()
        replies = await asyncio.gather(*calls)
        wall_ms = (time.perf_counter() - t0) * 1e3
    queued = sorted(param(r, "queue_ms") for r in replies)
    held = [param(r, "compute_ms") for r in replies]
    assert min(held) > 5, held  # the emulated slowdown really holds the slot
    # One slot: they ran one after the other (the wall time covers every hold),
    # each waiting for the holds of those before it.
    assert wall_ms >= 0.9 * sum(held), (wall_ms, held)
    assert all(q > 0.1 * k * min(held) for k, q in enumerate(queued)), (queued, held)

    async with serving(zoo, "edge", [zoo.small], slots=4, slowdown=slowdown) as (worker, stub):
        slots = worker.slots
        assert slots is not None
        for _ in range(4):
            await slots.acquire()
        calls = [asyncio.ensure_future(stub.ModelInfer(request(zoo.small, x8, f"r{i}"))) for i in range(4)]
        await wait_until(lambda: slots.waiting == 4)
        for _ in range(4):
            slots.release()
        # The four wake in this turn of the loop, before any hold can end: all run at once.
        await asyncio.sleep(0)
        assert (slots.busy, slots.waiting) == (4, 0)
        replies = await asyncio.gather(*calls)
    assert all(param(r, "compute_ms") > 5 for r in replies)


async def test_service_time_holds_the_slot_for_a_fixed_time(zoo: Zoo) -> None:
    # Far longer than the model takes, so only the hold can account for it.
    service = ServiceTime(batch1_ms=30.0, batch8_ms=65.0)
    async with serving(zoo, "edge", [zoo.tiny, zoo.small], service_ms={zoo.small.name: service}) as (
        worker,
        stub,
    ):
        one = await stub.ModelInfer(request(zoo.small, zoo.x[:1], "one"))
        eight = await stub.ModelInfer(request(zoo.small, zoo.x[:MAX_BATCH], "eight"))
        other = await stub.ModelInfer(request(zoo.tiny, zoo.x[:1], "other"))
        announced = {v.name: (v.latency_ms, v.latency_ms_batch8) for v in worker.register_request().variants}
    # A lower bound holds on any machine, however loaded: waiting cannot be shorter.
    assert param(one, "compute_ms") >= 30.0
    assert param(eight, "compute_ms") >= 65.0
    assert param(other, "compute_ms") < 30.0  # a variant without a service time runs as fast as it runs
    assert logits(eight).shape == (MAX_BATCH, 10)
    # The AP is told what the device costs, not what this machine measured.
    assert announced[zoo.small.name] == (30.0, 65.0)
    assert announced[zoo.tiny.name] == (zoo.tiny.latency_ms_batch1, zoo.tiny.latency_ms_batch8)


async def test_service_time_for_a_variant_not_served_is_refused(zoo: Zoo) -> None:
    config = WorkerConfig(
        kind="edge",
        listen="127.0.0.1:0",
        models=zoo.root,
        variants=(zoo.tiny.name,),
        service_ms={"digits-typo": ServiceTime(10.0, 10.0)},
    )
    worker = Worker(config, make_logger("warning"))
    with pytest.raises(ValueError, match="digits-typo"):
        await worker.start()
    await worker.close()


def test_service_times_parse_and_name_bad_items() -> None:
    table = parse_service_times("a=20:40, b=5")
    assert table == {"a": ServiceTime(20.0, 40.0), "b": ServiceTime(5.0, 5.0)}
    assert table["a"].seconds(1) == pytest.approx(0.020)
    assert table["a"].seconds(8) == pytest.approx(0.040)
    assert table["a"].seconds(4) == pytest.approx(0.020 + 3 * 20.0 / 7 / 1e3)
    assert parse_service_times("") == {}
    for bad in ("a", "a=", "=3", "a=x", "a=0", "a=1:2:3", "a=-1:2", "a=nan"):
        with pytest.raises(ValueError, match="--service-ms"):
            parse_service_times(bad)


async def test_deadline_shorter_than_queue_wait(zoo: Zoo) -> None:
    x8 = zoo.x[:MAX_BATCH]
    async with serving(zoo, "edge", [zoo.small], slots=1) as (worker, stub):
        slots = worker.slots
        assert slots is not None
        await slots.acquire()  # the only slot, held by the test
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(request(zoo.small, x8, "b"), timeout=0.03)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # "b" left the queue at its deadline, without the slot (held all along)...
        await wait_until(lambda: slots.waiting == 0)
        slots.release()
        # ...and does not take it once it is free: nobody holds it, and "c" gets it.
        assert (slots.busy, slots.waiting) == (0, 0)
        late = await stub.ModelInfer(request(zoo.small, x8, "c"))
    assert late.id == "c" and logits(late).shape == (MAX_BATCH, 10)


async def test_link_delay_is_a_round_trip_outside_the_slot(zoo: Zoo) -> None:
    async with serving(zoo, "edge", [zoo.tiny], link_delay_ms=60) as (_, stub):
        await stub.ModelInfer(request(zoo.tiny, zoo.x[:1]))
        t0 = time.perf_counter()
        reply = await stub.ModelInfer(request(zoo.tiny, zoo.x[:1]))
        rtt_ms = (time.perf_counter() - t0) * 1e3
    # The delay comes on top of the time in the slot, not inside it.
    assert rtt_ms >= 59 + param(reply, "queue_ms") + param(reply, "compute_ms")


async def test_stream_replies_out_of_order_with_per_message_errors(
    zoo: Zoo, hold_factor: Callable[[float], float]
) -> None:
    x8 = zoo.x[:MAX_BATCH]
    bad = x8.copy()
    bad.flat[3] = np.nan
    async with serving(zoo, "edge", [zoo.small], slots=1, slowdown=hold_factor(150)) as (
        worker,
        stub,
    ):
        slots = worker.slots
        assert slots is not None
        await slots.acquire()  # the only slot, held by the test until "d" has given up
        call = stub.ModelStreamInfer()
        await call.write(request(zoo.small, x8, "a"))
        await call.write(request(zoo.small, bad, "b"))
        await call.write(request("no-such-model", x8, "c"))
        await call.write(request(zoo.small, x8, "d", timeout=20_000))  # microseconds
        await call.write(request(zoo.small, x8[:1], "e"))
        replies = [await asyncio.wait_for(call.read(), WAIT_S) for _ in range(3)]
        slots.release()
        replies += [await asyncio.wait_for(call.read(), WAIT_S) for _ in range(2)]
        # The stream outlives the errors.
        await call.write(request(zoo.small, x8[:2], "f"))
        after = await asyncio.wait_for(call.read(), WAIT_S)
        await call.done_writing()
        assert await asyncio.wait_for(call.read(), WAIT_S) == grpc.aio.EOF
        unary = {
            "a": await stub.ModelInfer(request(zoo.small, x8)),
            "e": await stub.ModelInfer(request(zoo.small, x8[:1])),
        }
    order = [r.infer_response.id for r in replies]
    assert set(order[:2]) == {"b", "c"} and order[2:] == ["d", "a", "e"], order
    by_id = {r.infer_response.id: r for r in replies}
    expected = {
        "b": ("INVALID_ARGUMENT", "NaN or infinite"),
        "c": ("NOT_FOUND", "'no-such-model'"),
        "d": ("DEADLINE_EXCEEDED", "deadline"),
    }
    for rid, (status, text) in expected.items():
        message = by_id[rid].error_message
        assert message.startswith(f"[request id: {rid}] ") and text in message, message
        assert by_id[rid].infer_response.parameters["status"].string_param == status
    for rid in ("a", "e"):
        assert not by_id[rid].error_message
        np.testing.assert_allclose(logits(by_id[rid].infer_response), logits(unary[rid]), atol=1e-5)
    assert not after.error_message and after.infer_response.id == "f"


# Cloud worker -----------------------------------------------------------------


async def test_cloud_worker_batches_and_predicts(zoo: Zoo) -> None:
    async with serving(zoo, "cloud", [zoo.large, zoo.tiny], slots=1, max_wait_ms=50.0) as (_, stub):
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=zoo.large.name))
        assert meta.platform.startswith("pytorch")
        # Eight concurrent one-row requests meet in the batcher.
        replies = await asyncio.gather(
            *(stub.ModelInfer(request(zoo.large, zoo.x[i : i + 1], str(i))) for i in range(8))
        )
        assert max(param(r, "batch_size") for r in replies) > 1
        for i, reply in enumerate(replies):
            assert reply.id == str(i) and logits(reply).shape == (1, 10)
            # Each request's own row, whatever batch it was served in.
            own = float(top_probability(logits(reply))[0])
            assert param(reply, "confidence") == pytest.approx(own, rel=1e-6)
        # Requests of different sizes are split back correctly.
        sizes = [1, 3, 2, 2]
        starts = np.cumsum([0, *sizes])
        mixed = await asyncio.gather(
            *(
                stub.ModelInfer(request(zoo.large, zoo.x[starts[k] : starts[k + 1]]))
                for k in range(len(sizes))
            )
        )
        alone = await stub.ModelInfer(request(zoo.large, zoo.x[: starts[-1]]))
        np.testing.assert_allclose(
            np.concatenate([logits(r) for r in mixed]), logits(alone), rtol=1e-4, atol=1e-4
        )
        preds = []
        for i in range(0, len(zoo.x), MAX_BATCH):
            reply = await stub.ModelInfer(request(zoo.large, zoo.x[i : i + MAX_BATCH]))
            preds.append(logits(reply).argmax(axis=1))
        # ONNX variants on a cloud worker go through the batcher too.
        tiny = await stub.ModelInfer(request(zoo.tiny, zoo.x[:2], "t"))
        assert tiny.id == "t" and logits(tiny).shape == (2, 10)
    accuracy = float((np.concatenate(preds) == zoo.y).mean())
    assert accuracy == pytest.approx(zoo.large.accuracy, abs=0.02)


def test_cli_flags_become_worker_config(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["worker", "cloud", "--models", str(tmp_path), "--variants", "a, b",
         "--slots", "3", "--slowdown", "2.5", "--link-delay-ms", "30", "--ap", "127.0.0.1:1",
         "--max-batch-size", "16", "--max-wait-ms", "4", "--device", "cpu",
         "--service-ms", "a=20:30"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.service_ms == {"a": ServiceTime(20.0, 30.0)}
    assert config.kind == "cloud" and config.variants == ("a", "b")
    assert (config.slots, config.slowdown, config.link_delay_ms) == (3, 2.5, 30.0)
    assert (config.max_batch_size, config.max_wait_ms, config.device) == (16, 4.0, "cpu")
    edge = config_from_args(build_parser().parse_args(["worker", "edge", "--variants", "x", "--models", "m"]))
    assert edge.max_batch_size == MAX_BATCH and edge.ap is None


# Registration and lifecycle --------------------------------------------------


async def test_registration_retries_heartbeats_and_deregisters(zoo: Zoo) -> None:
    ap = f"127.0.0.1:{free_port()}"
    async with serving(
        zoo, "edge", [zoo.tiny, zoo.small], ap=ap, heartbeat_s=0.05, slowdown=2.0,
        link_delay_ms=4.0, cluster="edge-a", slots=2,
    ) as (worker, _):  # fmt: skip
        registrar = worker.registrar
        assert registrar is not None
        await asyncio.sleep(0.3)  # the AP is not up yet: the worker keeps trying
        assert registrar.registrations == 0
        async with registry_at(ap) as registry:
            await wait_until(lambda: len(registry.registers) == 1)
            first = registry.registers[0]
            port = worker.address.rsplit(":", 1)[1]
            assert first.worker_id == f"edge-edge-a-{port}"
            assert first.address == worker.address
            assert (first.cluster, first.kind, first.slots) == ("edge-a", "edge", 2)
            assert first.streaming and first.link_delay_ms == 4.0
            infos = {v.name: v for v in first.variants}
            assert set(infos) == {zoo.tiny.name, zoo.small.name}
            info = infos[zoo.small.name]
            assert info.task == TASK and info.accuracy == pytest.approx(zoo.small.accuracy)
            assert info.latency_ms == pytest.approx(2.0 * zoo.small.latency_ms_batch1)
            assert info.latency_ms_batch8 == pytest.approx(2.0 * zoo.small.latency_ms_batch8)
            assert info.max_batch_size == MAX_BATCH
            # The zoo's calibrated acceptance table travels with the variant.
            announced = [(a.floor, a.threshold, a.coverage, a.accuracy) for a in info.acceptance]
            assert announced == [(a.floor, a.threshold, a.coverage, a.accuracy) for a in zoo.small.acceptance]
            assert announced
            assert [(t.name, list(t.shape)) for t in info.inputs] == [
                (t.name, list(t.shape)) for t in zoo.small.inputs
            ]
            await wait_until(lambda: registry.heartbeats >= 2)
            # The AP forgets the worker (a restart, say): the next heartbeat says so.
            registry.known.clear()
            await wait_until(lambda: len(registry.registers) == 2)
            await worker.stop(grace=1.0)
            assert registry.deregistered == [first.worker_id]


def test_registration_retries_at_least_once_a_heartbeat() -> None:
    """A restarted AP finds its workers within a heartbeat: no retry, and no gRPC
    reconnection, waits longer than that (the default back-off grew to 5 s)."""
    from workers.registration import Registrar

    registrar = Registrar(
        "127.0.0.1:1", dpb.RegisterRequest(worker_id="w"), make_logger("warning"), heartbeat_s=0.5
    )
    assert registrar.backoff_max_s == 0.5
    assert dict(registrar.channel_options)["grpc.max_reconnect_backoff_ms"] == 500
    assert dict(registrar.channel_options)["grpc.initial_reconnect_backoff_ms"] <= 500


async def test_an_idle_stream_survives_the_clients_keepalive_pings(zoo: Zoo) -> None:
    """The AP pings its workers to keep links alive; a worker must not answer an idle
    stream's pings with GOAWAY ("too many pings"), which broke the link and, with outlier
    detection, took a healthy worker out of routing."""
    async with serving(zoo, "edge", [zoo.tiny]) as (worker, _):
        options = [("grpc.keepalive_time_ms", 1000)]
        async with grpc.aio.insecure_channel(worker.address, options=options) as channel:
            outbox: asyncio.Queue[pb.ModelInferRequest | None] = asyncio.Queue()

            async def requests() -> AsyncIterator[pb.ModelInferRequest]:
                while (item := await outbox.get()) is not None:
                    yield item

            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests())
            outbox.put_nowait(request(zoo.tiny, zoo.x[:1], "before"))
            assert (await asyncio.wait_for(call.read(), WAIT_S)).infer_response.id == "before"
            await asyncio.sleep(6.0)  # idle: several pings, more than the default strikes allow
            outbox.put_nowait(request(zoo.tiny, zoo.x[:1], "after"))
            reply = await asyncio.wait_for(call.read(), WAIT_S)
            assert reply.infer_response.id == "after" and not reply.error_message
            outbox.put_nowait(None)


async def test_graceful_stop_finishes_in_flight_requests(
    zoo: Zoo, hold_factor: Callable[[float], float]
) -> None:
    async with serving(zoo, "edge", [zoo.small], slots=1, slowdown=hold_factor(150)) as (
        worker,
        stub,
    ):
        slots = worker.slots
        assert slots is not None
        await slots.acquire()  # held by the test: "a" is in flight, queued, when the stop comes
        in_flight = asyncio.ensure_future(stub.ModelInfer(request(zoo.small, zoo.x[:8], "a")))
        await wait_until(lambda: slots.waiting == 1)
        stopping = asyncio.ensure_future(worker.stop(grace=WAIT_S))
        await asyncio.sleep(0)  # the drain has begun
        slots.release()
        assert await stopping
        reply = await in_flight
        assert reply.id == "a" and logits(reply).shape == (8, 10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(request(zoo.small, zoo.x[:1]), timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_taken_port_fails_start(zoo: Zoo) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        config = WorkerConfig(
            kind="edge", listen=f"127.0.0.1:{taken}", models=zoo.root, variants=(zoo.tiny.name,)
        )
        worker = Worker(config, make_logger("warning"))
        with pytest.raises(OSError):
            await worker.start()
        await worker.stop(grace=0)


# Interop and the torch-less edge ------------------------------------------------

TRITON_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    url, model, samples = sys.argv[1:4]
    client = tc.InferenceServerClient(url)
    out = {"live": client.is_server_live()}
    meta = client.get_model_metadata(model)
    out["platform"] = meta.platform
    spec = meta.inputs[0]
    out["input"] = [spec.name, spec.datatype, list(spec.shape)]
    with np.load(samples) as npz:
        x = npz["x"][:8].astype(np.float32).reshape(8, *[int(d) for d in spec.shape[1:]])
    tensor = tc.InferInput(spec.name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor], request_id="t-1", parameters={"app": "interop"},
                          client_timeout=10)
    out["logits"] = result.as_numpy("logits").tolist()
    response = result.get_response()
    out["id"] = response.id
    out["queue_ms"] = response.parameters["queue_ms"].double_param
    try:
        client.infer("no-such-model", [tensor])
    except InferenceServerException as err:
        out["unknown"] = str(err.status())
    print(json.dumps(out))
    """
)


async def test_tritonclient_interop(zoo: Zoo) -> None:
    async with serving(zoo, "edge", [zoo.tiny]) as (worker, stub):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", TRITON_SCRIPT, worker.address, zoo.tiny.name,
            str(zoo.root / "samples" / f"{TASK}.npz"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=subprocess_env(),
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(proc.communicate(), WAIT_S)
        reference = await stub.ModelInfer(request(zoo.tiny, zoo.x[:8]))
    assert proc.returncode == 0, stderr.decode()
    out = json.loads(stdout.decode().strip().splitlines()[-1])
    assert out["live"] is True and out["platform"] == "onnxruntime_onnx"
    assert out["input"][:2] == ["input", "FP32"]
    assert out["id"] == "t-1" and out["queue_ms"] >= 0
    np.testing.assert_allclose(np.array(out["logits"]), logits(reference), atol=1e-5)
    assert "NOT_FOUND" in out["unknown"]


NO_TORCH = textwrap.dedent(
    """
    import sys

    class _NoTorch:
        # Any attempt to import torch fails, as on an edge device without it.
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"no torch on this device ({name})")
            return None

    sys.meta_path.insert(0, _NoTorch())
    """
)


async def _run_python(code: str, env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    stdout, _ = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert proc.returncode == 0, stdout.decode()
    return stdout.decode()


async def test_edge_modules_do_not_import_torch(tmp_path: Path) -> None:
    check = "import sys, workers.edge, workers.server; print('torch' in sys.modules)"
    assert (await _run_python(check, subprocess_env())).strip() == "False"
    (tmp_path / "sitecustomize.py").write_text(NO_TORCH)
    probe = "try:\n import torch\nexcept ImportError:\n print('blocked')"
    assert (await _run_python(probe, subprocess_env(tmp_path))).strip() == "blocked"


async def _event(proc: asyncio.subprocess.Process, lines: list[str], name: str) -> dict[str, object]:
    """Read the worker's log up to its first event ``name``; every line read goes to ``lines``."""
    assert proc.stdout is not None
    while True:
        raw = await proc.stdout.readline()
        assert raw, f"worker exited before {name}:\n" + "".join(lines)
        line = raw.decode()
        lines.append(line)
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == name:
                return dict(event)


async def test_edge_worker_without_torch_serves_registers_and_stops(zoo: Zoo, tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(NO_TORCH)
    ap = f"127.0.0.1:{free_port()}"
    async with registry_at(ap) as registry:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "apdispatch.cli", "worker", "edge",
            "--models", str(zoo.root), "--variants", f"{zoo.tiny.name},{zoo.small.name}",
            "--listen", "127.0.0.1:0", "--ap", ap, "--cluster", "edge-x", "--slots", "2",
            cwd=REPO, env=subprocess_env(tmp_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        lines: list[str] = []
        try:
            address = str((await asyncio.wait_for(_event(proc, lines, "serving"), WAIT_S))["address"])
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                reply = await stub.ModelInfer(request(zoo.small, zoo.x[:8], "nt"), timeout=WAIT_S)
            assert reply.id == "nt" and logits(reply).shape == (8, 10)
            # Registered as the worker sees it, not only as the registry does: a
            # worker stopped before it read the registry's reply does not
            # deregister (the lease lapses instead).
            await asyncio.wait_for(_event(proc, lines, "registered"), WAIT_S)
            worker_id = registry.registers[0].worker_id
            assert worker_id == f"edge-edge-x-{address.rsplit(':', 1)[1]}"
            proc.send_signal(signal.SIGTERM)
            assert proc.stdout is not None
            rest = await asyncio.wait_for(proc.stdout.read(), WAIT_S)
            lines.append(rest.decode())
            assert await asyncio.wait_for(proc.wait(), WAIT_S) == 0, "".join(lines)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert registry.deregistered == [worker_id]
        events = [json.loads(x)["event"] for x in "".join(lines).splitlines() if x.startswith("{")]
        assert "stopped" in events
        assert not any("Traceback" in x for x in lines), "".join(lines)


async def test_second_signal_forces_exit(zoo: Zoo) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "apdispatch.cli", "worker", "edge",
        "--models", str(zoo.root), "--variants", zoo.small.name, "--listen", "127.0.0.1:0",
        "--shutdown-grace-s", "3600", "--log-format", "json",
        cwd=REPO, env=subprocess_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    lines: list[str] = []
    try:
        address = str((await asyncio.wait_for(_event(proc, lines, "serving"), WAIT_S))["address"])
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelStreamInfer()
            await call.write(request(zoo.small, zoo.x[:8], "a"))
            # Answered and left open: a drain waits for the stream all its grace period.
            first = await asyncio.wait_for(call.read(), WAIT_S)
            assert first.infer_response.id == "a"
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(_event(proc, lines, "stopping"), WAIT_S)
            assert proc.returncode is None  # draining, within its grace period
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), WAIT_S) == 1
            assert await asyncio.wait_for(call.code(), WAIT_S) != grpc.StatusCode.OK
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
