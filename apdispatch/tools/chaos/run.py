"""A chaos run: the scenario's topology and an AP as subprocesses, the load generator in
this process, and the fault schedule played against the subprocesses meanwhile.

Every worker listens on a fixed port, so that a restarted worker comes back on
the address the AP knows; a restarted AP listens on the first one's address, so
that workers and clients find it again. Nothing here looks inside the AP: the
tool only injects faults and counts what the clients got.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
import grpc.aio

from apdispatch.common.protocol import oip_pb2 as oip
from apdispatch.common.protocol import oip_pb2_grpc as oip_grpc
from apdispatch.scenario import Scenario
from apdispatch.tools.chaos.faults import (
    AP_KILL,
    WORKER_KILL,
    WORKER_STOP,
    Fault,
)
from apdispatch.tools.chaos.report import Accounting, FaultRecord
from apdispatch.tools.processes import (
    Child,
    ChildError,
    Children,
    free_port,
    registered_workers,
    wait_for_workers,
)
from apdispatch.tools.topology import WorkerSpec

REGISTER_TIMEOUT_S: Final = 90.0  # a cold cloud worker imports torch and loads models first
STOP_TIMEOUT_S: Final = 15.0  # a SIGTERM'd process drains (5 s by default) before SIGKILL
MIN_GAP_S: Final = 0.5  # between one fault's recovery and the next injection
CHECKPOINT_INTERVAL_S: Final = 10.0  # a learned AP killed with -9 resumes from at most this far back
# The load generator's channel finds a restarted AP within half a second, rather
# than after gRPC's default reconnect back-off (1 s, growing to 120 s), which
# would count the client's own back-off as the AP's downtime.
CLIENT_CHANNEL_OPTIONS: Final = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)


def _signal(child: Child, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.popen.pid, sig)


@dataclass
class Topology:
    """The live processes: one AP address, one fixed address per worker."""

    children: Children
    ap: str
    ap_argv: list[str]
    worker_argv: dict[str, list[str]]
    worker_address: dict[str, str]
    ap_child: Child | None = None
    workers: dict[str, Child] = field(default_factory=dict)
    ap_starts: int = 0
    frozen: set[str] = field(default_factory=set)

    @classmethod
    def plan(
        cls,
        children: Children,
        specs: Sequence[WorkerSpec],
        models: Path,
        policy: str,
        checkpoint: Path | None,
    ) -> Topology:
        ap = f"127.0.0.1:{free_port()}"
        ap_argv = ["serve", "--listen", ap, "--policy", policy]
        if checkpoint is not None:
            ap_argv += [
                "--checkpoint",
                str(checkpoint),
                "--checkpoint-interval-s",
                str(CHECKPOINT_INTERVAL_S),
            ]
        models_arg = str(models.resolve())
        argv: dict[str, list[str]] = {}
        address: dict[str, str] = {}
        for spec in specs:
            address[spec.worker_id] = f"127.0.0.1:{free_port()}"
            argv[spec.worker_id] = spec.argv(listen=address[spec.worker_id], models=models_arg, ap=ap)
        return cls(children, ap, ap_argv, argv, address)

    def start_ap(self) -> Child:
        self.ap_starts += 1
        self.ap_child = self.children.start("ap", self.ap_argv)
        return self.ap_child

    def start_worker(self, worker_id: str) -> Child:
        child = self.children.start(worker_id, self.worker_argv[worker_id])
        self.workers[worker_id] = child
        return child

    def start(self) -> None:
        """The AP first, so that the workers' first registration finds it; then wait for all."""
        ap_child = self.start_ap()
        for worker_id in self.worker_argv:
            self.start_worker(worker_id)
        wait_for_workers(self.ap, ap_child, self.workers, REGISTER_TIMEOUT_S)

    def thaw(self) -> None:
        """SIGCONT every frozen worker: a stopped process cannot act on SIGTERM."""
        for worker_id in list(self.frozen):
            _signal(self.workers[worker_id], signal.SIGCONT)
        self.frozen.clear()


async def _registered(topo: Topology, ids: Sequence[str], timeout_s: float) -> None:
    """Every worker of ``ids`` is listed by the AP; the AP and the workers must stay up.

    ``wait_for_workers`` polls in short steps, each in a thread: an interrupt
    never waits for more than one of them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        assert topo.ap_child is not None
        for child in [topo.ap_child, *(topo.workers[w] for w in ids)]:
            if child.exited() is not None:
                raise ChildError(f"{child.name} stopped:\n{child.describe()}")
        listed = await asyncio.to_thread(registered_workers, topo.ap)
        if listed is not None and set(ids) <= set(listed[0]):
            return
        if loop.time() > deadline:
            raise ChildError(f"not all of {', '.join(ids)} registered with the AP within {timeout_s:.0f} s")
        await asyncio.sleep(0.1)


async def _worker_ready(topo: Topology, worker_id: str, timeout_s: float) -> None:
    """The restarted worker answers ServerReady on its address and the AP lists it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    child = topo.workers[worker_id]
    async with grpc.aio.insecure_channel(topo.worker_address[worker_id]) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        while True:
            if child.exited() is not None:
                raise ChildError(f"{worker_id} stopped after its restart:\n{child.describe()}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.ServerReady(oip.ServerReadyRequest(), timeout=0.5)
                if reply.ready:
                    break
            if loop.time() > deadline:
                raise ChildError(f"{worker_id} not ready {timeout_s:.0f} s after its restart")
            await asyncio.sleep(0.1)
    await _registered(topo, [worker_id], max(1.0, deadline - loop.time()))


class FaultRunner:
    """Injects the faults one at a time, each at its planned time or once the previous
    one has recovered, until the load stops sending."""

    def __init__(
        self,
        topo: Topology,
        faults: Sequence[Fault],
        accounting: Accounting,
        origin: float,
        duration_s: float,
    ) -> None:
        self.topo = topo
        self.records = [FaultRecord(f) for f in faults]
        self.accounting = accounting
        self.loop = asyncio.get_running_loop()
        self.origin = origin
        self.duration_s = duration_s

    def now_s(self) -> float:
        return self.loop.time() - self.origin

    async def run(self) -> None:
        ready_at = 0.0
        for record in self.records:
            at = max(record.fault.at_s, ready_at + MIN_GAP_S)
            if at >= self.duration_s:
                return  # the load has stopped sending: nothing left to measure
            await asyncio.sleep(max(0.0, at - self.now_s()))
            try:
                await self._inject(record)
            except (ChildError, OSError) as exc:
                record.error = str(exc).splitlines()[0]
                return  # the system is not whole again: later faults would measure this one
            ready_at = self.now_s()

    async def _stop(self, child: Child, sig: signal.Signals) -> int:
        return await asyncio.to_thread(self.topo.children.stop, child, STOP_TIMEOUT_S, sig)

    async def _inject(self, record: FaultRecord) -> None:
        fault = record.fault
        topo = self.topo
        self.accounting.open_window(self.loop.time(), fault)
        record.injected_s = self.now_s()
        if fault.on_ap:
            assert topo.ap_child is not None
            sig = signal.SIGKILL if fault.kind == AP_KILL else signal.SIGTERM
            record.exit_code = await self._stop(topo.ap_child, sig)
            record.down_s = self.now_s()
            await asyncio.sleep(fault.hold_s)
            await asyncio.to_thread(topo.start_ap)
            record.resumed_s = self.now_s()
            await _registered(topo, list(topo.workers), REGISTER_TIMEOUT_S)
        elif fault.kind == WORKER_STOP:
            child = topo.workers[fault.target]
            _signal(child, signal.SIGSTOP)
            topo.frozen.add(fault.target)
            record.down_s = self.now_s()
            await asyncio.sleep(fault.hold_s)
            _signal(child, signal.SIGCONT)
            topo.frozen.discard(fault.target)
            record.resumed_s = self.now_s()
        else:
            sig = signal.SIGKILL if fault.kind == WORKER_KILL else signal.SIGTERM
            record.exit_code = await self._stop(topo.workers[fault.target], sig)
            record.down_s = self.now_s()
            await asyncio.sleep(fault.hold_s)
            await asyncio.to_thread(topo.start_worker, fault.target)
            record.resumed_s = self.now_s()
            await _worker_ready(topo, fault.target, REGISTER_TIMEOUT_S)
        record.recovered_s = self.now_s()


async def play(
    topo: Topology,
    scenario: Scenario,
    models: Path,
    faults: Sequence[Fault],
    seed: int,
    progress: bool,
) -> tuple[dict[str, Any], Accounting, list[dict[str, Any]], list[FaultRecord]]:
    """The load and the faults together: the load report, the accounting and its
    windows' rows, the fault records."""
    # Imported here, as in the demo: the load generator only once the topology runs.
    from apdispatch.tools.loadgen import run_load

    accounting = Accounting()
    loop = asyncio.get_running_loop()
    origin = loop.time()
    runner = FaultRunner(topo, faults, accounting, origin, scenario.duration_s)
    injector = asyncio.create_task(runner.run())
    try:
        report = await run_load(
            scenario,
            topo.ap,
            models,
            seed=seed,
            progress=progress,
            observer=accounting,
            channel_options=CLIENT_CHANNEL_OPTIONS,
        )
    except BaseException:
        injector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await injector
        raise
    # A recovery under way when the load ended still completes: the processes stay whole.
    await injector
    return report.to_dict(), accounting, accounting.window_rows(origin, scenario.duration_s), runner.records
