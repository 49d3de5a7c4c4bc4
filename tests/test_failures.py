"""Faults: a policy or a worker that fails, a worker killed, frozen or stopped under load.

The AP runs in this process, on the test's event loop, so that a test can
read its registry and counters; workers are real OIP servers on loopback, in
this process where a test only needs them to answer, in their own processes
where a test kills, freezes or stops them.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from apdispatch.routing.policy import Candidate, Feedback, Policy, RequestView
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
