"""One lifecycle for the AP, the workers and the load generator: the first signal drains,
a second cuts the grace period short, and the shut-down steps run either way.

The helper is tested in-process (real signals to this process where it
matters); the AP, a worker and the load generator as real processes receiving
real signals. A drain is kept from finishing by itself with a call left open
and a grace period of an hour: only the second signal can end it, so every
wait below is generous and fails only if the thing never happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from apdispatch.common.lifecycle import Lifecycle, cut_short
from apdispatch.common.protocol import dispatcher_pb2 as dpb
from apdispatch.common.protocol import dispatcher_pb2_grpc as dpb_grpc
from apdispatch.common.protocol import oip_pb2 as oip
from apdispatch.common.protocol import oip_pb2_grpc as oip_grpc
from apdispatch.learned.checkpoint import load_checkpoint, paths
from apdispatch.tools.processes import free_port, registered_workers

REPO = Path(__file__).resolve().parents[1]
GRACE_NEVER_WAITED_S = 3600.0
WAIT_S = 120.0  # for things that happen in well under a second on an idle machine


# The helper ------------------------------------------------------------------------


class Steps:
    """What the phases did, in order; ``reached`` waits for a step."""

    def __init__(self) -> None:
        self.done: list[Any] = []
        self._changed = asyncio.Event()

    def add(self, step: Any) -> None:
        self.done.append(step)
        self._changed.set()

    async def reached(self, step: Any) -> None:
        async def wait() -> None:
            while step not in self.done:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), WAIT_S)


def phases(steps: Steps, *, cut: bool = True, drain_ends: bool = False) -> dict[str, Any]:
    ended = asyncio.Event()

    async def startup() -> None:
        steps.add("startup")

    async def drain(grace_s: float) -> None:
        steps.add(("drain", grace_s))
        try:
            if not drain_ends:
                await ended.wait()  # stands for calls in flight for the whole grace period
        finally:
            steps.add("drain ended")

    async def cut_drain() -> None:
        steps.add("cut")
        ended.set()

    async def shutdown() -> None:
        steps.add("shutdown")

    out: dict[str, Any] = {"startup": startup, "drain": drain, "shutdown": shutdown}
    if cut:
        out["cut"] = cut_drain
    return out


@pytest.mark.unit
async def test_first_signal_drains_with_the_grace_second_cuts_it_and_shutdown_still_runs() -> None:
    steps = Steps()
    life = Lifecycle(notify=lambda sig, forced: steps.add((sig.name, forced)))
    before = signal.getsignal(signal.SIGTERM)
    run = asyncio.ensure_future(life.run(grace_s=12.5, **phases(steps)))
    await steps.reached("startup")
    os.kill(os.getpid(), signal.SIGTERM)
    await steps.reached(("drain", 12.5))
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(run, WAIT_S) is False
    assert steps.done == [
        "startup",
        ("SIGTERM", False),
        ("drain", 12.5),
        ("SIGTERM", True),
        "cut",
        "drain ended",
        "shutdown",
    ]
    assert life.received == [signal.SIGTERM, signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) == before  # handlers removed


@pytest.mark.unit
async def test_without_a_cut_the_drain_is_cancelled_and_awaited_before_shutdown() -> None:
    steps = Steps()
    life = Lifecycle()
    run = asyncio.ensure_future(life.run(grace_s=1.0, **phases(steps, cut=False)))
    await steps.reached("startup")
    life.handle(signal.SIGINT)
    await steps.reached(("drain", 1.0))
    life.handle(signal.SIGINT)
    assert await asyncio.wait_for(run, WAIT_S) is False
    assert steps.done == ["startup", ("drain", 1.0), "drain ended", "shutdown"]


@pytest.mark.unit
async def test_a_drain_that_ends_by_itself_is_not_cut() -> None:
    steps = Steps()
    life = Lifecycle()
    run = asyncio.ensure_future(life.run(grace_s=2.0, **phases(steps, drain_ends=True)))
    await steps.reached("startup")
    life.handle(signal.SIGTERM)
    assert await asyncio.wait_for(run, WAIT_S) is True
    assert steps.done == ["startup", ("drain", 2.0), "drain ended", "shutdown"]


@pytest.mark.unit
async def test_both_signals_before_the_drain_starts_still_cut_it() -> None:
    steps = Steps()
    life = Lifecycle()
    life.handle(signal.SIGTERM)
    life.handle(signal.SIGTERM)
    assert await asyncio.wait_for(life.run(grace_s=3.0, **phases(steps)), WAIT_S) is False
    # The cut may come at any point of the drain; the drain ends before the shut-down.
    assert steps.done[0] == "startup" and steps.done[-2:] == ["drain ended", "shutdown"]
    assert {("drain", 3.0), "cut"} <= set(steps.done)


@pytest.mark.unit
async def test_a_failed_startup_is_shut_down_and_raised() -> None:
    steps = Steps()
    before = signal.getsignal(signal.SIGINT)

    async def startup() -> None:
        steps.add("startup")
        raise OSError("port taken")

    life = Lifecycle()
    with pytest.raises(OSError, match="port taken"):
        await life.run(
            startup=startup, drain=phases(steps)["drain"], shutdown=phases(steps)["shutdown"], grace_s=1.0
        )
    assert steps.done == ["startup", "shutdown"]
    assert signal.getsignal(signal.SIGINT) == before


@pytest.mark.unit
async def test_cut_short_raises_what_the_work_raised_and_cancels_it_with_its_caller() -> None:
    forced = asyncio.Event()

    async def fails() -> None:
        raise ValueError("broken")

    with pytest.raises(ValueError, match="broken"):
        await cut_short(fails(), forced)

    steps = Steps()

    async def endless() -> None:
        try:
            steps.add("running")
            await asyncio.Event().wait()
        finally:
            steps.add("cleaned up")

    caller = asyncio.ensure_future(cut_short(endless(), forced))
    await steps.reached("running")
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert steps.done == ["running", "cleaned up"]  # awaited before the caller's cancellation went on


# Real processes, real signals ------------------------------------------------------


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


class Proc:
    """``python -m apdispatch.cli ARGS`` with its JSON log lines read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    @classmethod
    async def start(cls, *args: str) -> Proc:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "apdispatch.cli", *args,
            cwd=REPO, env=_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        return cls(proc)

    async def event(self, name: str) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            assert self.proc.stdout is not None
            while True:
                raw = await self.proc.stdout.readline()
                assert raw, f"exited before {name!r}:\n{self.log()}"
                self.lines.append(raw.decode())
                with contextlib.suppress(ValueError):
                    event = json.loads(raw)
                    if isinstance(event, dict) and event.get("event") == name:
                        return event

        return await asyncio.wait_for(read(), WAIT_S)

    async def exit_code(self) -> int:
        assert self.proc.stdout is not None
        rest = await asyncio.wait_for(self.proc.stdout.read(), WAIT_S)
        self.lines.append(rest.decode())
        return await asyncio.wait_for(self.proc.wait(), WAIT_S)

    def events(self) -> list[str]:
        out = []
        for line in "".join(self.lines).splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    out.append(str(event.get("event")))
        return out

    def log(self) -> str:
        return "".join(self.lines)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def test_ap_cut_short_by_a_second_sigterm_still_writes_its_checkpoint(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ck"
    weights, meta = paths(checkpoint)
    config = tmp_path / "ap.toml"
    # No periodic save: only the shut-down writes the checkpoint. The drain's notice
    # keeps it waiting (open streams now end as soon as they are answered).
    config.write_text(
        f"shutdown_grace_s = {GRACE_NEVER_WAITED_S}\ncheckpoint_interval_s = {GRACE_NEVER_WAITED_S}\n"
        f"drain_notice_s = {GRACE_NEVER_WAITED_S}\n"
    )
    address = f"127.0.0.1:{free_port()}"
    ap = await Proc.start(
        "serve", "--listen", address, "--config", str(config),
        "--policy", "learned", "--checkpoint", str(checkpoint), "--log-format", "json",
    )  # fmt: skip
    try:
        await ap.event("serving")
        async with grpc.aio.insecure_channel(address) as channel:
            call = dpb_grpc.DispatcherStub(channel).InferStream()
            sla = dpb.SLA(deadline_ms=100.0, min_accuracy=0.0)
            await call.write(dpb.InferRequest(task="no-such-task", request_id="r0", sla=sla))
            # Answered (an error) and left open.
            reply = await asyncio.wait_for(call.read(), WAIT_S)
            assert reply.request_id == "r0" and reply.outcome == dpb.FAILED
            assert not weights.exists() and not meta.exists()

            ap.proc.send_signal(signal.SIGTERM)
            await ap.event("shutting down")
            ap.proc.send_signal(signal.SIGTERM)
            assert await ap.exit_code() == 1, ap.log()  # 1: the drain was cut short
            assert await asyncio.wait_for(call.code(), WAIT_S) != grpc.StatusCode.OK
    finally:
        await ap.kill()
    events = ap.events()
    assert events.index("shutting down") < events.index("second signal, cutting the grace period short")
    assert events.index("checkpoint") < events.index("stopped"), ap.log()
    state, saved = load_checkpoint(checkpoint)
    assert state and saved


# A cut that comes when the drain has no grace left: the drain's stop and the
# cut's ran side by side, and gRPC's stop with a grace of 0 cancels the calls of
# a server the other stop may just have destroyed (SIGSEGV, about 1 in 150).
RACE = """
import asyncio, sys
from apdispatch.ap.config import APConfig
from apdispatch.ap.server import AccessPoint

async def main(n):
    for _ in range(n):
        ap = AccessPoint(APConfig(listen="127.0.0.1:0", policy="fastest", log_level="error"))
        await ap.start()
        await asyncio.gather(ap.cut(), ap.drain(0.0))
        await ap.close()
    print("survived", n)

asyncio.run(main(int(sys.argv[1])))
"""


async def test_ap_cut_while_a_drain_with_no_grace_left_stops_does_not_crash() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-X", "faulthandler", "-c", RACE, "1000",
        cwd=REPO, env=_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 10 * WAIT_S)
    assert proc.returncode == 0, out.decode()[-4000:]
    assert b"survived 1000" in out


async def test_worker_stopped_by_two_signals_deregisters_and_exits(models_dir: Path) -> None:
    ap_address = f"127.0.0.1:{free_port()}"
    ap = await Proc.start("serve", "--listen", ap_address, "--log-format", "json")
    worker: Proc | None = None
    try:
        await ap.event("serving")
        worker = await Proc.start(
            "worker", "edge", "--models", str(models_dir), "--variants", "digits-tiny",
            "--listen", "127.0.0.1:0", "--ap", ap_address, "--worker-id", "w-signals",
            "--shutdown-grace-s", str(GRACE_NEVER_WAITED_S),
        )  # fmt: skip
        address = str((await worker.event("serving"))["address"])
        await worker.event("registered")
        async with grpc.aio.insecure_channel(address) as channel:
            call = oip_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
            await call.write(oip.ModelInferRequest(model_name="no-such-model", id="r0"))
            # Answered (an error) and left open: the drain would wait for it all its grace period.
            reply = await asyncio.wait_for(call.read(), WAIT_S)
            assert "no-such-model" in reply.error_message

            worker.proc.send_signal(signal.SIGTERM)
            await worker.event("shutdown_requested")
            worker.proc.send_signal(signal.SIGINT)
            assert await worker.exit_code() == 1, worker.log()  # 1: the drain was cut short
            assert await asyncio.wait_for(call.code(), WAIT_S) != grpc.StatusCode.OK
        events = worker.events()
        # Deregistered by the worker itself, not forgotten when its lease ran out.
        assert "deregistered" in events and "forced_stop" in events, worker.log()
        assert events[-1] == "stopped"
        listed = await asyncio.to_thread(registered_workers, ap_address, WAIT_S)
        assert listed is not None and "w-signals" not in listed[0]
    finally:
        if worker is not None:
            await worker.kill()
        await ap.kill()


class SilentAP(dpb_grpc.DispatcherServicer):
    """Stands in for an AP that never answers: every call stays open until its client leaves."""

    def __init__(self) -> None:
        self.received = 0
        self.got_one = asyncio.Event()

    async def InferStream(
        self, request_iterator: AsyncIterator[dpb.InferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dpb.InferResponse]:
        async for _ in request_iterator:
            self.received += 1
            self.got_one.set()
        await asyncio.Event().wait()
        yield dpb.InferResponse()  # never reached


LOAD_SCENARIO = """
name = "signals"
duration_s = 60
seed = 3
[[apps]]
name = "patient"
task = "digits"
deadline_ms = 3600000.0
min_accuracy = 0.5
rate_qps = 20.0
share = 1.0
[devices.d]
[[clusters]]
name = "c"
rtt_ms = 1.0
workers = [ { device = "d", count = 1, variants = [] } ]
[arrivals]
schedule = [ { at_s = 0, clients_per_min = 600 } ]
stream_mean_s = 30.0
"""


async def test_load_generator_cut_short_by_a_second_signal_still_reports(tmp_path: Path) -> None:
    silent = SilentAP()
    server = grpc.aio.server()
    dpb_grpc.add_DispatcherServicer_to_server(silent, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    scenario = tmp_path / "s.toml"
    scenario.write_text(LOAD_SCENARIO)
    (tmp_path / "models" / "samples").mkdir(parents=True)
    x = np.zeros((4, 8), dtype=np.float32)
    np.savez(tmp_path / "models" / "samples" / "digits.npz", x=x, y=np.arange(4))
    out = tmp_path / "load.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "apdispatch.cli", "load", str(scenario), "--ap", address,
        "--models", str(tmp_path / "models"), "--json", str(out), "--no-progress",
        cwd=REPO, env=_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await asyncio.wait_for(silent.got_one.wait(), WAIT_S)
        proc.send_signal(signal.SIGINT)
        assert proc.stderr is not None
        # Replies are now awaited up to the app's deadline (an hour): only a second signal ends that.
        line = await asyncio.wait_for(proc.stderr.readline(), WAIT_S)
        while b"stopping" not in line:
            assert line, "the load generator ended before stopping"
            line = await asyncio.wait_for(proc.stderr.readline(), WAIT_S)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), WAIT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await server.stop(None)
    assert proc.returncode == 130, stderr.decode()
    assert "stopped early" in stdout.decode()
    doc = json.loads(out.read_text())
    assert doc["sent"] > 0 and doc["counts_add_up"]
    assert doc["failed"] == doc["sent"] and silent.received > 0
    assert doc["errors"] == {"failed: no reply": doc["sent"]}


async def test_ap_freezes_its_startup_heap_and_uses_the_configured_young_threshold(tmp_path: Path) -> None:
    config = tmp_path / "ap.toml"
    config.write_text("gc_young_threshold = 12345\n")
    ap = await Proc.start(
        "serve", "--listen", f"127.0.0.1:{free_port()}", "--config", str(config), "--log-format", "json"
    )  # fmt: skip
    try:
        settled = await ap.event("gc settled")
    finally:
        await ap.kill()
    # Read back from the collector of the AP's own process.
    assert settled["young_threshold"] == 12345, settled
    assert settled["frozen_objects"] > 1000, settled  # modules, the policy, the server


def test_settle_with_zero_keeps_cpythons_threshold() -> None:
    code = "from apdispatch.common.gc_tuning import settle; print(*settle(0))"
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    threshold, frozen = map(int, out.stdout.split())
    assert threshold == 700 and frozen > 0
