"""Faults: a policy or a worker that fails, a worker killed, frozen or stopped under load.

The AP runs in this process, on the test's event loop, so that a test can
read its registry and counters; workers are real OIP servers on loopback, in
this process where a test only needs them to answer, in their own processes
where a test kills, freezes or stops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest

from apdispatch.ap.config import APConfig
from apdispatch.ap.forwarder import WorkerLink
from apdispatch.ap.server import AccessPoint
from apdispatch.client import AsyncClient
from apdispatch.common.errors import NotFoundError
from apdispatch.common.logs import make_logger
from apdispatch.common.outcomes import Outcome
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.common.protocol import dispatcher_pb2_grpc as pb_grpc
from apdispatch.routing.outlier import OutlierConfig, OutlierDetector
from apdispatch.routing.policy import Candidate, Feedback, Policy, RequestView
from apdispatch.routing.registry import Registry
from apdispatch.routing.registry import Worker as RegisteredWorker
from apdispatch.tools.processes import Child, Children, free_port
from workers.config import WorkerConfig
from workers.server import Worker

TASK = "digits"
VARIANTS = ("digits-tiny", "digits-small")
# For tests about what comes back, not how fast: a deadline no loaded machine misses.
SLACK_MS = 10_000.0
WAIT_S = 120.0  # for what takes well under a second on an idle machine


@pytest.fixture(scope="module")
def x(models_dir: Path) -> np.ndarray:
    with np.load(models_dir / "samples" / f"{TASK}.npz") as npz:
        return np.ascontiguousarray(npz["x"][:1], dtype=np.float32)


async def wait_until(check: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not in time: {what}"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def access_point(**overrides: object) -> AsyncIterator[AccessPoint]:
    config = APConfig(listen="127.0.0.1:0", policy="fastest", log_level="warning")
    ap = AccessPoint(config.with_overrides(**overrides).validate(), make_logger("warning"))
    await ap.start()
    try:
        yield ap
    finally:
        await ap.stop(grace_s=0.5)


@contextlib.asynccontextmanager
async def in_process_worker(
    models_dir: Path, ap: AccessPoint | None, worker_id: str, **overrides: object
) -> AsyncIterator[Worker]:
    config = WorkerConfig(
        kind="edge",
        listen="127.0.0.1:0",
        models=models_dir,
        variants=VARIANTS,
        ap=ap.address if ap is not None else None,
        cluster=worker_id,
        worker_id=worker_id,
        heartbeat_s=0.2,
    )
    from dataclasses import replace

    worker = Worker(replace(config, **overrides), make_logger("warning"))  # type: ignore[arg-type]
    await worker.start()
    try:
        if ap is not None:
            await wait_until(lambda: ap.registry.get(worker_id) is not None, f"{worker_id} registered")
        yield worker
    finally:
        await worker.stop(grace=1.0)


def start_worker_process(
    children: Children, models_dir: Path, ap: AccessPoint, worker_id: str, *extra: str
) -> Child:
    return children.start(
        worker_id,
        [
            "worker",
            "edge",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--worker-id",
            worker_id,
            "--cluster",
            worker_id,
            "--variants",
            ",".join(VARIANTS),
            "--models",
            str(models_dir),
            "--ap",
            ap.address,
            "--log-level",
            "warning",
            *extra,
        ],
    )


async def wait_registered(ap: AccessPoint, children: Sequence[Child]) -> None:
    def ready() -> bool:
        for child in children:
            assert child.exited() is None, child.describe()
        return all(ap.registry.get(c.name) is not None for c in children)

    await wait_until(ready, "workers registered")


def request(x: np.ndarray, deadline_ms: float = SLACK_MS, rid: str = "") -> pb.InferRequest:
    return pb.InferRequest(
        task=TASK,
        request_id=rid,
        inputs=[pb.Tensor(name="input", datatype="FP32", shape=list(x.shape), data=x.tobytes())],
        sla=pb.SLA(deadline_ms=deadline_ms, min_accuracy=0.0),
    )


# A broken policy stands for any bug inside the data plane: a Policy is the
# AP's plug-in point, and a raising one is what a buggy plug-in does.


class RaisingChoose(Policy):
    name = "raising-choose"

    def choose(self, request: RequestView, candidates: Sequence[Candidate]) -> Candidate:
        raise RuntimeError("choose broke")


class RaisingObserve(Policy):
    name = "raising-observe"

    def choose(self, request: RequestView, candidates: Sequence[Candidate]) -> Candidate:
        return candidates[0]

    def observe(self, feedback: Feedback) -> None:
        raise RuntimeError("observe broke")


# Bugs inside the data plane ----------------------------------------------------


async def test_an_exception_in_the_data_plane_fails_the_request_with_a_status(
    models_dir: Path, x: np.ndarray
) -> None:
    async with access_point() as ap, in_process_worker(models_dir, ap, "edge-a"):
        ap.dispatcher.policy = RaisingChoose()
        async with grpc.aio.insecure_channel(ap.address) as channel:
            stub = pb_grpc.DispatcherStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Infer(request(x), timeout=WAIT_S)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "choose broke" in (raised.value.details() or "")

            # On a stream every request gets its reply and the stream ends.
            call = stub.InferStream(iter([request(x, rid=f"s{i}") for i in range(5)]), timeout=WAIT_S)
            replies = [r async for r in call]
            assert sorted(r.request_id for r in replies) == [f"s{i}" for i in range(5)]
            assert {r.outcome for r in replies} == {pb.FAILED}
            assert {r.status_code for r in replies} == {grpc.StatusCode.UNAVAILABLE.value[0]}
        assert ap.stats.totals[Outcome.FAILED] == 6
        assert ap.registry.get("edge-a").in_flight == 0  # type: ignore[union-attr]


async def test_an_exception_after_a_reply_harms_no_other_request(models_dir: Path, x: np.ndarray) -> None:
    async with access_point() as ap, in_process_worker(models_dir, ap, "edge-a"):
        ap.dispatcher.policy = RaisingObserve()
        async with AsyncClient(ap.address) as client:
            results = await asyncio.gather(*(client.infer(TASK, x, deadline_ms=SLACK_MS) for _ in range(20)))
        assert [r.outcome for r in results] == [Outcome.OK] * 20
        assert ap.stats.totals == {Outcome.OK: 20}
        assert ap.registry.get("edge-a").in_flight == 0  # type: ignore[union-attr]


async def test_a_worker_error_on_a_stream_is_classified_by_its_status(
    models_dir: Path, x: np.ndarray
) -> None:
    # The worker's message names the model; the status parameter, not the
    # wording, says what went wrong.
    async with in_process_worker(models_dir, None, "edge-a") as worker:
        link = WorkerLink(worker.address, True, make_logger("warning"))
        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        link.submit(
            "deadline-of-nothing",
            ("input",),
            [("FP32", tuple(x.shape), x.tobytes())],
            1,
            time.monotonic() + 60.0,
            done.set_result,
        )
        result = await asyncio.wait_for(done, WAIT_S)
        await link.close()
    assert isinstance(result, NotFoundError), result


# Workers that die, freeze or leave ------------------------------------------------


def service(ms: float) -> list[str]:
    """Worker flags: every variant holds its slot ``ms`` per execution, whatever this machine's speed."""
    return ["--service-ms", ",".join(f"{v}={ms:g}" for v in VARIANTS), "--slots", "2"]


@contextlib.asynccontextmanager
async def processes(
    ap: AccessPoint, models_dir: Path, run_dir: Path, workers: dict[str, list[str]]
) -> AsyncIterator[dict[str, Child]]:
    children = Children(run_dir)
    try:
        started = {
            wid: start_worker_process(children, models_dir, ap, wid, *flags) for wid, flags in workers.items()
        }
        await wait_registered(ap, list(started.values()))
        yield started
    finally:
        # In a thread: the AP on this loop answers their Deregister meanwhile.
        await asyncio.to_thread(children.close)


async def send_all(ap: AccessPoint, requests: list[pb.InferRequest]) -> dict[str, pb.InferResponse]:
    """One stream carrying every request at once; the replies by request id."""
    async with grpc.aio.insecure_channel(ap.address) as channel:
        call = pb_grpc.DispatcherStub(channel).InferStream(iter(requests), timeout=WAIT_S)
        return {r.request_id: r async for r in call}


def served_by(replies: dict[str, pb.InferResponse]) -> dict[str, list[int]]:
    """Per reply: (worker, outcome) counted."""
    table: dict[str, list[int]] = {}
    for r in replies.values():
        table.setdefault(r.served_by.worker or "-", [0] * 8)[r.outcome] += 1
    return table


async def test_requests_in_flight_to_a_killed_worker_are_retried_and_it_gets_no_more(
    models_dir: Path, x: np.ndarray, tmp_path: Path
) -> None:
    # edge-a is the faster: the fastest policy sends it everything while it lives.
    async with (
        access_point(lease_s=60.0) as ap,
        processes(ap, models_dir, tmp_path, {"edge-a": service(300), "edge-b": service(1000)}) as workers,
    ):
        first = [request(x, rid=f"a{i}") for i in range(3)]
        sending = asyncio.ensure_future(send_all(ap, first))
        edge_a = ap.registry.get("edge-a")
        assert edge_a is not None
        await wait_until(lambda: edge_a.in_flight == 3, "3 requests in flight to edge-a")
        os.kill(workers["edge-a"].popen.pid, signal.SIGKILL)
        replies = await sending
        # What was in flight to it is served elsewhere: none fails.
        assert {r.outcome for r in replies.values()} == {pb.OK}
        assert {r.served_by.worker for r in replies.values()} == {"edge-b"}
        assert ap.dispatcher.retried == {"edge-a": 3}
        assert edge_a.ejected and ap.outlier.ejected() == ["edge-a"]

        # Nothing more is sent to it: no request fails, none needs a second try.
        replies = await send_all(ap, [request(x, rid=f"b{i}") for i in range(6)])
        assert {(r.outcome, r.served_by.worker) for r in replies.values()} == {(pb.OK, "edge-b")}
        assert ap.dispatcher.retried == {"edge-a": 3}
        assert ap.stats.totals == {Outcome.OK: 9}


async def test_a_frozen_worker_is_ejected_after_its_misses_and_readmitted_when_it_thaws(
    models_dir: Path, x: np.ndarray, tmp_path: Path
) -> None:
    config = {"lease_s": 60.0, "outlier_consecutive_slow": 3, "outlier_base_ejection_ms": 300.0}
    async with (
        access_point(**config) as ap,
        processes(ap, models_dir, tmp_path, {"edge-a": service(20), "edge-b": service(200)}) as workers,
    ):
        edge_a = ap.registry.get("edge-a")
        assert edge_a is not None
        pid = workers["edge-a"].popen.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            # Predicted in time on edge-a, each misses its deadline there.
            replies = await send_all(ap, [request(x, 1500.0, rid=f"a{i}") for i in range(3)])
            assert [r.outcome for r in replies.values()] == [pb.LATE] * 3
            assert edge_a.ejected
            replies = await send_all(ap, [request(x, rid=f"b{i}") for i in range(10)])
            assert {(r.outcome, r.served_by.worker) for r in replies.values()} == {(pb.OK, "edge-b")}
            assert edge_a.ejected  # its probes go unanswered
        finally:
            os.kill(pid, signal.SIGCONT)
        await wait_until(lambda: not edge_a.ejected, "edge-a readmitted")
        replies = await send_all(ap, [request(x, rid="c")])
        assert replies["c"].served_by.worker == "edge-a"


async def test_a_worker_stopped_under_load_finishes_what_it_has_and_gets_no_more(
    models_dir: Path, x: np.ndarray, tmp_path: Path
) -> None:
    async with (
        access_point(lease_s=60.0) as ap,
        processes(ap, models_dir, tmp_path, {"edge-a": service(300), "edge-b": service(1000)}) as workers,
    ):
        first = [request(x, rid=f"a{i}") for i in range(3)]
        sending = asyncio.ensure_future(send_all(ap, first))
        edge_a = ap.registry.get("edge-a")
        assert edge_a is not None
        await wait_until(lambda: edge_a.in_flight == 3, "3 requests in flight to edge-a")
        os.kill(workers["edge-a"].popen.pid, signal.SIGTERM)
        # It leaves routing at once (it deregisters) ...
        await wait_until(lambda: ap.registry.get("edge-a") is None, "edge-a deregistered")
        later = await send_all(ap, [request(x, rid=f"b{i}") for i in range(5)])
        assert {(r.outcome, r.served_by.worker) for r in later.values()} == {(pb.OK, "edge-b")}
        # ... and serves what it had: nothing in flight fails, nothing is sent twice.
        replies = await sending
        assert {(r.outcome, r.served_by.worker) for r in replies.values()} == {(pb.OK, "edge-a")}
        assert not ap.dispatcher.retried
        assert await asyncio.to_thread(workers["edge-a"].popen.wait, WAIT_S) == 0


# The outlier detector alone, on a registry and a clock of the test's ---------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def registry_of(n: int, clock: Clock) -> Registry:
    registry = Registry(lease_s=1e9, clock=clock)
    for i in range(n):
        registry.register(
            pb.RegisterRequest(
                worker_id=f"w{i}",
                address=f"127.0.0.1:{7000 + i}",
                kind="edge",
                slots=1,
                variants=[
                    pb.VariantInfo(
                        name="t-v",
                        task="t",
                        accuracy=0.9,
                        latency_ms=1.0,
                        inputs=[pb.TensorSpec(name="input", datatype="FP32", shape=[-1, 4])],
                    )
                ],
            )
        )
    return registry


def worker(registry: Registry, worker_id: str) -> RegisteredWorker:
    found = registry.get(worker_id)
    assert found is not None
    return found


def routed(registry: Registry) -> list[str]:
    return sorted(t.worker.worker_id for t in registry.targets("t") or [])


def test_a_broken_link_ejects_at_once_and_errors_after_a_run_of_them() -> None:
    clock = Clock()
    registry = registry_of(4, clock)
    outlier = OutlierDetector(registry, OutlierConfig(consecutive_errors=3, max_ejection_percent=50), clock)
    assert outlier.link_failed(worker(registry, "w0"))
    assert routed(registry) == ["w1", "w2", "w3"]
    w1 = worker(registry, "w1")
    outlier.error(w1)
    outlier.error(w1)
    outlier.success(w1)  # a served reply breaks the run
    outlier.error(w1)
    outlier.error(w1)
    assert not w1.ejected
    assert outlier.error(w1)
    assert routed(registry) == ["w2", "w3"]
    # Half of the task's workers are out: the next outlier stays in.
    assert not outlier.link_failed(worker(registry, "w2"))
    assert routed(registry) == ["w2", "w3"]


def test_a_task_served_by_one_worker_keeps_routing_to_it_when_it_is_out() -> None:
    clock = Clock()
    registry = registry_of(1, clock)
    outlier = OutlierDetector(registry, OutlierConfig(), clock)
    assert outlier.link_failed(worker(registry, "w0"))  # one may always be ejected ...
    assert routed(registry) == ["w0"]  # ... and a task with none left tries them all


def test_each_ejection_in_a_row_lasts_longer_and_the_count_decays_while_healthy() -> None:
    clock = Clock()
    registry = registry_of(3, clock)
    config = OutlierConfig(base_ejection_ms=1000.0, max_ejection_ms=2500.0, consecutive_slow=2)
    outlier = OutlierDetector(registry, config, clock)
    w0 = worker(registry, "w0")
    outlier.slow(w0)
    assert outlier.slow(w0)
    assert outlier.next_due() == pytest.approx(1.0)
    clock.now += 0.999
    assert outlier.due() == []
    clock.now += 0.001
    assert outlier.due() == [w0]
    assert outlier.due() == []  # its probe is under way
    outlier.probed(w0, ready=False)  # still down: out again, for twice as long
    assert outlier.next_due() == pytest.approx(2.0)
    clock.now += 2.0
    assert outlier.due() == [w0]
    outlier.probed(w0, ready=False)  # capped at max_ejection_ms
    assert outlier.next_due() == pytest.approx(2.5)
    clock.now += 2.5
    assert outlier.due() == [w0]
    outlier.probed(w0, ready=True)
    assert not w0.ejected and routed(registry) == ["w0", "w1", "w2"]
    # Failing again at once: the longer ejection; after a healthy while, the base again.
    assert outlier.link_failed(w0)
    assert outlier.next_due() == pytest.approx(2.5)
    clock.now += 2.5
    outlier.due()
    outlier.probed(w0, ready=True)
    clock.now += 10.0
    assert outlier.link_failed(w0)
    assert outlier.next_due() == pytest.approx(1.0)


def test_news_of_a_replaced_registration_is_ignored() -> None:
    clock = Clock()
    registry = registry_of(3, clock)
    outlier = OutlierDetector(registry, OutlierConfig(), clock)
    old = worker(registry, "w0")
    registry.register(old.registration)  # the worker restarted and registered again
    assert not outlier.link_failed(old)  # a reply owed by the old one
    assert routed(registry) == ["w0", "w1", "w2"]
    assert outlier.link_failed(worker(registry, "w0"))
