"""Worker faults under load: what the AP loses when a worker is killed, frozen or stopped.

``python -m apdispatch.tools.faults [--fault kill|stop|term] [--rate R]``: an
AP in this process (so that its counters can be read), two edge workers as
subprocesses (edge-a faster than edge-b, so that the ``fastest`` policy sends
most of the load to edge-a), and one client stream from this process sending
``rate`` requests per second. After ``--fault-at-s`` seconds edge-a gets the
fault:

- ``kill``: SIGKILL;
- ``stop``: SIGSTOP, then SIGCONT ``--frozen-s`` seconds later;
- ``term``: SIGTERM (the worker drains: it deregisters and serves what it has).

It prints one JSON object: requests sent and their outcomes, before and after
the fault; the requests in flight to edge-a at the fault; how many requests the
AP sent to edge-a after the fault (retried elsewhere, or failed there); the
time from the fault to edge-a's ejection (and, for ``stop``, to its readmission
after SIGCONT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np

from apdispatch.ap.config import APConfig
from apdispatch.ap.server import AccessPoint
from apdispatch.common.logs import make_logger
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.common.protocol import dispatcher_pb2_grpc as pb_grpc
from apdispatch.routing.registry import Worker
from apdispatch.tools.processes import Children, free_port

TASK = "digits"
VARIANTS = ("digits-tiny", "digits-small")
OUTCOME_NAMES = {v: k.lower() for k, v in pb.Outcome.items()}


async def run(args: argparse.Namespace) -> dict[str, object]:
    config = APConfig(listen="127.0.0.1:0", policy="fastest", lease_s=60.0, log_level="warning")
    ap = AccessPoint(config, make_logger("warning"))
    await ap.start()
    events: list[tuple[float, str, str]] = []
    told = ap.outlier.on_change

    def note(worker: Worker, what: str, length_s: float) -> None:
        events.append((time.monotonic(), worker.worker_id, what))
        if told is not None:
            told(worker, what, length_s)

    ap.outlier.on_change = note
    children = Children(Path(tempfile.mkdtemp(prefix="faults-")))
    try:
        for wid, service_ms in (("edge-a", args.service_a_ms), ("edge-b", args.service_b_ms)):
            children.start(
                wid,
                [
                    "worker",
                    "edge",
                    "--listen",
                    f"127.0.0.1:{free_port()}",
                    "--worker-id",
                    wid,
                    "--cluster",
                    wid,
                    "--variants",
                    ",".join(VARIANTS),
                    "--slots",
                    "2",
                    "--service-ms",
                    ",".join(f"{v}={service_ms:g}" for v in VARIANTS),
                    "--models",
                    str(args.models),
                    "--ap",
                    ap.address,
                    "--log-level",
                    "warning",
                ],
            )
        deadline = time.monotonic() + 120
        while not all(ap.registry.get(w) is not None for w in ("edge-a", "edge-b")):
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not register")
            await asyncio.sleep(0.1)
        return await _load(ap, children, args, events)
    finally:
        await asyncio.to_thread(children.close)
        await ap.stop(grace_s=0.5)


async def _load(
    ap: AccessPoint, children: Children, args: argparse.Namespace, events: list[tuple[float, str, str]]
) -> dict[str, object]:
    with np.load(args.models / "samples" / f"{TASK}.npz") as npz:
        x = np.ascontiguousarray(npz["x"][:1], dtype=np.float32)
    body = [pb.Tensor(name="input", datatype="FP32", shape=list(x.shape), data=x.tobytes())]
    total = int(args.rate * args.duration_s)
    sent_at: dict[str, float] = {}
    fault: dict[str, float] = {}
    edge_a = children.get("edge-a")

    async def requests() -> AsyncIterator[pb.InferRequest]:
        start = time.monotonic()
        for i in range(total):
            due = start + i / args.rate
            now = time.monotonic()
            if not fault and now - start >= args.fault_at_s:
                worker = ap.registry.get("edge-a")
                fault["in_flight"] = worker.in_flight if worker is not None else 0
                fault["at"] = time.monotonic()
                os.kill(
                    edge_a.popen.pid,
                    {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM}[args.fault],
                )
            if (
                args.fault == "stop"
                and fault
                and "thawed" not in fault
                and now - fault["at"] >= args.frozen_s
            ):
                os.kill(edge_a.popen.pid, signal.SIGCONT)
                fault["thawed"] = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            rid = f"r{i}"
            sent_at[rid] = time.monotonic()
            yield pb.InferRequest(
                task=TASK, request_id=rid, inputs=body, sla=pb.SLA(deadline_ms=args.deadline_ms)
            )

    before: Counter[str] = Counter()
    after: Counter[str] = Counter()
    after_by_worker: Counter[str] = Counter()
    late_ms: list[float] = []  # when the first late requests were sent, ms after the fault
    async with grpc.aio.insecure_channel(ap.address) as channel:
        call = pb_grpc.DispatcherStub(channel).InferStream(requests())
        async for reply in call:
            at = sent_at[reply.request_id]
            outcome = OUTCOME_NAMES[reply.outcome]
            if fault and at >= fault["at"]:
                after[outcome] += 1
                if outcome == "late" and len(late_ms) < 20:
                    late_ms.append(round((at - fault["at"]) * 1000, 1))
                after_by_worker[f"{reply.served_by.worker or '-'}:{outcome}"] += 1
            else:
                before[outcome] += 1
    ejected = [t for t, w, what in events if w == "edge-a" and what == "ejected" and t >= fault["at"]]
    readmitted = [t for t, w, what in events if w == "edge-a" and what == "readmitted"]
    report: dict[str, object] = {
        "fault": args.fault,
        "rate": args.rate,
        "deadline_ms": args.deadline_ms,
        "sent": total,
        "before_fault": dict(before),
        "after_fault": dict(after),
        "after_fault_by_worker": dict(after_by_worker),
        "first_late_sent_after_fault_ms": late_ms,
        "in_flight_to_edge_a_at_fault": fault.get("in_flight"),
        "retried_away_from_edge_a": ap.dispatcher.retried.get("edge-a", 0),
        "ejected_after_ms": round((ejected[0] - fault["at"]) * 1000, 1) if ejected else None,
        "readmitted_after_thaw_ms": (
            round((readmitted[-1] - fault["thawed"]) * 1000, 1)
            if readmitted and "thawed" in fault and readmitted[-1] >= fault["thawed"]
            else None
        ),
        "lost": total - sum(before.values()) - sum(after.values()),
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m apdispatch.tools.faults", description=__doc__)
    parser.add_argument("--fault", choices=["kill", "stop", "term"], default="kill")
    parser.add_argument("--rate", type=float, default=300.0, help="requests per second")
    parser.add_argument("--duration-s", type=float, default=6.0)
    parser.add_argument("--fault-at-s", type=float, default=2.0)
    parser.add_argument("--frozen-s", type=float, default=2.0, help="stop: SIGCONT after this long")
    parser.add_argument("--deadline-ms", type=float, default=200.0)
    parser.add_argument("--service-a-ms", type=float, default=2.0)
    parser.add_argument("--service-b-ms", type=float, default=4.0)
    parser.add_argument("--models", type=Path, default=Path("build/models"))
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=1))


if __name__ == "__main__":
    main()
