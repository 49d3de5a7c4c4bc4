"""Open-loop load generator: a scenario's client streams against a running AP.

Client streams (cameras, say) arrive as a Poisson process whose rate follows the
scenario's piecewise-constant ``clients_per_min`` schedule. Each stream picks an
app by ``share``, lives an exponential time with mean ``stream_mean_s`` (cut at
the end of the run) and sends its app's queries over one ``InferStream`` call.

Queries within a stream are periodic by default (``rate_qps`` frames per second
with a random phase, like a camera); ``query_process="poisson"`` sends them as a
Poisson process of the same rate instead. Sending is open loop: every stream
has a writer that follows its schedule and a reader that collects replies, so a
slow AP never slows the offered load down; it shows up as latency and outcomes.

Every query sent gets exactly one outcome. After a stream's last query it waits
for outstanding replies up to its app's deadline plus a grace period; replies
still missing then count as ``failed`` with the error ``no reply``.

The whole plan (stream arrivals, apps, lifetimes, send times, inputs) is drawn
up front from one seeded ``numpy.random.Generator``: the same seed offers the
same load whatever the AP does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, NamedTuple

import numpy as np

from apdispatch.client import AsyncClient, AsyncStream, Result
from apdispatch.common import tensors
from apdispatch.common.errors import ApdispatchError, UnavailableError
from apdispatch.common.outcomes import OUTCOMES, SERVED
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.scenario import Scenario, ScenarioError, load_scenario
from apdispatch.scenario.plan import LoadPlan, QueryProcess, StreamPlan, plan_load, stream_starts

__all__ = [
    "LoadPlan",
    "LoadReport",
    "QueryProcess",
    "StreamPlan",
    "load_samples",
    "main",
    "plan_load",
    "run_load",
    "stream_starts",
]

Samples = Mapping[str, tuple[np.ndarray, np.ndarray]]

DEFAULT_GRACE_S: Final = 2.0
DEFAULT_CONNECT_TIMEOUT_S: Final = 5.0
NO_REPLY: Final = "no reply"
_OUTCOME_INDEX: Final[Mapping[str, int]] = MappingProxyType({name: i for i, name in enumerate(OUTCOMES)})
_FAILED: Final = _OUTCOME_INDEX["failed"]
_REJECTED: Final = _OUTCOME_INDEX["rejected"]
_STOP: Final = "apdispatch.tools.loadgen.stop"  # cancel message of _Runner.stop()
# Distinct error messages kept in the report; the rest are counted as "other".
_MAX_ERROR_KINDS: Final = 50
# Sample rows encoded up front (and cycled); bounds memory for large sample sets.
MAX_SAMPLES: Final = 4096


# ------------------------------------------------------------------------ samples


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


# ------------------------------------------------------------------------- report


def _percentiles(values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    a = np.asarray(values_s) * 1000.0
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "max": round(float(a.max()), 3),
    }


def _counts_block(sent: int, counts: list[int], latencies_s: list[float]) -> dict[str, Any]:
    total = sum(counts)
    block: dict[str, Any] = {"sent": sent, "total": total}
    block.update({name: counts[i] for i, name in enumerate(OUTCOMES)})

    def ratio(k: int) -> float:
        return round(k / total, 6) if total else 0.0

    block["success_ratio"] = ratio(counts[0])
    block["violation_ratio"] = ratio(counts[1] + counts[2])
    block["rejection_ratio"] = ratio(counts[3])
    block["failure_ratio"] = ratio(counts[4])
    block["latency_ms"] = _percentiles(latencies_s)
    return block


def _compute_stats(values_ms: list[float]) -> dict[str, float]:
    a = np.asarray(values_ms)
    p50, p90 = np.percentile(a, [50, 90])
    return {
        "n": len(values_ms),
        "mean": round(float(a.mean()), 4),
        "p50": round(float(p50), 4),
        "p90": round(float(p90), 4),
    }


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a run measured; ``to_dict()`` is the ``--json`` document."""

    scenario: str
    ap: str
    duration_s: float
    seed: int
    query_process: str
    grace_s: float
    streams: int
    sent: int
    counts: dict[str, int]
    latency_ms: dict[str, float | None]
    reject_latency_ms: dict[str, float | None]
    send_lag_ms: dict[str, float | None]
    per_app: dict[str, dict[str, Any]]
    timeline: list[dict[str, int]]
    served_by: dict[str, int]
    observed_accuracy: dict[str, dict[str, float]]
    errors: dict[str, int]
    unmatched_replies: int
    wall_s: float
    stopped_at_s: float | None = None  # when sending was stopped early (Ctrl-C), else None
    # What the workers reported holding a slot for, per target (n, mean, p50,
    # p90 over served replies): the live service times a simulator calibration
    # is fitted to (apdispatch.tools.fidelity).
    compute_ms: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def counts_add_up(self) -> bool:
        return self.total == self.sent

    def ratio(self, outcome: str) -> float:
        return self.counts[outcome] / self.total if self.total else 0.0

    @property
    def success_ratio(self) -> float:
        return self.ratio("ok")

    @property
    def violation_ratio(self) -> float:
        return self.ratio("late") + self.ratio("inaccurate")

    @property
    def rejection_ratio(self) -> float:
        return self.ratio("rejected")

    def to_dict(self) -> dict[str, Any]:
        total = self.total
        return {
            "scenario": self.scenario,
            "ap": self.ap,
            "duration_s": self.duration_s,
            "seed": self.seed,
            "query_process": self.query_process,
            "streams": self.streams,
            "sent": self.sent,
            "total": total,
            **self.counts,
            "counts_add_up": self.counts_add_up,
            "success_ratio": round(self.success_ratio, 6),
            "violation_ratio": round(self.violation_ratio, 6),
            "rejection_ratio": round(self.rejection_ratio, 6),
            "failure_ratio": round(self.ratio("failed"), 6),
            "latency_ms": self.latency_ms,
            "reject_latency_ms": self.reject_latency_ms,
            "send_lag_ms": self.send_lag_ms,
            "per_app": self.per_app,
            "timeline": self.timeline,
            "served_by": self.served_by,
            "observed_accuracy": self.observed_accuracy,
            "compute_ms": self.compute_ms,
            "errors": self.errors,
            "unmatched_replies": self.unmatched_replies,
            "grace_s": self.grace_s,
            "wall_s": round(self.wall_s, 3),
            "stopped_at_s": None if self.stopped_at_s is None else round(self.stopped_at_s, 3),
        }

    def summary(self) -> str:
        """A plain-text table for people."""
        lines = [
            f"scenario {self.scenario} against {self.ap}: {self.duration_s:g} s, seed {self.seed}, "
            f"{self.streams} streams ({self.query_process} queries), {self.sent} queries sent",
            f"{'app':<20} {'sent':>8} {'ok':>7} {'late':>7} {'inacc':>7} {'rej':>7} "
            f"{'failed':>7} {'p50 ms':>8} {'p99 ms':>8}",
        ]

        def row(name: str, block: Mapping[str, Any]) -> str:
            total = block["total"]

            def pct(k: str) -> str:
                return f"{100.0 * block[k] / total:6.1f}%" if total else "      -"

            lat = block["latency_ms"]
            p50 = "-" if lat["p50"] is None else f"{lat['p50']:.1f}"
            p99 = "-" if lat["p99"] is None else f"{lat['p99']:.1f}"
            return (
                f"{name:<20} {total:>8} {pct('ok')} {pct('late')} {pct('inaccurate')} "
                f"{pct('rejected')} {pct('failed')} {p50:>8} {p99:>8}"
            )

        for name, block in self.per_app.items():
            lines.append(row(name, block))
        everything = _counts_block(self.sent, [self.counts[o] for o in OUTCOMES], [])
        everything["latency_ms"] = self.latency_ms
        lines.append(row("all", everything))
        lag = self.send_lag_ms
        if lag["p50"] is not None:
            lines.append(
                f"send lag (load generator behind schedule): p50 {lag['p50']:.2f} ms, "
                f"p99 {lag['p99']:.2f} ms, max {lag['max']:.2f} ms"
            )
        if self.served_by:
            top = sorted(self.served_by.items(), key=lambda kv: -kv[1])
            lines.append("served by: " + ", ".join(f"{k} {v}" for k, v in top))
        if self.errors:
            top = sorted(self.errors.items(), key=lambda kv: -kv[1])[:5]
            lines.append("errors: " + "; ".join(f"{v}x {k}" for k, v in top))
        if self.stopped_at_s is not None:
            lines.append(
                f"stopped early: sending ended at {self.stopped_at_s:.1f} s of {self.duration_s:g} s"
            )
        if not self.counts_add_up:
            lines.append(f"ERROR: outcomes add up to {self.total}, not to {self.sent} sent")
        return "\n".join(lines)


# --------------------------------------------------------------------------- run


class _Pending(NamedTuple):
    sent_at: float  # loop time (monotonic) when handed to gRPC
    app: int
    bucket: int
    label: int  # expected class, -1 when unknown


class _Tally:
    """Outcome counters, updated as replies come in."""

    def __init__(self, n_apps: int, n_buckets: int) -> None:
        self.sent = 0
        self.sent_per_app = [0] * n_apps
        self.done = 0
        self.ok = 0
        self.counts = [[0] * len(OUTCOMES) for _ in range(n_apps)]
        # per bucket: sent, then one count per outcome
        self.buckets = [[0] * (1 + len(OUTCOMES)) for _ in range(n_buckets)]
        self.latency: list[list[float]] = [[] for _ in range(n_apps)]
        self.reject_latency: list[float] = []
        self.served_by: Counter[str] = Counter()
        self.compute: dict[str, list[float]] = {}
        self.judged: Counter[str] = Counter()
        self.correct: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.unmatched = 0
        self.send_lag: list[float] = []

    def on_sent(self, p: _Pending) -> None:
        self.sent += 1
        self.sent_per_app[p.app] += 1
        self.buckets[p.bucket][0] += 1

    def _count(self, p: _Pending, outcome: int) -> None:
        self.done += 1
        self.counts[p.app][outcome] += 1
        self.buckets[p.bucket][1 + outcome] += 1

    def on_result(self, p: _Pending, result: Result, now: float) -> None:
        outcome = _OUTCOME_INDEX[result.outcome]
        self._count(p, outcome)
        if outcome == 0:
            self.ok += 1
        if result.outcome in SERVED:
            self.latency[p.app].append(now - p.sent_at)
            if result.served_by is not None:
                key = result.served_by.key
                self.served_by[key] += 1
                # A reply the AP cut off at the deadline carries no worker timings.
                if result.timings.compute_ms > 0.0:
                    self.compute.setdefault(key, []).append(result.timings.compute_ms)
                if p.label >= 0 and len(result.outputs) == 1:
                    out = result.output
                    if out.size > 1:
                        self.judged[key] += 1
                        self.correct[key] += int(np.argmax(out)) == p.label
        else:
            if outcome == _REJECTED:
                self.reject_latency.append(now - p.sent_at)
            self._error(f"{result.outcome}: {result.error or '(no message)'}")

    def on_failed(self, p: _Pending, error: str) -> None:
        self._count(p, _FAILED)
        self._error(f"failed: {error}")

    def _error(self, message: str) -> None:
        message = message[:200]
        if message in self.errors or len(self.errors) < _MAX_ERROR_KINDS:
            self.errors[message] += 1
        else:
            self.errors["other"] += 1


class _Conn:
    """One InferStream call of a client stream, with the requests awaiting replies."""

    __slots__ = ("closed", "pending", "reader", "stream")

    def __init__(self, stream: AsyncStream) -> None:
        self.stream = stream
        self.pending: dict[str, _Pending] = {}
        self.closed = False
        self.reader: asyncio.Task[None] | None = None

    def abandon(self, tally: _Tally, error: str) -> None:
        """Count every request still awaiting a reply as failed; synchronous on purpose,
        so that it also runs to the end inside a cancelled task."""
        self.closed = True
        pending, self.pending = self.pending, {}
        for p in pending.values():
            tally.on_failed(p, error)


class _Runner:
    def __init__(
        self,
        scenario: Scenario,
        plan: LoadPlan,
        client: AsyncClient,
        inputs: Mapping[str, _TaskInputs],
        grace_s: float,
    ) -> None:
        self.scenario = scenario
        self.plan = plan
        self.client = client
        self.inputs = inputs
        self.grace_s = grace_s
        self.loop = asyncio.get_running_loop()
        self.n_buckets = max(1, math.ceil(plan.duration_s))
        self.tally = _Tally(len(scenario.apps), self.n_buckets)
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
                p = _Pending(
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


def _report(runner: _Runner, scenario: Scenario, ap: str, seed: int, wall_s: float) -> LoadReport:
    tally = runner.tally
    totals = [sum(c[i] for c in tally.counts) for i in range(len(OUTCOMES))]
    all_latency = [v for lat in tally.latency for v in lat]
    per_app: dict[str, dict[str, Any]] = {}
    for i, app in enumerate(scenario.apps):
        block = _counts_block(tally.sent_per_app[i], tally.counts[i], tally.latency[i])
        per_app[app.name] = block
    timeline = []
    active = runner.plan.active_per_second()
    for b, row in enumerate(tally.buckets):
        entry = {"t_s": b, "sent": row[0]}
        entry.update({name: row[1 + i] for i, name in enumerate(OUTCOMES)})
        entry["streams"] = active[b]  # alive at some time in this second
        timeline.append(entry)
    accuracy = {
        key: {"n": n, "top1": round(tally.correct[key] / n, 6)} for key, n in sorted(tally.judged.items())
    }
    return LoadReport(
        scenario=scenario.name,
        ap=ap,
        duration_s=scenario.duration_s,
        seed=seed,
        query_process=runner.plan.query_process,
        grace_s=runner.grace_s,
        streams=runner.started,
        sent=tally.sent,
        counts={name: totals[i] for i, name in enumerate(OUTCOMES)},
        latency_ms=_percentiles(all_latency),
        reject_latency_ms=_percentiles(tally.reject_latency),
        send_lag_ms=_percentiles(tally.send_lag),
        per_app=per_app,
        timeline=timeline,
        served_by=dict(sorted(tally.served_by.items())),
        observed_accuracy=accuracy,
        compute_ms={key: _compute_stats(v) for key, v in sorted(tally.compute.items())},
        errors=dict(tally.errors.most_common()),
        unmatched_replies=tally.unmatched,
        wall_s=wall_s,
        stopped_at_s=runner.stopped_at,
    )


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
) -> LoadReport:
    """Offer ``scenario``'s load to the AP at ``ap`` and report what came back.

    ``samples`` maps task -> (x, y) or is a model zoo folder holding
    ``samples/<task>.npz``. ``duration_s`` compresses the scenario in time
    (``Scenario.scaled``: every phase is visited, load levels are kept);
    ``seed`` defaults to the scenario's. Setting ``stop`` ends the sending early;
    outstanding replies are still awaited and the report covers what was sent.
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

    async with AsyncClient(ap) as client:
        await client.wait_ready(connect_timeout_s)
        runner = _Runner(scenario, plan, client, inputs, grace_s)
        wall_start = time.perf_counter()
        runner.t0 = runner.loop.time()
        ticker = asyncio.create_task(_progress(runner, scenario.duration_s)) if progress else None
        watcher = asyncio.create_task(_stop_on(stop, runner)) if stop is not None else None
        try:
            await asyncio.create_task(runner.launch())
            # Each stream ends by itself (deadline + grace after its last query).
            await asyncio.gather(*runner.tasks)
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
    return _report(runner, scenario, ap, seed, wall_s)


# --------------------------------------------------------------------------- CLI


def _stop_on_signals(stop: asyncio.Event) -> None:
    """First Ctrl-C (or SIGTERM): stop sending, wait for replies, report. Second: abort."""
    loop = asyncio.get_running_loop()

    def first(sig: signal.Signals) -> None:
        print(
            f"\napdispatch load: {sig.name}: stopping; waiting for outstanding replies (again to abort)",
            file=sys.stderr,
        )
        stop.set()
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(s)  # back to the default: the next one aborts

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, first, sig)
    except (ValueError, RuntimeError, NotImplementedError):
        pass  # not the main thread, or no signal support: no graceful stop


def main(args: argparse.Namespace) -> int:
    """``apdispatch load``: 0 when the run completed, 1 when the AP was unreachable,
    2 for bad input (scenario, samples), 3 when the outcomes do not add up."""
    try:
        scenario = load_scenario(args.scenario)
    except (OSError, ScenarioError) as exc:
        print(f"apdispatch load: {exc}", file=sys.stderr)
        return 2
    progress = not getattr(args, "no_progress", False) and sys.stderr.isatty()

    async def run() -> LoadReport:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        return await run_load(
            scenario,
            args.ap,
            Path(args.models),
            duration_s=getattr(args, "duration", None),
            seed=getattr(args, "seed", None),
            progress=progress,
            connect_timeout_s=getattr(args, "connect_timeout", DEFAULT_CONNECT_TIMEOUT_S),
            stop=stop,
        )

    try:
        report = asyncio.run(run())
    except KeyboardInterrupt:
        print("apdispatch load: aborted", file=sys.stderr)
        return 130
    except UnavailableError as exc:
        print(f"apdispatch load: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"apdispatch load: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    out = getattr(args, "json", None)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.counts_add_up else 3
