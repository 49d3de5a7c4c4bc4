"""Bounds on what a client can make the AP hold: message size, app names, unread stream replies."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from live_ap import APThread, live_ap, sample

from apdispatch import Client, InvalidRequestError
from apdispatch.ap.config import APConfig, ConfigError
from apdispatch.ap.metrics import OTHER_APPS, Stats
from apdispatch.ap.validate import MAX_APP_LEN, valid_app
from apdispatch.client import MAX_REQUEST_BYTES, build_request
from apdispatch.common.outcomes import Outcome
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.common.protocol import dispatcher_pb2_grpc as pb_grpc

MAX_PENDING = 16
UNBOUNDED = (("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1))


@pytest.fixture(scope="module")
def ap(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[APThread]:
    config = APConfig(listen="127.0.0.1:0", stream_max_pending=MAX_PENDING)
    with live_ap(config, models_dir, tmp_path_factory.mktemp("limits")) as running:
        yield running


@pytest.fixture
def stub(ap: APThread) -> Iterator[pb_grpc.DispatcherStub]:
    with grpc.insecure_channel(ap.address, options=UNBOUNDED) as channel:
        yield pb_grpc.DispatcherStub(channel)


def _request(models_dir: Path, app: str = "", request_id: str = "") -> pb.InferRequest:
    return build_request(
        "digits", sample(models_dir), deadline_ms=30_000, min_accuracy=0.0, app=app, request_id=request_id
    )


# --- message size -------------------------------------------------------------------------------


@pytest.mark.unit
def test_config_bounds_the_message_size_below_the_transport() -> None:
    with pytest.raises(ConfigError, match="max_message_bytes"):
        APConfig(max_message_bytes=65 * 1024 * 1024).validate()
    with pytest.raises(ConfigError, match="stream_max_pending"):
        APConfig(stream_max_pending=0).validate()


def test_oversized_request_is_resource_exhausted_at_once(
    ap: APThread, stub: pb_grpc.DispatcherStub, models_dir: Path
) -> None:
    request = _request(models_dir)
    request.inputs[0].data = bytes(ap.config.max_message_bytes + 1)
    before = ap.ap.stats.total
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (info.value.details() or "")
    # Refused by gRPC before the request reached the data plane.
    assert ap.ap.stats.total == before
    # A request within the limit is still served.
    assert stub.Infer(_request(models_dir), timeout=30).outcome == pb.OK


def test_oversized_stream_message_ends_that_stream_only(
    ap: APThread, stub: pb_grpc.DispatcherStub, models_dir: Path
) -> None:
    big = _request(models_dir, request_id="big")
    big.inputs[0].data = bytes(ap.config.max_message_bytes + 1)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.InferStream(iter([big]), timeout=30))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    replies = list(stub.InferStream(iter([_request(models_dir, request_id="after")]), timeout=30))
    assert [(r.request_id, r.outcome) for r in replies] == [("after", pb.OK)]


def test_sdk_refuses_an_input_over_the_limit_before_sending(ap: APThread) -> None:
    too_big = np.zeros((1, MAX_REQUEST_BYTES // 4 + 1), dtype=np.float32)
    before = ap.ap.stats.total
    with Client(ap.address) as client, pytest.raises(InvalidRequestError) as info:
        client.infer("digits", {"pixels": too_big}, deadline_ms=30_000)
    assert info.value.field == "inputs.pixels"
    assert str(MAX_REQUEST_BYTES) in info.value.message
    assert ap.ap.stats.total == before


@pytest.mark.unit
def test_sdk_counts_every_input_towards_the_limit() -> None:
    half = np.zeros(MAX_REQUEST_BYTES // 2 // 4, dtype=np.float32)
    with pytest.raises(InvalidRequestError) as info:
        build_request("t", {"a": half, "b": half[:-1], "c": half[:10]}, deadline_ms=1.0)
    assert info.value.field == "inputs.a"  # the largest
    build_request("t", {"a": half[: len(half) // 2]}, deadline_ms=1.0)


# --- app names ----------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("app", "ok"),
    [
        ("", True),
        ("ar-overlay", True),
        ("team/app:v1.2@edge+x_y", True),
        ("a" * MAX_APP_LEN, True),
        ("a" * (MAX_APP_LEN + 1), False),
        ("has space", False),
        ("caf\u00e9", False),
        ("nul\x00", False),
        ("(other)", False),
    ],
)
def test_valid_app(app: str, ok: bool) -> None:
    assert valid_app(app) is ok


@pytest.mark.parametrize("app", ["x" * (1024 * 1024), "bad name", "\u202e\u0000"])
def test_bad_app_name_is_invalid_argument(
    ap: APThread, stub: pb_grpc.DispatcherStub, models_dir: Path, app: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(_request(models_dir, app=app), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert details.startswith("app:")
    assert len(details) < 500  # the name is not echoed whole
    assert all(len(name) <= MAX_APP_LEN for name in ap.ap.stats.by_app)


@pytest.mark.parametrize("field", ["task", "request_id", "variant"])
def test_huge_names_are_invalid_argument_and_not_echoed(
    stub: pb_grpc.DispatcherStub, models_dir: Path, field: str
) -> None:
    request = _request(models_dir)
    setattr(request, field, "y" * (1024 * 1024))
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert details.startswith(f"{field}:") and len(details) < 500
    # On a stream the reply carries the request's id: not a megabyte of it.
    replies = list(stub.InferStream(iter([request]), timeout=30))
    assert len(replies) == 1 and replies[0].outcome == pb.FAILED
    assert len(replies[0].request_id) <= MAX_APP_LEN and len(replies[0].error) < 500


def test_distinct_huge_app_names_add_nothing_per_name(
    ap: APThread, stub: pb_grpc.DispatcherStub, models_dir: Path
) -> None:
    for i in range(50):
        request = _request(models_dir, app=f"{i:04d}" + "x" * (1024 * 1024))
        request.task = "no-such-task"
        with pytest.raises(grpc.RpcError) as info:
            stub.Infer(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    by_app = ap.ap.stats.by_app
    assert all(len(name) <= MAX_APP_LEN for name in by_app)
    assert by_app[OTHER_APPS][Outcome.FAILED] >= 50


@pytest.mark.unit
def test_stats_per_app_table_is_capped() -> None:
    stats = Stats(max_apps=3)
    for i in range(10):
        stats.record(Outcome.OK, f"app{i}", 1.0)
    stats.record(Outcome.OK, "app0", 1.0)
    stats.record(Outcome.FAILED, "x" * 10_000, 1.0)
    assert set(stats.by_app) == {"app0", "app1", "app2", OTHER_APPS}
    assert stats.by_app["app0"][Outcome.OK] == 2
    assert stats.by_app[OTHER_APPS] == {Outcome.OK: 7, Outcome.FAILED: 1}
    assert stats.total == 12


# --- a stream whose client does not read --------------------------------------------------------


def test_unread_stream_is_flow_controlled(
    ap: APThread, stub: pb_grpc.DispatcherStub, models_dir: Path
) -> None:
    n = 3000
    template = _request(models_dir)
    written = 0
    done_writing = threading.Event()

    def requests() -> Iterator[pb.InferRequest]:
        nonlocal written
        for i in range(n):
            request = pb.InferRequest()
            request.CopyFrom(template)
            request.request_id = f"r{i}"
            written += 1
            yield request
        done_writing.set()

    ap.ap.stats.stream_pending_peak = 0
    replies = stub.InferStream(requests(), timeout=300)
    # Read nothing until the writer is held back by flow control (or is done).
    last, still = -1, 0
    while not done_writing.is_set() and still < 10:
        time.sleep(0.2)
        still = still + 1 if written == last else 0
        last = written
    assert 0 < ap.ap.stats.stream_pending_peak <= MAX_PENDING
    ids = [r.request_id for r in replies]
    assert sorted(ids) == sorted(f"r{i}" for i in range(n))
    assert ap.ap.stats.stream_pending_peak <= MAX_PENDING
    assert ap.ap.stats.stream_pending == 0


@pytest.mark.unit
def test_learned_reservations_forget_quiet_apps_beyond_the_cap() -> None:
    from apdispatch.learned.guard_config import GuardConfig
    from apdispatch.learned.reserve import Reservations
    from apdispatch.routing.policy import Candidate, RequestView

    config = GuardConfig()
    MAX_APPS, REFRESH_S = config.max_apps, config.refresh_s
    r = Reservations(config)
    cands = [Candidate("mec/mec/large", "mec", "mec", "large", 0.95, 7.0, 0, 1, 18.0)]
    for i in range(3 * MAX_APPS):
        now = i * 0.01
        # One steady app, and a new name with every other request.
        for app in ("steady", f"once-{i}"):
            view = RequestView("digits", app, 25.0, 0.9, now)
            r.arrive(view)
            r.defer(view, cands)
            r.outcome(app, True)
        r.catch_up(now)
        # Quiet ones are forgotten with the pressures' refresh, every REFRESH_S (20 new names here).
        assert r.apps() <= MAX_APPS + 1 + REFRESH_S / 0.01
    assert r.rate("steady", 3 * MAX_APPS * 0.01) > 50.0
