"""Overload protection and drain: the AP sheds what it cannot serve and refuses new work while stopping.

The limit's maths is checked against hand-computed cases; the rest runs a real
AP (in this process, so that its state can be read) and a real edge worker
whose slot is held for a fixed service time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apdispatch.ap.config import APConfig, ConfigError, load_config
from apdispatch.ap.overload import ConcurrencyLimit, LoopLag, Overload, OverloadConfig
from apdispatch.ap.server import AccessPoint
from apdispatch.client import AsyncClient, build_request
from apdispatch.common.errors import RejectedError, UnavailableError
from apdispatch.common.logs import make_logger
from apdispatch.common.manifest import load_manifest
from apdispatch.common.outcomes import Outcome
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.common.protocol import dispatcher_pb2_grpc as pb_grpc
from apdispatch.tools.processes import free_port
from workers.config import WorkerConfig
from workers.runtime import ServiceTime
from workers.server import Worker

WAIT_S = 60.0  # only to turn a hang into a failure


# The limit, by hand ------------------------------------------------------------


def test_limit_falls_from_what_is_in_flight_while_the_lag_stays_over_target() -> None:
    limit = ConcurrencyLimit(
        OverloadConfig(max_in_flight=100, min_in_flight=10, lag_target_ms=5.0, decrease_factor=0.5)
    )
    assert limit.limit == 100
    for _ in range(60):
        assert limit.try_acquire()
    limit.adjust(0.010)  # 10 ms > 5: from the 60 in flight, halved
    assert limit.limit == 30
    limit.adjust(0.010)  # in flight (60) is above the limit: the limit itself is halved
    assert limit.limit == 15
    limit.adjust(0.010)
    assert limit.limit == 10  # not below the floor
    assert not limit.try_acquire()  # 60 in flight, limit 10: shed
    assert limit.shed == 1


def test_limit_rises_only_when_it_held_requests_back_and_the_lag_is_low() -> None:
    limit = ConcurrencyLimit(OverloadConfig(max_in_flight=40, min_in_flight=4, increase_step=8))
    limit.limit = 20
    limit.adjust(0.001)  # low lag, but nothing was refused: no reason to grow
    assert limit.limit == 20
    for _ in range(20):
        assert limit.try_acquire()
    assert not limit.try_acquire()
    limit.adjust(0.001)
    assert limit.limit == 28
    limit.release()
    assert limit.in_flight == 19
    for _ in range(3):
        limit.try_acquire()
        limit._held_back = True
        limit.adjust(0.0)
    assert limit.limit == 40  # not above the ceiling


def test_lag_minimum_is_per_window_and_arrival_is_dated_back_by_the_latest_lag() -> None:
    lag = LoopLag(0.005, clock=lambda: 0.0)
    assert lag.take_min() == 0.0  # no sample yet
    for sample in (0.004, 0.002, 0.009):
        lag.record(sample)
    assert lag.take_min() == 0.002
    assert lag.take_min() == 0.0
    overload = Overload(OverloadConfig(), clock=lambda: 0.0)
    overload.lag.record(0.030)
    assert overload.arrival(100.0) == pytest.approx(99.970)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("min_in_flight", 0),
        ("max_in_flight", 8),  # below the default floor of 16
        ("lag_target_ms", 0.0),
        ("lag_interval_ms", float("nan")),
        ("decrease_factor", 1.0),
        ("increase_step", 0),
    ],
)
def test_overload_keys_are_checked_by_name(tmp_path: Path, key: str, value: float) -> None:
    path = tmp_path / "ap.toml"
    path.write_text(f"{key} = {value!r}\n")
    with pytest.raises(ConfigError, match=key):
        load_config(path)


# A live AP -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def ap_and_worker(
    models_dir: Path, service_ms: float, **config: object
) -> AsyncIterator[tuple[AccessPoint, np.ndarray]]:
    """An AP and one one-slot edge worker holding ``digits-small`` for ``service_ms`` per request."""
    manifest = load_manifest(models_dir)
    small = manifest.variant("digits-small")
    ap = AccessPoint(
        replace(APConfig(listen=f"127.0.0.1:{free_port()}", policy="fastest"), **config).validate(),
        make_logger("warning"),
    )
    address = await ap.start()
    worker = Worker(
        WorkerConfig(
            kind="edge",
            listen="127.0.0.1:0",
            models=models_dir,
            variants=(small.name,),
            ap=address,
            heartbeat_s=0.2,
            service_ms={small.name: ServiceTime(service_ms, service_ms)},
        ),
        make_logger("warning"),
    )
    await worker.start()
    try:
        async with asyncio.timeout(WAIT_S):
            while not ap.registry.targets("digits"):
                await asyncio.sleep(0.02)
        with np.load(models_dir / "samples" / "digits.npz") as npz:
            x = npz["x"][:1].astype(np.float32)
        yield ap, x
    finally:
        await worker.close()
        await ap.stop(grace_s=0.5)


async def test_requests_over_the_limit_are_rejected_at_once_and_counted(models_dir: Path) -> None:
    # The limit fixed at 2 (floor = ceiling); the worker holds each request 400 ms.
    async with ap_and_worker(models_dir, 400.0, max_in_flight=2, min_in_flight=2) as (ap, x):
        async with AsyncClient(ap.address) as client:
            calls = [
                asyncio.ensure_future(client.infer("digits", x, deadline_ms=20_000, request_id=f"r{i}"))
                for i in range(2)
            ]
            async with asyncio.timeout(WAIT_S):
                while ap.overload.limit.in_flight < 2:
                    await asyncio.sleep(0.01)
            for _ in range(3):
                with pytest.raises(RejectedError, match="overloaded"):
                    await client.infer("digits", x, deadline_ms=20_000)
            first = await asyncio.gather(*calls)
        assert [r.outcome for r in first] == ["ok", "ok"]
        assert ap.overload.limit.shed == 3
        assert ap.overload.limit.in_flight == 0  # every place given back
        assert ap.stats.totals[Outcome.REJECTED] == 3 and ap.stats.totals[Outcome.OK] == 2


async def test_a_client_deadline_shorter_than_the_sla_is_the_budget(models_dir: Path) -> None:
    # The worker takes 1 s a request. The SLA allows 30 s, but the client's gRPC
    # deadline is 300 ms: the AP rejects at once instead of forwarding a request
    # whose reply nobody would be waiting for.
    async with ap_and_worker(models_dir, 1000.0) as (ap, x):
        request = build_request("digits", x, deadline_ms=30_000)
        async with grpc.aio.insecure_channel(ap.address) as channel:
            stub = pb_grpc.DispatcherStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Infer(request, timeout=0.3)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
            # The same SLA without a client deadline is forwarded and served.
            reply = await stub.Infer(request, timeout=WAIT_S)
        assert reply.outcome == pb.OK
        assert ap.stats.totals[Outcome.REJECTED] == 1 and ap.stats.totals[Outcome.OK] == 1


async def test_drain_reports_not_serving_answers_what_it_took_and_ends_open_streams(
    models_dir: Path,
) -> None:
    async with (
        ap_and_worker(models_dir, 500.0) as (ap, x),
        grpc.aio.insecure_channel(ap.address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        check = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT_S)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.DispatcherStub(channel)
        stream = stub.InferStream()
        await stream.write(build_request("digits", x, deadline_ms=20_000, request_id="taken"))
        async with asyncio.timeout(WAIT_S):
            while ap.overload.limit.in_flight < 1:
                await asyncio.sleep(0.01)
        # A grace far longer than the test waits: the drain ends because the stream does.
        drain = asyncio.ensure_future(ap.drain(grace_s=600.0))
        async with asyncio.timeout(WAIT_S):
            while not ap.dispatcher.draining:
                await asyncio.sleep(0.01)
        # Health turned before anything was refused (a new call would be refused now).
        status = await ap.health.Check(health_pb2.HealthCheckRequest(service=""), None)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        taken = await asyncio.wait_for(stream.read(), WAIT_S)
        assert taken.request_id == "taken" and taken.outcome == pb.OK
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(stream.read(), WAIT_S)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (ended.value.details() or "")
        await asyncio.wait_for(drain, WAIT_S)
    assert ap.stats.totals[Outcome.OK] == 1 and ap.stats.total == 1


async def test_a_request_that_reaches_a_draining_ap_is_refused_unavailable(models_dir: Path) -> None:
    async with ap_and_worker(models_dir, 10.0) as (ap, x):
        ap.dispatcher.draining = True  # as the drain sets it, before gRPC stops taking calls
        async with AsyncClient(ap.address) as client:
            with pytest.raises(UnavailableError, match="shutting down"):
                await client.infer("digits", x, deadline_ms=5_000)
        ap.dispatcher.draining = False


async def test_the_reply_margin_is_kept_out_of_the_budget(models_dir: Path) -> None:
    # The worker takes 10 ms; a 40 ms deadline leaves room for it, unless 50 ms of it
    # are kept for the reply's way back.
    for margin_ms, admitted in ((50.0, False), (0.0, True)):
        async with (
            ap_and_worker(models_dir, 10.0, reply_margin_ms=margin_ms) as (ap, x),
            AsyncClient(ap.address) as client,
        ):
            assert (await client.infer("digits", x, deadline_ms=2_000)).outcome == "ok"
            if admitted:
                # Served (in time or not, as this machine allows): not rejected.
                await client.infer("digits", x, deadline_ms=40)
            else:
                with pytest.raises(RejectedError):
                    await client.infer("digits", x, deadline_ms=40)


async def test_during_the_drain_notice_a_health_check_answers_not_serving(models_dir: Path) -> None:
    # Without a notice gRPC closes the port at once and a new Check is refused a
    # connection; with one, a probe sees the drain.
    async with (
        ap_and_worker(models_dir, 10.0, drain_notice_s=30.0) as (ap, x),
        grpc.aio.insecure_channel(ap.address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        drain = asyncio.ensure_future(ap.drain(grace_s=60.0))
        async with asyncio.timeout(WAIT_S):
            while not ap.dispatcher.draining:
                await asyncio.sleep(0.01)
        check = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT_S)
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        stub = pb_grpc.DispatcherStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Infer(build_request("digits", x, deadline_ms=5_000), timeout=WAIT_S)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        drain.cancel()


def test_overload_bench_accounts_for_every_request_and_loses_none(models_dir: Path, tmp_path: Path) -> None:
    from apdispatch.tools.overload import MULTIPLES, run

    out = tmp_path / "overload.json"
    run(models_dir, 0.5, out, runs=1)
    doc = json.loads(out.read_text())
    steps = doc["ladders"][0]["steps"]
    assert [s["multiple"] for s in steps] == list(MULTIPLES)
    buckets = ("ok", "ok_after_deadline", "late_at_client", "late", "rejected", "failed", "lost", "not_sent")
    for step in steps:
        assert sum(step[b] for b in buckets) == step["sent"] > 0, step
        assert step["lost"] == 0, step  # every request answered, whatever the load
    summary = doc["summary"]
    assert summary["runs"] == 1 and summary["lost"] == 0
    assert summary["ok"] == steps[-1]["ok"] > 0
