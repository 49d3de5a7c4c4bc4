"""The AP with two edge workers and a cloud worker, all real processes on loopback."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from apdispatch import Client, InvalidRequestError, NotFoundError, RejectedError
from apdispatch.client import StreamRequest
from apdispatch.common.confidence import top_probability
from apdispatch.tools.processes import Children, free_port, wait_for_workers

CLOUD_RTT_MS = 40.0
# For tests about where a request goes or what comes back, not how fast:
# a deadline no loaded machine misses.
SLACK_MS = 10_000.0
WAIT_S = 60.0  # for a log line written before the reply it belongs to


@dataclass
class Topology:
    ap: str
    children: Children
    samples: dict[str, tuple[np.ndarray, np.ndarray]]
    edge_accuracy: float  # best edge variant of digits
    cloud_accuracy: float


@pytest.fixture(scope="module")
def topology(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    from apdispatch.common.manifest import load_manifest

    manifest = load_manifest(models_dir)
    edge = [v.name for v in manifest.variants if v.runtime == "onnx"]
    cloud = [v.name for v in manifest.variants if v.runtime == "torch"]
    digits = [v for v in manifest.variants if v.task == "digits"]
    ap = f"127.0.0.1:{free_port()}"
    children = Children(tmp_path_factory.mktemp("e2e"))
    try:
        children.start("ap", ["serve", "--listen", ap, "--policy", "fastest", "--log-level", "debug"])
        common = ["--models", str(models_dir), "--ap", ap]
        workers = {
            "edge-a": children.start(
                "edge-a",
                [
                    "worker",
                    "edge",
                    "--listen",
                    f"127.0.0.1:{free_port()}",
                    "--worker-id",
                    "edge-a",
                    "--cluster",
                    "edge-a",
                    "--variants",
                    ",".join(edge),
                    "--slots",
                    "2",
                    "--link-delay-ms",
                    "2",
                    *common,
                ],
            ),
            "edge-b": children.start(
                "edge-b",
                [
                    "worker",
                    "edge",
                    "--listen",
                    f"127.0.0.1:{free_port()}",
                    "--worker-id",
                    "edge-b",
                    "--cluster",
                    "edge-b",
                    "--variants",
                    ",".join(edge),
                    "--slots",
                    "1",
                    "--slowdown",
                    "2",
                    "--link-delay-ms",
                    "4",
                    *common,
                ],
            ),
            "cloud": children.start(
                "cloud",
                [
                    "worker",
                    "cloud",
                    "--listen",
                    f"127.0.0.1:{free_port()}",
                    "--worker-id",
                    "cloud",
                    "--cluster",
                    "cloud",
                    "--variants",
                    ",".join(cloud),
                    "--slots",
                    "2",
                    "--link-delay-ms",
                    str(CLOUD_RTT_MS),
                    "--max-batch-size",
                    "8",
                    "--max-wait-ms",
                    "2",
                    *common,
                ],
            ),
        }
        wait_for_workers(ap, children.get("ap"), workers, timeout_s=120)
        samples = {}
        for task in manifest.tasks():
            with np.load(models_dir / "samples" / f"{task}.npz") as npz:
                samples[task] = (npz["x"], npz["y"])
        yield Topology(
            ap=ap,
            children=children,
            samples=samples,
            edge_accuracy=max(v.accuracy for v in digits if v.runtime == "onnx"),
            cloud_accuracy=max(v.accuracy for v in digits if v.runtime == "torch"),
        )
    finally:
        children.close()


@pytest.fixture
def client(topology: Topology) -> Iterator[Client]:
    with Client(topology.ap) as c:
        yield c


def _one(topology: Topology, task: str = "digits", i: int = 0) -> np.ndarray:
    x, _ = topology.samples[task]
    return x[i : i + 1]


def test_served_and_correct(topology: Topology, client: Client) -> None:
    x, y = topology.samples["digits"]
    correct = 0
    for i in range(40):
        result = client.infer("digits", x[i : i + 1], deadline_ms=SLACK_MS, min_accuracy=0.0, app="t")
        assert result.outcome == "ok", result
        assert result.served_by is not None
        assert result.timings.total_ms > 0
        # The worker's confidence in this answer, through the AP.
        assert result.confidence == pytest.approx(float(top_probability(result.output)[0]), rel=1e-6)
        correct += int(np.argmax(result.output[0]) == y[i])
    assert correct >= 25  # every variant is far better than chance (10%)


def test_accuracy_above_every_edge_variant_goes_to_cloud(topology: Topology, client: Client) -> None:
    need = (topology.edge_accuracy + topology.cloud_accuracy) / 2
    for i in range(10):
        result = client.infer("digits", _one(topology, i=i), deadline_ms=SLACK_MS, min_accuracy=need)
        assert result.outcome == "ok"
        assert result.served_by is not None
        assert result.served_by.cluster == "cloud"
        assert result.served_by.accuracy >= need
        assert result.timings.total_ms >= CLOUD_RTT_MS  # the emulated round trip is real


def test_deadline_below_cloud_rtt_never_goes_to_cloud(topology: Topology, client: Client) -> None:
    requests = [
        StreamRequest(
            task="digits", inputs=_one(topology, i=i), deadline_ms=CLOUD_RTT_MS / 2, min_accuracy=0.0
        )
        for i in range(200)
    ]
    results = list(client.stream(requests))
    assert len(results) == 200
    served = [r for r in results if r.served_by is not None]
    assert served, [r.error for r in results[:5]]
    assert all(r.served_by.cluster != "cloud" for r in served if r.served_by is not None)


def _ap_record(topology: Topology, request_id: str) -> dict[str, Any]:
    """The AP's debug log record of how it answered ``request_id``."""
    log = topology.children.get("ap").log
    deadline = time.monotonic() + WAIT_S
    while True:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and request_id in line:
                record: dict[str, Any] = json.loads(line)
                if record.get("event") == "request" and record.get("request_id") == request_id:
                    return record
        assert time.monotonic() < deadline, f"no log record of {request_id}"
        time.sleep(0.05)


def test_impossible_sla_is_rejected_at_once(topology: Topology, client: Client) -> None:
    need = min(1.0, topology.cloud_accuracy + 0.001)
    cases = [
        ("reject-accuracy", 1000.0, need, "sla.min_accuracy"),
        ("reject-deadline", CLOUD_RTT_MS / 2, topology.cloud_accuracy, "sla.deadline_ms"),
    ]
    for rid, deadline_ms, min_accuracy, field in cases:
        with pytest.raises(RejectedError) as info:
            client.infer(
                "digits", _one(topology), deadline_ms=deadline_ms, min_accuracy=min_accuracy, request_id=rid
            )
        assert info.value.request_id == rid and field in str(info.value), str(info.value)
        # At once: answered at admission, with no target, so no worker was asked.
        record = _ap_record(topology, rid)
        assert (record["outcome"], record["target"]) == ("rejected", None), record
        assert field in record["error"], record


def test_outcomes_add_up_under_mixed_load(topology: Topology, client: Client) -> None:
    rng = np.random.default_rng(0)
    x, _ = topology.samples["shapes"]
    requests = []
    for i in range(600):
        deadline = float(rng.choice([3.0, 15.0, 60.0, 300.0]))
        accuracy = float(rng.choice([0.0, topology.edge_accuracy, 0.999]))
        requests.append(
            StreamRequest(
                task="shapes",
                inputs=x[i % len(x) : i % len(x) + 1],
                deadline_ms=deadline,
                min_accuracy=accuracy,
                app=f"app{i % 3}",
            )
        )
    results = list(client.stream(requests))
    assert len(results) == len(requests)
    assert len({r.request_id for r in results}) == len(requests)
    counts = {
        o: sum(r.outcome == o for r in results) for o in ("ok", "late", "inaccurate", "rejected", "failed")
    }
    assert sum(counts.values()) == len(requests)
    assert counts["ok"] > 0 and counts["rejected"] > 0
    # Requests the AP coalesced into one worker call still get their own answer's confidence.
    for r in results:
        if r.outcome == "ok":
            assert r.confidence == pytest.approx(float(top_probability(r.output)[0]), rel=1e-6), r


BAD_INPUTS = [
    ("wrong dtype", lambda x: x.astype(np.float64), "inputs[0].datatype"),
    ("wrong shape", lambda x: np.concatenate([x, x], axis=-1), "inputs[0].shape"),
    ("empty", lambda x: x[:0], "inputs[0].shape"),
    ("oversized batch", lambda x: np.repeat(x, 1_000, axis=0), "inputs[0].shape"),
    (
        "nan",
        lambda x: np.where(np.arange(x.size).reshape(x.shape) == 0, np.nan, x).astype(np.float32),
        "inputs[0].data",
    ),
    ("inf", lambda x: np.full_like(x, np.inf), "inputs[0].data"),
]


@pytest.mark.parametrize(("case", "make", "field"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_tensor_is_invalid_argument(
    topology: Topology, client: Client, case: str, make, field: str
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError) as info:
        client.infer("digits", make(_one(topology)), deadline_ms=100)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in str(info.value)
    # The daemon keeps serving.
    assert client.infer("digits", _one(topology), deadline_ms=SLACK_MS).outcome == "ok"


def test_bad_sla_and_unknown_names(topology: Topology, client: Client) -> None:
    x = _one(topology)
    with pytest.raises(NotFoundError, match="task"):
        client.infer("no-such-task", x, deadline_ms=100)
    with pytest.raises(NotFoundError, match="variant"):
        client.infer("digits", x, deadline_ms=100, variant="no-such-variant")
    for deadline, accuracy, field in [
        (0.0, 0.5, "sla.deadline_ms"),
        (-5.0, 0.5, "sla.deadline_ms"),
        # Beyond any timer the AP or a worker can hold: once hung the request
        # and every other request flushed beside it.
        (1e16, 0.5, "sla.deadline_ms"),
        (100.0, 1.5, "sla.min_accuracy"),
        (100.0, -0.1, "sla.min_accuracy"),
    ]:
        with pytest.raises(InvalidRequestError, match=field):
            _raw_infer(topology.ap, x, deadline, accuracy)
    assert client.infer("digits", x, deadline_ms=SLACK_MS).outcome == "ok"


def _raw_infer(ap: str, x: np.ndarray, deadline_ms: float, min_accuracy: float) -> None:
    """Bypass the SDK's own checks so that the AP's are what is tested."""
    from apdispatch.common.errors import from_status
    from apdispatch.common.protocol import dispatcher_pb2 as pb
    from apdispatch.common.protocol import dispatcher_pb2_grpc as pb_grpc
    from apdispatch.common.tensors import to_tensor

    with grpc.insecure_channel(ap) as channel:
        stub = pb_grpc.DispatcherStub(channel)
        request = pb.InferRequest(
            task="digits",
            inputs=[to_tensor("input", x)],
            sla=pb.SLA(deadline_ms=deadline_ms, min_accuracy=min_accuracy),
        )
        try:
            stub.Infer(request, timeout=WAIT_S)
        except grpc.RpcError as exc:
            raise from_status(exc.code(), exc.details() or "") from None


def test_stream_errors_do_not_end_the_stream(topology: Topology, client: Client) -> None:
    x = _one(topology)
    requests = [
        StreamRequest(task="digits", inputs=x, deadline_ms=SLACK_MS),
        StreamRequest(task="nope", inputs=x, deadline_ms=SLACK_MS),
        StreamRequest(task="digits", inputs=x.astype(np.float64), deadline_ms=SLACK_MS),
        StreamRequest(task="digits", inputs=x, deadline_ms=SLACK_MS, min_accuracy=0.9999),
        StreamRequest(task="digits", inputs=x, deadline_ms=SLACK_MS),
    ]
    results = {r.request_id: r for r in client.stream(requests)}
    assert len(results) == 5
    outcomes = sorted(r.outcome for r in results.values())
    assert outcomes == ["failed", "failed", "ok", "ok", "rejected"]
    errors = " ".join(r.error for r in results.values())
    assert "task" in errors and "inputs[0].datatype" in errors and "sla.min_accuracy" in errors


def test_calls_cancelled_by_their_clients_leave_the_others_answered(topology: Topology) -> None:
    """Calls that give up while their requests are at the cloud do not take other replies with them.

    The AP coalesces requests for one worker into one call; a reply to a
    cancelled call must not end the delivery of the rest of its batch.
    """
    from apdispatch.common.protocol import dispatcher_pb2 as pb
    from apdispatch.common.protocol import dispatcher_pb2_grpc as pb_grpc
    from apdispatch.common.tensors import to_tensor

    x = _one(topology)
    # Above every edge variant: only the cloud (40 ms away) can serve these.
    sla = pb.SLA(deadline_ms=2000.0, min_accuracy=topology.cloud_accuracy)
    request = pb.InferRequest(task="digits", inputs=[to_tensor("input", x)], sla=sla)
    with grpc.insecure_channel(topology.ap) as channel:
        stub = pb_grpc.DispatcherStub(channel)
        stub.Infer(request, timeout=10)
        for _ in range(5):
            calls = [stub.Infer.future(request, timeout=10.0) for _ in range(16)]
            # Every other call gives up after 10 ms, long before the cloud's reply. (A
            # short gRPC deadline would not do: the AP rejects at once a request whose
            # client deadline comes before any predicted completion.)
            time.sleep(0.01)
            cancelled = [call.cancel() for call in calls[::2]]
            for i, call in enumerate(calls):
                if i % 2 == 1:
                    assert call.result().outcome == pb.OK, f"call {i}"
                elif cancelled[i // 2]:
                    with pytest.raises(grpc.FutureCancelledError):
                        call.result()


GARBAGE = b"\xff\xff\xff\xff not a protobuf message"


def _encoded(topology: Topology, request_id: str) -> bytes:
    from apdispatch.common.protocol import dispatcher_pb2 as pb
    from apdispatch.common.tensors import to_tensor

    request = pb.InferRequest(
        task="digits",
        inputs=[to_tensor("input", _one(topology))],
        sla=pb.SLA(deadline_ms=SLACK_MS, min_accuracy=0.5),
        request_id=request_id,
    )
    return request.SerializeToString()


def test_undecodable_request_is_invalid_argument(topology: Topology, client: Client) -> None:
    with grpc.insecure_channel(topology.ap) as channel:
        infer = channel.unary_unary("/apdispatch.v1.Dispatcher/Infer")
        with pytest.raises(grpc.RpcError) as caught:
            infer(GARBAGE, timeout=WAIT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request" in (caught.value.details() or "")
    assert client.infer("digits", _one(topology), deadline_ms=SLACK_MS).outcome == "ok"


def test_undecodable_stream_message_gets_a_reply_and_the_stream_goes_on(topology: Topology) -> None:
    from apdispatch.common.protocol import dispatcher_pb2 as pb

    messages = [_encoded(topology, "a"), GARBAGE, _encoded(topology, "b")]
    with grpc.insecure_channel(topology.ap) as channel:
        stream = channel.stream_stream(
            "/apdispatch.v1.Dispatcher/InferStream", response_deserializer=pb.InferResponse.FromString
        )
        call = stream(iter(messages), timeout=WAIT_S)
        replies = list(call)
        assert call.code() == grpc.StatusCode.OK
    assert len(replies) == 3
    by_id = {r.request_id: r for r in replies}
    assert by_id["a"].outcome == pb.OK and by_id["b"].outcome == pb.OK
    bad = by_id[""]
    assert bad.outcome == pb.FAILED
    assert bad.status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "request" in bad.error


def test_a_coalesced_requests_confidence_is_its_own_rows() -> None:
    from apdispatch.ap.forwarder import OutputTensor, _own_confidence

    # softmax([2, 0]) tops at 1 / (1 + e^-2) = 0.881; softmax([0, 0]) at 0.5: the least sure row's.
    logits = np.array([[2.0, 0.0], [0.0, 0.0]], dtype="<f4")
    mine = OutputTensor("logits", "FP32", (2, 2), logits.tobytes())
    assert _own_confidence([mine]) == pytest.approx(0.5)
    first = OutputTensor("logits", "FP32", (1, 2), logits[:1].tobytes())
    assert _own_confidence([first]) == pytest.approx(1.0 / (1.0 + math.exp(-2.0)))
    assert _own_confidence([mine, mine]) is None  # not a classifier's one output
