"""Running a load plan against an AP: one task per client stream, open loop.

Every stream has a writer that follows its send times and a reader that
collects replies, so a slow AP never slows the offered load down; it shows up
as latency and outcomes. Each query sent gets exactly one outcome: after a
stream's last query it waits for outstanding replies up to its app's deadline
plus a grace period; replies still missing then count as ``failed`` with the
error ``no reply``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np

from apdispatch.client import AsyncClient, AsyncStream
from apdispatch.common import tensors
from apdispatch.common.errors import ApdispatchError
from apdispatch.common.lifecycle import cut_short
from apdispatch.common.manifest import MANIFEST_NAME, load_manifest
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.scenario import Scenario
from apdispatch.scenario.plan import LoadPlan, QueryProcess, StreamPlan, plan_load
from apdispatch.tools.loadgen.report import LoadReport, Observer, Pending, Tally, build_report

Samples = Mapping[str, tuple[np.ndarray, np.ndarray]]

DEFAULT_GRACE_S: Final = 2.0
DEFAULT_CONNECT_TIMEOUT_S: Final = 5.0
NO_REPLY: Final = "no reply"
_STOP: Final = "apdispatch.tools.loadgen.stop"  # cancel message of _Runner.stop()
# Sample rows encoded up front (and cycled); bounds memory for large sample sets.
MAX_SAMPLES: Final = 4096


def load_samples(models: Path, tasks: set[str] | list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``x`` and ``y`` of ``models/samples/<task>.npz`` for each task."""
    out = {}
    for task in sorted(set(tasks)):
        path = Path(models) / "samples" / f"{task}.npz"
        if not path.is_file():
            raise FileNotFoundError(
                f"no input samples for task {task!r}: {path} is missing "
                "(build the model zoo: apdispatch models build)"
            )
        with np.load(path) as npz:
            out[task] = (np.asarray(npz["x"]), np.asarray(npz["y"]))
    return out


class _TaskInputs(NamedTuple):
    tensors: tuple[pb.Tensor, ...]  # one per sample row, batch dimension 1
    labels: tuple[int, ...] | None  # class labels when y holds them


def _task_inputs(task: str, x: np.ndarray, y: np.ndarray | None) -> _TaskInputs:
    if x.ndim < 1 or len(x) == 0:
        raise ValueError(f"samples for task {task!r}: x is empty")
    n = min(len(x), MAX_SAMPLES)
    # Encoded once: per query only the request envelope is built.
    encoded = tuple(tensors.to_tensor("input", x[i : i + 1]) for i in range(n))
    labels = None
    if y is not None and y.ndim == 1 and len(y) == len(x) and np.issubdtype(y.dtype, np.integer):
        labels = tuple(int(v) for v in y[:n])
    return _TaskInputs(encoded, labels)


class _Conn:
    """One InferStream call of a client stream, with the requests awaiting replies."""

    __slots__ = ("closed", "pending", "reader", "stream")

    def __init__(self, stream: AsyncStream) -> None:
        self.stream = stream
        self.pending: dict[str, Pending] = {}
        self.closed = False
        self.reader: asyncio.Task[None] | None = None

    def abandon(self, tally: Tally, error: str) -> None:
        """Count every request still awaiting a reply as failed; synchronous on purpose,
        so that it also runs to the end inside a cancelled task."""
        self.closed = True
        pending, self.pending = self.pending, {}
        lost = error.startswith(NO_REPLY)
        for p in pending.values():
            tally.on_failed(p, error, lost)


class _Runner:
    def __init__(
        self,
        scenario: Scenario,
        plan: LoadPlan,
        client: AsyncClient,
        inputs: Mapping[str, _TaskInputs],
        grace_s: float,
        observer: Observer | None = None,
    ) -> None:
        self.scenario = scenario
        self.plan = plan
        self.client = client
        self.inputs = inputs
        self.grace_s = grace_s
        self.loop = asyncio.get_running_loop()
        self.n_buckets = max(1, math.ceil(plan.duration_s))
        self.tally = Tally(len(scenario.apps), self.n_buckets, observer)
        self.slas = [pb.SLA(deadline_ms=a.deadline_ms, min_accuracy=a.min_accuracy) for a in scenario.apps]
        self.t0 = 0.0
        self.tasks: list[asyncio.Task[None]] = []
        self.sending = 0  # streams inside their send phase
        self.started = 0
        self.stopped_at: float | None = None
        # Tasks now sleeping until their next send (or stream start): stop()
        # wakes exactly these, never a task inside a gRPC write, since
        # cancelling a write cancels the whole call and loses its replies.
        self.sleeping: set[asyncio.Task[Any]] = set()

    def stop(self) -> None:
        """Stop sending now (Ctrl-C): no new streams or queries; replies are still awaited."""
        if self.stopped_at is not None:
            return
        self.stopped_at = self.loop.time() - self.t0
        for task in list(self.sleeping):
            task.cancel(_STOP)

    async def _sleep(self, task: asyncio.Task[Any], delay: float) -> bool:
        """Sleep ``delay`` seconds; False when stop() came first."""
        if self.stopped_at is not None:
            return False
        if delay <= 0:
            return True
        self.sleeping.add(task)
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError as exc:
            if exc.args != (_STOP,):
                raise
            task.uncancel()
            return False
        finally:
            self.sleeping.discard(task)
        return True

    # A stream's reader: replies in completion order, matched by request id.
    async def _read(self, conn: _Conn) -> None:
        error = "no reply (stream ended before replying)"
        tally = self.tally
        try:
            async for result in conn.stream:
                p = conn.pending.pop(result.request_id, None)
                if p is None:
                    tally.unmatched += 1
                    continue
                tally.on_result(p, result, self.loop.time())
        except ApdispatchError as exc:
            error = f"stream failed: {exc.code.name}: {exc.message}"
        except asyncio.CancelledError:
            error = NO_REPLY
            raise
        finally:
            conn.abandon(tally, error)

    def _open(self) -> _Conn:
        conn = _Conn(self.client.open_stream())
        conn.reader = asyncio.create_task(self._read(conn))
        return conn

    async def run_stream(self, plan: StreamPlan) -> None:
        app = self.scenario.apps[plan.app]
        inputs = self.inputs[app.task]
        n_samples = len(inputs.tensors)
        sla = self.slas[plan.app]
        tally = self.tally
        loop = self.loop
        t0 = self.t0
        last_bucket = self.n_buckets - 1
        conns: list[_Conn] = []
        conn: _Conn | None = None
        last_send = loop.time()
        sending = True
        self.sending += 1
        me = asyncio.current_task()
        assert me is not None
        try:
            for k, at in enumerate(plan.send_times.tolist()):
                target = t0 + at
                if not await self._sleep(me, target - loop.time()):
                    break
                if conn is None or conn.closed:
                    # A camera whose stream broke reconnects for its next frame.
                    conn = self._open()
                    conns = [c for c in conns if c.reader is not None and not c.reader.done()]
                    conns.append(conn)
                sample = (plan.sample_offset + k) % n_samples
                rid = f"{plan.index}-{k}"
                request = pb.InferRequest(
                    task=app.task,
                    inputs=(inputs.tensors[sample],),
                    sla=sla,
                    request_id=rid,
                    app=app.name,
                )
                now = loop.time()
                last_send = now
                tally.send_lag.append(now - target)
                p = Pending(
                    sent_at=now,
                    app=plan.app,
                    bucket=min(int(now - t0), last_bucket),
                    label=-1 if inputs.labels is None else inputs.labels[sample],
                )
                conn.pending[rid] = p
                tally.on_sent(p)
                try:
                    await conn.stream.send(request)
                except ApdispatchError as exc:
                    if conn.pending.pop(rid, None) is not None:
                        tally.on_failed(p, f"send failed: {exc.code.name}: {exc.message}")
                    conn.closed = True
            sending = False
            self.sending -= 1
            if conn is not None and not conn.closed:
                await conn.stream.done_writing()
            # Replies to the last query are due by its deadline; earlier ones sooner.
            wait_until = last_send + app.deadline_ms / 1000.0 + self.grace_s
            readers = {c.reader for c in conns if c.reader is not None and not c.reader.done()}
            if readers:
                await asyncio.wait(readers, timeout=max(0.0, wait_until - loop.time()))
        finally:
            if sending:
                self.sending -= 1
            for c in conns:
                # Anything still unanswered is lost: count it, then tear down.
                c.abandon(tally, NO_REPLY)
                if c.reader is not None:
                    c.reader.cancel()
                c.stream.cancel()

    async def launch(self) -> None:
        """Start every stream at its time (a task for each that sends anything)."""
        me = asyncio.current_task()
        assert me is not None
        for plan in self.plan.streams:
            if not await self._sleep(me, self.t0 + plan.start_s - self.loop.time()):
                return
            self.started += 1
            if plan.send_times.size:
                self.tasks.append(asyncio.create_task(self.run_stream(plan)))


async def _stop_on(event: asyncio.Event, runner: _Runner) -> None:
    await event.wait()
    runner.stop()


async def _progress(runner: _Runner, duration_s: float) -> None:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is an optional dependency
        return
    tally = runner.tally

    def update() -> None:
        bar.n = min(runner.loop.time() - runner.t0, duration_s)
        ok = f"{tally.ok / tally.done:.1%}" if tally.done else "-"
        waiting = tally.sent - tally.done
        bar.set_postfix_str(
            f"streams={runner.sending} sent={tally.sent} waiting={waiting} ok={ok}", refresh=False
        )
        bar.refresh()

    with tqdm(
        total=duration_s,
        file=sys.stderr,
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}]{postfix}",
    ) as bar:
        try:
            while True:
                update()
                await asyncio.sleep(0.5)
        finally:
            update()


async def run_load(
    scenario: Scenario,
    ap: str,
    samples: Samples | Path,
    *,
    duration_s: float | None = None,
    seed: int | None = None,
    progress: bool = False,
    query_process: QueryProcess = "periodic",
    grace_s: float = DEFAULT_GRACE_S,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    stop: asyncio.Event | None = None,
    force: asyncio.Event | None = None,
    observer: Observer | None = None,
    channel_options: Iterable[tuple[str, Any]] | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    token: str | None = None,
) -> LoadReport:
    """Offer ``scenario``'s load to the AP at ``ap`` and report what came back.

    ``samples`` maps task -> (x, y) or is a model zoo folder holding
    ``samples/<task>.npz``. ``duration_s`` compresses the scenario in time
    (``Scenario.scaled``: every phase is visited, load levels are kept);
    ``seed`` defaults to the scenario's. Setting ``stop`` ends the sending early;
    outstanding replies are still awaited and the report covers what was sent.
    Setting ``force`` also ends that wait: replies still missing count as
    ``failed`` (``no reply``), and the report is made all the same.
    ``observer`` sees every send and outcome as it happens; ``channel_options``
    go to the gRPC channel (e.g. a short reconnect back-off when the AP restarts);
    ``ca``, ``cert``, ``key`` and ``token`` are the SDK's (TLS, mutual TLS, bearer token).
    Raises UnavailableError when the AP cannot be reached at the start; once
    running, failures are outcomes.
    """
    if duration_s is not None and duration_s != scenario.duration_s:
        scenario = scenario.scaled(duration_s)
    seed = scenario.seed if seed is None else seed
    tasks = {a.task for a in scenario.apps}
    raw = load_samples(samples, tasks) if isinstance(samples, Path | str) else samples
    missing = tasks - set(raw)
    if missing:
        raise ValueError(f"no input samples for task(s): {', '.join(sorted(missing))}")
    inputs = {task: _task_inputs(task, *raw[task]) for task in tasks}
    plan = plan_load(scenario, seed=seed, query_process=query_process)

    async with AsyncClient(
        ap, channel_options=channel_options, ca=ca, cert=cert, key=key, token=token
    ) as client:
        await client.wait_ready(connect_timeout_s)
        runner = _Runner(scenario, plan, client, inputs, grace_s, observer)
        wall_start = time.perf_counter()
        runner.t0 = runner.loop.time()
        ticker = asyncio.create_task(_progress(runner, scenario.duration_s)) if progress else None
        watcher = asyncio.create_task(_stop_on(stop, runner)) if stop is not None else None
        forced = force if force is not None else asyncio.Event()
        try:
            # Each stream ends by itself (deadline + grace after its last query).
            ended = await cut_short(runner.launch(), forced) and await cut_short(
                asyncio.gather(*runner.tasks), forced
            )
            if not ended:
                runner.stop()  # a no-op when ``stop`` came first, as it does from signals
        finally:
            if watcher is not None:
                watcher.cancel()
            # Only on errors (or cancellation) are there streams left to stop;
            # their own cleanup still accounts for every query they sent.
            left = [t for t in runner.tasks if not t.done()]
            for t in left:
                t.cancel()
            await asyncio.gather(*left, return_exceptions=True)
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
        wall_s = time.perf_counter() - wall_start
    return build_report(
        runner.tally,
        plan,
        scenario,
        ap=ap,
        seed=seed,
        grace_s=grace_s,
        streams=runner.started,
        wall_s=wall_s,
        stopped_at_s=runner.stopped_at,
        manifest_accuracy=_manifest_accuracy(samples),
    )


def _manifest_accuracy(samples: Samples | Path) -> dict[str, float]:
    """Variant -> held-out accuracy, from the zoo's manifest when ``samples`` is its folder."""
    if not isinstance(samples, Path | str) or not (Path(samples) / MANIFEST_NAME).is_file():
        return {}
    return {v.name: v.accuracy for v in load_manifest(Path(samples)).variants}
