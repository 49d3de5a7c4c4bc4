"""Generated hostile input through both APIs of a live AP with real edge workers.

Each request is bytes built from the proto descriptors (tests/proto_strategies.py):
a message with arbitrary fields, a valid request with some fields changed,
a garbled one or raw garbage. Whatever it is, the AP answers it with a clear
status (never INTERNAL or UNKNOWN), within the client's generous timeout (no
hang), a stream answers every message and goes on, and the AP then still
serves a good request.

APDISPATCH_FUZZ_EXAMPLES sets the examples per API (``make test``: a short
run; ``make fuzz``: at least 10,000 requests). The run is derandomized (the
same examples every time) unless APDISPATCH_FUZZ_SEED is set.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from live_ap import APThread, live_ap, sample
from proto_strategies import wire

from apdispatch.ap.config import APConfig
from apdispatch.client import build_request
from apdispatch.common.manifest import load_manifest
from apdispatch.common.protocol import dispatcher_pb2 as pb

EXAMPLES = int(os.environ.get("APDISPATCH_FUZZ_EXAMPLES", "150"))
SEED = os.environ.get("APDISPATCH_FUZZ_SEED")
TIMEOUT_S = 30.0  # only to tell a hang from an answer
GOOD_DEADLINE_MS = 30_000.0
# What bad input may get; anything else (INTERNAL, UNKNOWN, DEADLINE_EXCEEDED
# from our own timeout, ...) is a finding.
CLEAR = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
CLEAR_CODES = {c.value[0] for c in CLEAR}
_CODES = {c.value[0]: c for c in grpc.StatusCode}
DATATYPES = ["FP32", "FP64", "FP16", "INT64", "INT32", "UINT8", "BOOL", "BYTES", "FOO", "fp32", ""]

SENT: Counter[str] = Counter()
ANSWERS: Counter[str] = Counter()  # by API and status, printed at the end


def fuzz_settings(f: Callable[..., Any]) -> Callable[..., Any]:
    f = settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=SEED is None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )(f)
    return seed(int(SEED))(f) if SEED is not None else f


@pytest.fixture(scope="module")
def ap(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[APThread]:
    # One summary line per second at most: the fuzz run is not about logs.
    config = APConfig(listen="127.0.0.1:0", stream_max_pending=16)
    with live_ap(config, models_dir, tmp_path_factory.mktemp("fuzz")) as running:
        yield running
    print(f"\nfuzz: {SENT['infer']} requests through Infer, {SENT['stream']} through InferStream")
    print("fuzz: answers", dict(sorted(ANSWERS.items())))


@pytest.fixture(scope="module")
def channel(ap: APThread) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(ap.address, options=options) as ch:
        yield ch


@pytest.fixture(scope="module")
def corpus(models_dir: Path) -> tuple[list[pb.InferRequest], dict[str, st.SearchStrategy[Any]]]:
    """Valid requests to mutate, and values that reach past the first checks."""
    manifest = load_manifest(models_dir)
    edge = [v for v in manifest.variants if v.runtime == "onnx"]
    valid = []
    for v in edge:
        for rows in (1, 2):
            req = build_request(v.task, sample(models_dir, v.task, rows), deadline_ms=GOOD_DEADLINE_MS)
            valid.append(req)
            with_variant = pb.InferRequest()
            with_variant.CopyFrom(req)
            with_variant.variant = v.name
            with_variant.app = "fuzz"
            valid.append(with_variant)
    names = sorted({s.name for v in edge for s in v.inputs} | {"input"})
    overrides: dict[str, st.SearchStrategy[Any]] = {
        "apdispatch.v1.InferRequest.task": st.sampled_from(sorted({v.task for v in manifest.variants})),
        "apdispatch.v1.InferRequest.variant": st.sampled_from([v.name for v in manifest.variants]),
        "apdispatch.v1.Tensor.name": st.sampled_from(names),
        "apdispatch.v1.Tensor.datatype": st.sampled_from(DATATYPES),
        "apdispatch.v1.SLA.deadline_ms": st.sampled_from([0.001, 1.0, 100.0, GOOD_DEADLINE_MS, 3.6e6, 3.7e6]),
        "apdispatch.v1.SLA.min_accuracy": st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]),
    }
    return valid, overrides


def _good(models_dir: Path, request_id: str = "good") -> pb.InferRequest:
    return build_request(
        "digits", sample(models_dir), deadline_ms=GOOD_DEADLINE_MS, min_accuracy=0.0, request_id=request_id
    )


def _assert_serves(channel: grpc.Channel, models_dir: Path) -> None:
    infer = channel.unary_unary(
        "/apdispatch.v1.Dispatcher/Infer",
        request_serializer=pb.InferRequest.SerializeToString,
        response_deserializer=pb.InferResponse.FromString,
    )
    reply = infer(_good(models_dir), timeout=TIMEOUT_S)
    assert reply.outcome == pb.OK, reply


def test_infer_answers_every_generated_request_clearly(
    ap: APThread, channel: grpc.Channel, corpus: tuple[list[pb.InferRequest], Any], models_dir: Path
) -> None:
    valid, overrides = corpus
    infer = channel.unary_unary(
        "/apdispatch.v1.Dispatcher/Infer", response_deserializer=pb.InferResponse.FromString
    )

    @fuzz_settings
    @given(data=wire(pb.InferRequest.DESCRIPTOR, valid, overrides))
    def check(data: bytes) -> None:
        SENT["infer"] += 1
        try:
            reply = infer(data, timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            ANSWERS[f"infer {exc.code().name}"] += 1
            assert exc.code() in CLEAR, (exc.code(), exc.details())
            assert exc.details(), exc.code()
        else:
            ANSWERS[f"infer {pb.Outcome.Name(reply.outcome)}"] += 1
            assert reply.outcome in (pb.OK, pb.LATE, pb.INACCURATE), reply

    check()
    _assert_serves(channel, models_dir)


def test_stream_answers_every_generated_message_and_goes_on(
    ap: APThread, channel: grpc.Channel, corpus: tuple[list[pb.InferRequest], Any], models_dir: Path
) -> None:
    valid, overrides = corpus
    stream = channel.stream_stream(
        "/apdispatch.v1.Dispatcher/InferStream", response_deserializer=pb.InferResponse.FromString
    )
    good = _good(models_dir, "good-after").SerializeToString()
    limit = ap.config.max_message_bytes

    @fuzz_settings
    @given(batch=st.lists(wire(pb.InferRequest.DESCRIPTOR, valid, overrides), min_size=1, max_size=8))
    def check(batch: list[bytes]) -> None:
        SENT["stream"] += len(batch)
        messages = [*batch, good]
        call = stream(iter(messages), timeout=TIMEOUT_S)
        try:
            replies = list(call)
        except grpc.RpcError as exc:
            # Only a message over the size limit ends a stream, and gRPC says why.
            ANSWERS[f"stream ended {exc.code().name}"] += 1
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (exc.code(), exc.details())
            assert any(len(m) > limit for m in batch)
            return
        assert len(replies) == len(messages), [r.error for r in replies]
        for reply in replies:
            code = _CODES.get(reply.status_code)
            ANSWERS[f"stream {code.name if code else reply.status_code}"] += 1
            assert reply.status_code in CLEAR_CODES, (reply.status_code, reply.error)
            if reply.status_code:
                assert reply.error
        last = [r for r in replies if r.request_id == "good-after"]
        assert last and last[-1].outcome == pb.OK, last

    check()
    _assert_serves(channel, models_dir)
