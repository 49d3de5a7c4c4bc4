"""``apdispatch bench``: what the AP adds to a direct call, and how much it carries.

One run on one machine, baseline and AP measured side by side:

1. Latency at one request in flight: the same request sent directly to an
   edge worker (OIP ModelInfer), through nginx's ``grpc_pass`` in front of the
   same worker (the same ModelInfer: what a plain L7 proxy adds), and through
   the AP (``Client.infer``), in alternating rounds so that drift in the
   machine hits all alike; then the same over open streams (ModelStreamInfer
   direct and through nginx, InferStream via the AP). nginx (Debian's package)
   runs as a child of the bench on loopback, with a config generated into the
   run folder: upstream connections kept alive, and (unary only) nginx's
   default of a new upstream connection per call. Without an nginx binary its
   paths are skipped.
2. Throughput: an open-loop ladder of offered rates through the AP (client
   streams) and, as the baseline, straight to the same workers
   (ModelStreamInfer); the highest rate with at least 99% of requests ok.

Everything runs on loopback: an AP, two edge workers and nginx as
subprocesses, this process as the client. Figures are medians and p99 over all samples.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import grpc
import numpy as np

from apdispatch.client import AsyncClient, AsyncStream, Client, build_request
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.common.protocol import oip_pb2, oip_pb2_grpc
from apdispatch.common.tensors import to_bytes
from apdispatch.tools.processes import Children, free_port, wait_for_workers

TASK = "digits"
DEADLINE_MS = 50.0
OK_TARGET = 0.99
NGINX_START_TIMEOUT_S = 10.0

# nginx as a gRPC proxy to one worker, the way it is run in front of gRPC
# services: HTTP/2 on both sides, kept-alive upstream connections, no access
# log. The second server is the same without `keepalive`, nginx's default: a
# new upstream connection for every call.
NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    # A stream's messages add up to one request body: no cap on its size.
    client_max_body_size 0;
    client_body_temp_path {run}/nginx-tmp/body;
    proxy_temp_path {run}/nginx-tmp/proxy;
    fastcgi_temp_path {run}/nginx-tmp/fastcgi;
    uwsgi_temp_path {run}/nginx-tmp/uwsgi;
    scgi_temp_path {run}/nginx-tmp/scgi;
    upstream worker {{
        server {worker};
        keepalive 16;
    }}
    upstream worker_fresh {{
        server {worker};
    }}
    server {{
        listen {listen} http2;
        location / {{
            grpc_pass grpc://worker;
        }}
    }}
    server {{
        listen {listen_fresh} http2;
        location / {{
            grpc_pass grpc://worker_fresh;
        }}
    }}
}}
"""


@dataclass
class Step:
    offered_qps: float
    sent: int
    ok: int
    achieved_qps: float
    goodput_qps: float  # ok replies per second: what the ok share hides past capacity
    ok_ratio: float
    p50_ms: float
    p99_ms: float


def percentiles(samples: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(samples, [50, 99])
    return round(float(p50), 3), round(float(p99), 3)


def nginx_binary() -> str | None:
    """Debian's nginx lives in /usr/sbin, off the PATH of most users."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
    )


def nginx_version(binary: str) -> str:
    """``nginx/1.22.1``: what ``nginx -v`` prints (on stderr)."""
    run = subprocess.run([binary, "-v"], capture_output=True, text=True)
    return (run.stderr or run.stdout).strip().removeprefix("nginx version: ")


@contextlib.contextmanager
def nginx_proxy(binary: str, worker: str, run_dir: Path) -> Iterator[tuple[str, str]]:
    """nginx on two free loopback ports, ``grpc_pass`` to ``worker``; yields their
    addresses: upstream connections kept alive, and one per call.

    A child in its own session with its log in the run folder, stopped (and
    killed if it lingers) on the way out.
    """
    run = run_dir.resolve()
    (run / "nginx-tmp").mkdir(parents=True, exist_ok=True)
    listen, listen_fresh = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    conf = run / "nginx.conf"
    conf.write_text(NGINX_CONF.format(run=run, worker=worker, listen=listen, listen_fresh=listen_fresh))
    with (run / "nginx.log").open("ab") as log:
        # -e: the error log from the start, before the config names one.
        popen = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(run), "-e", str(run / "nginx-error.log")],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + NGINX_START_TIMEOUT_S
        with grpc.insecure_channel(listen) as channel:
            while True:
                if popen.poll() is not None:
                    raise RuntimeError(f"nginx exited with {popen.returncode}; see {run}/nginx-error.log")
                try:
                    grpc.channel_ready_future(channel).result(timeout=0.2)
                    break
                except grpc.FutureTimeoutError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"nginx did not listen on {listen}; see {run}") from None
        yield listen, listen_fresh
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGTERM)
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()


def _oip_request(variant: str, x: np.ndarray) -> oip_pb2.ModelInferRequest:
    request = oip_pb2.ModelInferRequest(model_name=variant)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(to_bytes(x))
    return request


def _added(prefix: str, path: list[float], d50: float, d99: float) -> dict[str, float]:
    p50, p99 = percentiles(path)
    return {
        f"{prefix}_p50_ms": p50,
        f"{prefix}_p99_ms": p99,
        f"{prefix}_added_p50_ms": round(p50 - d50, 3),
        f"{prefix}_added_p99_ms": round(p99 - d99, 3),
    }


def one_in_flight(
    ap: str,
    worker: str,
    variant: str,
    x: np.ndarray,
    rounds: int,
    per_round: int,
    proxies: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """Sequential calls, direct, through each proxy (name: address, the same ModelInfer)
    and through the AP, in alternating rounds."""
    direct: list[float] = []
    via: dict[str, list[float]] = {name: [] for name in proxies or {}}
    via_ap: list[float] = []
    request = _oip_request(variant, x)
    with contextlib.ExitStack() as stack:
        channel = stack.enter_context(grpc.insecure_channel(worker))
        client = stack.enter_context(Client(ap))
        model_infer = oip_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        proxied = {
            name: oip_pb2_grpc.GRPCInferenceServiceStub(
                stack.enter_context(grpc.insecure_channel(address))
            ).ModelInfer
            for name, address in (proxies or {}).items()
        }
        for _ in range(200):  # warm up every path and the AP's estimator
            model_infer(request, timeout=1.0)
            for call in proxied.values():
                call(request, timeout=1.0)
            client.infer(TASK, x, deadline_ms=1000, variant=variant)
        for _ in range(rounds):
            for _ in range(per_round):
                t0 = time.perf_counter()
                model_infer(request, timeout=1.0)
                direct.append((time.perf_counter() - t0) * 1000)
            for name, call in proxied.items():
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    call(request, timeout=1.0)
                    via[name].append((time.perf_counter() - t0) * 1000)
            for _ in range(per_round):
                t0 = time.perf_counter()
                result = client.infer(TASK, x, deadline_ms=1000, variant=variant)
                via_ap.append((time.perf_counter() - t0) * 1000)
                assert result.outcome == "ok", result
    d50, d99 = percentiles(direct)
    a50, a99 = percentiles(via_ap)
    out: dict[str, float] = {
        "direct_p50_ms": d50,
        "direct_p99_ms": d99,
        "ap_p50_ms": a50,
        "ap_p99_ms": a99,
        "added_p50_ms": round(a50 - d50, 3),
        "added_p99_ms": round(a99 - d99, 3),
        "samples_per_path": len(direct),
    }
    for name, samples in via.items():
        out.update(_added(name, samples, d50, d99))
    return out


async def one_in_flight_streams(
    ap: str, worker: str, variant: str, x: np.ndarray, rounds: int, per_round: int, nginx: str | None = None
) -> dict[str, float]:
    """As ``one_in_flight``, over open streams: ModelStreamInfer direct and through nginx,
    InferStream via the AP."""
    direct: list[float] = []
    via_nginx: list[float] = []
    via_ap: list[float] = []
    template = _oip_request(variant, x)

    def oip_stream(channel: grpc.aio.Channel) -> Callable[[], Awaitable[float]]:
        outbox: asyncio.Queue[oip_pb2.ModelInferRequest | None] = asyncio.Queue()

        async def requests():  # type: ignore[no-untyped-def]
            while (item := await outbox.get()) is not None:
                yield item

        call = oip_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests())
        outboxes.append(outbox)

        async def once() -> float:
            t0 = time.perf_counter()
            outbox.put_nowait(template)
            reply = await call.read()
            assert not reply.error_message, reply.error_message
            return (time.perf_counter() - t0) * 1000

        return once

    outboxes: list[asyncio.Queue[oip_pb2.ModelInferRequest | None]] = []
    async with contextlib.AsyncExitStack() as stack:
        direct_once = oip_stream(await stack.enter_async_context(grpc.aio.insecure_channel(worker)))
        nginx_once = None
        if nginx is not None:
            nginx_once = oip_stream(await stack.enter_async_context(grpc.aio.insecure_channel(nginx)))
        client = await stack.enter_async_context(AsyncClient(ap))
        ap_stream = client.open_stream()
        ap_request = build_request(TASK, x, deadline_ms=1000, variant=variant)

        async def ap_once() -> float:
            t0 = time.perf_counter()
            await ap_stream.send(ap_request)
            result = await ap_stream.read()
            assert result is not None and result.outcome == "ok", result
            return (time.perf_counter() - t0) * 1000

        for _ in range(200):
            await direct_once()
            if nginx_once is not None:
                await nginx_once()
            await ap_once()
        for _ in range(rounds):
            direct += [await direct_once() for _ in range(per_round)]
            if nginx_once is not None:
                via_nginx += [await nginx_once() for _ in range(per_round)]
            via_ap += [await ap_once() for _ in range(per_round)]
        for outbox in outboxes:
            outbox.put_nowait(None)
        await ap_stream.done_writing()
        ap_stream.cancel()
    d50, d99 = percentiles(direct)
    a50, a99 = percentiles(via_ap)
    result = {
        "stream_direct_p50_ms": d50,
        "stream_direct_p99_ms": d99,
        "stream_ap_p50_ms": a50,
        "stream_ap_p99_ms": a99,
        "stream_added_p50_ms": round(a50 - d50, 3),
        "stream_added_p99_ms": round(a99 - d99, 3),
    }
    if via_nginx:
        result.update(_added("stream_nginx", via_nginx, d50, d99))
    return result


async def _open_loop(
    rate: float,
    duration_s: float,
    send: Callable[[int], None],
    pending: dict[str, float],
    latencies: list[float],
) -> tuple[int, int]:
    """Send at ``rate`` per second for ``duration_s`` without waiting for replies."""
    start = time.perf_counter()
    sent = 0
    total = int(rate * duration_s)
    while sent < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        while sent < due:
            send(sent)
            sent += 1
        await asyncio.sleep(0.001)
    # Wait for the stragglers, at most a deadline and a bit.
    drain_until = time.perf_counter() + DEADLINE_MS / 1000 + 0.5
    while pending and time.perf_counter() < drain_until:
        await asyncio.sleep(0.005)
    ok = sum(1 for ms in latencies if ms <= DEADLINE_MS)
    return sent, ok


async def ladder(
    name: str, rates: list[float], duration_s: float, run_step: Callable[[float], Awaitable[Step]]
) -> list[Step]:
    steps: list[Step] = []
    misses = 0
    for rate in rates:
        step = await run_step(rate)
        steps.append(step)
        print(
            f"  {name:6s} offered {rate:6.0f}/s  achieved {step.achieved_qps:7.1f}/s  "
            f"goodput {step.goodput_qps:7.1f}/s  ok {step.ok_ratio:6.2%}  "
            f"p50 {step.p50_ms:6.2f} ms  p99 {step.p99_ms:7.2f} ms",
            flush=True,
        )
        misses = misses + 1 if step.ok_ratio < OK_TARGET else 0
        if misses == 2:
            break
    return steps


def _step(rate: float, sent: int, ok: int, latencies: list[float], elapsed: float) -> Step:
    p50, p99 = percentiles(latencies) if latencies else (float("nan"), float("nan"))
    achieved = round(len(latencies) / elapsed, 1)
    return Step(rate, sent, ok, achieved, round(ok / elapsed, 1), round(ok / max(1, sent), 4), p50, p99)


async def ap_step(ap: str, variant: str, x: np.ndarray, rate: float, duration_s: float, streams: int) -> Step:
    latencies: list[float] = []
    pending: dict[str, float] = {}
    template = build_request(TASK, x, deadline_ms=DEADLINE_MS, variant=variant)
    async with AsyncClient(ap) as client:
        opened = [client.open_stream() for _ in range(streams)]
        outboxes: list[asyncio.Queue[pb.InferRequest | None]] = [asyncio.Queue() for _ in opened]

        async def write(stream: AsyncStream, outbox: asyncio.Queue[pb.InferRequest | None]) -> None:
            while (request := await outbox.get()) is not None:
                await stream.send(request)
            await stream.done_writing()

        async def read(stream: AsyncStream) -> None:
            async for result in stream:
                t0 = pending.pop(result.request_id, None)
                if t0 is not None and result.outcome == "ok":
                    latencies.append((time.perf_counter() - t0) * 1000)

        tasks = [asyncio.create_task(write(s, q)) for s, q in zip(opened, outboxes, strict=True)]
        tasks += [asyncio.create_task(read(s)) for s in opened]

        def send(i: int) -> None:
            request = pb.InferRequest()
            request.CopyFrom(template)
            request.request_id = f"b{i}"
            pending[request.request_id] = time.perf_counter()
            outboxes[i % streams].put_nowait(request)

        t0 = time.perf_counter()
        sent, ok = await _open_loop(rate, duration_s, send, pending, latencies)
        elapsed = time.perf_counter() - t0
        for q in outboxes:
            q.put_nowait(None)
        for task in tasks:
            task.cancel()
    return _step(rate, sent, ok, latencies, elapsed)


async def direct_step(
    workers: list[str], variant: str, x: np.ndarray, rate: float, duration_s: float
) -> Step:
    latencies: list[float] = []
    pending: dict[str, float] = {}
    channels = [grpc.aio.insecure_channel(w) for w in workers]
    outboxes: list[asyncio.Queue[oip_pb2.ModelInferRequest | None]] = [asyncio.Queue() for _ in workers]

    async def requests(q: asyncio.Queue[oip_pb2.ModelInferRequest | None]):  # type: ignore[no-untyped-def]
        while (item := await q.get()) is not None:
            yield item

    async def read(call: grpc.aio.StreamStreamCall) -> None:
        async for reply in call:
            t0 = pending.pop(reply.infer_response.id, None)
            if t0 is not None and not reply.error_message:
                latencies.append((time.perf_counter() - t0) * 1000)

    calls = [
        oip_pb2_grpc.GRPCInferenceServiceStub(c).ModelStreamInfer(requests(q))
        for c, q in zip(channels, outboxes, strict=True)
    ]
    readers = [asyncio.create_task(read(c)) for c in calls]
    template = _oip_request(variant, x)
    template.parameters["timeout"].int64_param = int(DEADLINE_MS * 1000)

    def send(i: int) -> None:
        request = oip_pb2.ModelInferRequest()
        request.CopyFrom(template)
        request.id = str(i)
        pending[request.id] = time.perf_counter()
        outboxes[i % len(outboxes)].put_nowait(request)

    t0 = time.perf_counter()
    sent, ok = await _open_loop(rate, duration_s, send, pending, latencies)
    elapsed = time.perf_counter() - t0
    for q in outboxes:
        q.put_nowait(None)
    for r in readers:
        r.cancel()
    for c in channels:
        await c.close()
    return _step(rate, sent, ok, latencies, elapsed)


def format_added(latency: dict[str, float]) -> str:
    """The latency each hop adds to a direct call, side by side: the AP and nginx."""
    lines = ["added to a direct call, ms:      p50      p99"]
    for label, prefix in (
        ("AP, unary", "added"),
        ("nginx, unary", "nginx_added"),
        ("nginx, unary, no keepalive", "nginx_fresh_added"),
        ("AP, stream", "stream_added"),
        ("nginx, stream", "stream_nginx_added"),
    ):
        if f"{prefix}_p50_ms" in latency:
            p50, p99 = latency[f"{prefix}_p50_ms"], latency[f"{prefix}_p99_ms"]
            lines.append(f"  {label:28s} {p50:7.3f}  {p99:7.3f}")
    return "\n".join(lines)


def max_rate(steps: list[Step]) -> float:
    passing = [s.offered_qps for s in steps if s.ok_ratio >= OK_TARGET]
    return max(passing) if passing else 0.0


def main(args: argparse.Namespace) -> int:
    models = Path(args.models)
    with np.load(models / "samples" / f"{TASK}.npz") as npz:
        x = npz["x"][:1].astype(np.float32)
    variant = f"{TASK}-tiny"
    run_dir = Path("build/bench") / datetime.now().strftime("%Y%m%d-%H%M%S")
    children = Children(run_dir)
    ap = f"127.0.0.1:{free_port()}"
    workers = {f"bench-edge-{i}": f"127.0.0.1:{free_port()}" for i in range(2)}
    rounds, per_round = (3, 200) if args.quick else (5, max(200, args.requests // 5))
    rates = [400.0, 800.0, 1200.0, 1600.0, 2000.0, 2400.0, 3200.0, 4000.0]
    duration_s = 2.0 if args.quick else 4.0
    try:
        ap_child = children.start("ap", ["serve", "--listen", ap, "--policy", "least-loaded"])
        worker_children = {
            wid: children.start(
                wid,
                [
                    "worker",
                    "edge",
                    "--listen",
                    addr,
                    "--models",
                    str(models),
                    "--variants",
                    variant,
                    "--ap",
                    ap,
                    "--worker-id",
                    wid,
                    "--cluster",
                    "bench",
                    "--slots",
                    "2",
                ],
            )
            for wid, addr in workers.items()
        }
        wait_for_workers(ap, ap_child, worker_children, timeout_s=60)
        first_worker = next(iter(workers.values()))
        nginx_bin = nginx_binary()
        with contextlib.ExitStack() as stack:
            nginx = None
            proxies = {}
            if nginx_bin is None:
                print("nginx: no binary (apt-get install nginx): the nginx path is skipped", flush=True)
            else:
                nginx, fresh = stack.enter_context(nginx_proxy(nginx_bin, first_worker, run_dir))
                proxies = {"nginx": nginx, "nginx_fresh": fresh}
            print(f"one request in flight ({rounds} rounds of {per_round} per path, {variant}):", flush=True)
            latency = one_in_flight(ap, first_worker, variant, x, rounds, per_round, proxies)
            latency.update(
                asyncio.run(one_in_flight_streams(ap, first_worker, variant, x, rounds, per_round, nginx))
            )
        for key, value in latency.items():
            print(f"  {key:24s} {value}")
        print(format_added(latency), flush=True)
        print(f"open-loop ladder ({duration_s:g} s per step, deadline {DEADLINE_MS:g} ms):", flush=True)
        direct_steps = asyncio.run(
            ladder(
                "direct",
                rates,
                duration_s,
                lambda r: direct_step(list(workers.values()), variant, x, r, duration_s),
            )
        )
        ap_steps = asyncio.run(
            ladder("ap", rates, duration_s, lambda r: ap_step(ap, variant, x, r, duration_s, streams=4))
        )
    finally:
        children.close()
    result = {
        **latency,
        # The peer proxy's version, or None when it was skipped.
        "nginx": nginx_version(nginx_bin) if nginx_bin is not None else None,
        "max_qps": max_rate(ap_steps),
        "direct_max_qps": max_rate(direct_steps),
        "ok_target": OK_TARGET,
        "deadline_ms": DEADLINE_MS,
        "variant": variant,
        "ap_steps": [asdict(s) for s in ap_steps],
        "direct_steps": [asdict(s) for s in direct_steps],
        "logs": str(run_dir),
    }
    print(
        f"max_qps (>= {OK_TARGET:.0%} ok): AP {result['max_qps']:g}/s, direct {result['direct_max_qps']:g}/s"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
