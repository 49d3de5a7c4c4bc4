"""The discrete-event engine: one scenario, one policy, one run.

The AP side is the live AP's own code: a ``Registry`` the simulated workers
register with (``RegisterRequest``, as live workers do), a ``LatencyEstimator``
fed by simulated replies, and an ``apdispatch.routing.router.Router`` that admits,
asks the policy and counts requests in flight. Only the world around it is
simulated.

A query's life, times in milliseconds from the start of the run:

1. It reaches the AP (the arrival plan, ``apdispatch.sim.arrivals``). The router
   rejects it, or picks a target; its round trip for this query is the
   cluster's ``rtt_ms`` plus normal jitter of sd ``jitter_ms``, cut at 0.
2. Half the round trip later it reaches the worker and waits in the worker's
   FIFO queue for a slot (edge), or in its variant's batch queue (cloud).
3. It starts when a slot is free. A query whose deadline has passed by then is
   dropped, unserved, as the live worker does (``Slots.acquire``,
   ``BatchingScheduler``); it counts ``late``.
4. Executions sharing a worker progress at ``1 / (1 + interference * (n - 1))``
   of full speed while n run (ECSRL's linear slowdown). Each worker keeps a
   virtual clock that advances at that rate; an execution finishes when the
   clock has advanced by its work, so a change of n costs O(slots) and no
   per-execution rescheduling.
5. The reply reaches the AP half a round trip after the execution ends.

The deadline counts from arrival at the AP to the reply back at the AP. As in
the live AP (``Forwarder`` with ``late_grace_ms = 0``), the AP stops waiting at
the deadline: the query counts ``late`` then, leaves the worker's in-flight
count, and its reply, if one still comes, teaches the estimator nothing.

Batching (cloud workers, as ``workers.cloud.BatchingScheduler``): per variant,
queries queue until ``max_batch_size`` are there or ``max_wait_ms`` has passed
since the first arrived; the batch then waits for a slot (FIFO with the
worker's other batches) and takes up to ``max_batch_size`` of the queries
queued by the time it gets one. A batch holds one slot; its service time is
interpolated between the batch-1 and batch-8 figures.

Energy per worker: ``idle_w`` over the scenario's duration, plus
``(busy_w - idle_w) * running / slots`` integrated over the time anything runs
(work still running after the end of the arrivals is included).

Ties in time go to the earlier-scheduled event, and worker events before AP
arrivals at the same instant; every random draw comes from the arrival plan,
so a run is a pure function of (scenario, model, policy and its seed, arrival
seed).
"""

from __future__ import annotations

import heapq
import itertools
import math
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from apdispatch.common.errors import RejectedError
from apdispatch.common.outcomes import OUTCOMES
from apdispatch.policies import Policy, RequestView
from apdispatch.routing.cascade import CascadeConfig
from apdispatch.routing.estimator import LatencyEstimator
from apdispatch.routing.registry import Registry, Target
from apdispatch.routing.router import Decision, Router
from apdispatch.sim.arrivals import Queries
from apdispatch.sim.model import SimModel, SimVariant, SimWorker

OK, LATE, INACCURATE, REJECTED, FAILED = range(5)
N_OUTCOMES = len(OUTCOMES)

# Event kinds (third field of a heap entry: time, sequence, kind, subject, version).
_AT_WORKER = 0
_DONE = 1
_AT_AP = 2
_BATCH_TIMER = 3

# RequestView(...) without its Python-level constructor call (see apdispatch.routing.router).
_new = tuple.__new__

# Executions whose virtual finish is this close to the clock end together
# (several started at once with the same work, up to rounding).
_EPS = 1e-9


class _Query:
    """One admitted query, from decision to reply (or deadline)."""

    __slots__ = (
        "accurate",
        "app",
        "arrival",
        "at_worker",
        "batcher",
        "cell",
        "compute",
        "deadline",
        "decision",
        "escalate",
        "escalation_z",
        "finish_v",
        "open",
        "origin",
        "row",
        "rtt",
        "started",
        "work",
        "worker",
    )
    # Set when it runs (not before: the constructor is on the hot path).
    started: float
    finish_v: float  # on the worker's virtual clock
    compute: float
    escalation_z: float  # a cascade's: the jitter of its escalation's round trip

    def __init__(
        self,
        app: int,
        arrival: float,
        deadline: float,
        rtt: float,
        decision: Decision,
        route: _Route,
        accurate: bool,
        row: list[int],
        cell: int,
    ) -> None:
        self.app = app
        self.arrival = arrival
        self.deadline = deadline  # absolute, ms
        self.rtt = rtt
        self.decision = decision
        self.worker = route.worker
        self.work = route.work  # service ms alone on the worker (direct execution)
        self.batcher = route.batcher
        self.accurate = accurate  # the variant reaches the app's min_accuracy
        self.row = row  # the app's counts, and where this query's window starts in it
        self.cell = cell
        self.at_worker = arrival + rtt * 0.5
        self.open = True  # the AP still waits for it
        self.origin = decision  # the policy's choice, told the outcome (a cascade's second step is not)
        self.escalate = False  # a cascade's first answer will not be kept (drawn at arrival)


class _Batch:
    __slots__ = ("finish_v", "queries", "started")

    def __init__(self, queries: list[_Query], started: float, finish_v: float) -> None:
        self.queries = queries
        self.started = started
        self.finish_v = finish_v


class _Batcher:
    """One variant's batch queue on a cloud worker."""

    __slots__ = ("armed", "queue", "service", "worker")

    def __init__(self, worker: _Worker, variant: SimVariant) -> None:
        self.worker = worker
        self.queue: deque[_Query] = deque()
        self.armed = False  # waiting for a slot (or about to take one)
        # Service ms of a batch of b alone on the worker, by b.
        speed = worker.spec.device.speed
        self.service = [0.0] + [variant.service_ms(speed, b) for b in range(1, worker.max_batch + 1)]


class _Worker:
    """A simulated worker's state: slots, queue, virtual clock, energy."""

    __slots__ = (
        "batchers",
        "batching",
        "busy_ms",
        "cluster",
        "dispatched",
        "jitter",
        "max_batch",
        "max_wait",
        "queue",
        "rates",
        "rtt",
        "running",
        "slots",
        "spec",
        "t_last",
        "vclock",
        "version",
        "waiters",
    )

    def __init__(self, spec: SimWorker, cluster: int) -> None:
        device = spec.device
        self.spec = spec
        self.cluster = cluster
        self.slots = device.slots
        self.rtt = spec.rtt_ms
        self.jitter = spec.jitter_ms
        # Progress rate of each running execution, by how many run (index 0 unused).
        self.rates = [1.0] + [1.0 / (1.0 + device.interference * (n - 1)) for n in range(1, device.slots + 1)]
        self.running: list[_Query | _Batch] = []
        self.queue: deque[_Query] = deque()
        self.vclock = 0.0
        self.t_last = 0.0
        self.busy_ms = 0.0  # integral of running executions over time
        self.version = 0  # of the pending _DONE event; older ones are stale
        self.batching = spec.batching
        self.max_batch = spec.max_batch_size
        self.max_wait = spec.max_wait_ms
        self.batchers = {v.name: _Batcher(self, v) for v in spec.variants} if spec.batching else {}
        self.waiters: deque[_Batcher] = deque()  # armed batchers waiting for a slot, FIFO
        self.dispatched = 0

    def advance(self, now: float) -> None:
        """Bring the virtual clock and the busy integral up to ``now``."""
        n = len(self.running)
        dt = now - self.t_last
        if n:
            self.vclock += dt * self.rates[n]
            self.busy_ms += n * dt
        self.t_last = now

    def energy_j(self, duration_s: float) -> float:
        device = self.spec.device
        busy_s = self.busy_ms / 1000.0
        return device.idle_w * duration_s + (device.busy_w - device.idle_w) * busy_s / self.slots


@dataclass(frozen=True, slots=True)
class _Route:
    """What the engine needs of a target, looked up once per decision."""

    worker: _Worker
    work: float
    batcher: _Batcher | None
    accuracy: float


class Simulation:
    """One run of a model under one policy over a fixed arrival plan.

    ``run_until(t_ms)`` advances the run (it can be called repeatedly, e.g. once
    per control window), ``finish()`` runs it to the end and settles every
    query. Counts are kept per app, per arrival window and per outcome in
    ``table`` (shape apps x windows x outcomes once finished).
    """

    def __init__(
        self,
        model: SimModel,
        policy: Policy,
        arrivals: Queries,
        *,
        window_s: float = 10.0,
        estimator: LatencyEstimator | None = None,
        cascade: CascadeConfig | None = None,
    ) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.model = model
        self.arrivals = arrivals
        self.window_s = window_s
        self.now_ms = 0.0
        scenario = model.scenario
        self.duration_ms = scenario.duration_s * 1000.0
        self.registry = Registry(lease_s=math.inf, clock=lambda: self.now_ms / 1000.0)
        self.router = Router(policy, estimator or LatencyEstimator(), cascade)
        clusters = {name: i for i, name in enumerate(model.clusters)}
        self.workers: list[_Worker] = []
        by_id: dict[str, _Worker] = {}
        for spec in model.workers:
            self.registry.register(spec.register_request())
            worker = _Worker(spec, clusters[spec.cluster])
            self.workers.append(worker)
            by_id[spec.worker_id] = worker
        self._routes: dict[Target, _Route] = {}
        for task in self.registry.tasks():
            for target in self.registry.targets(task) or ():
                worker = by_id[target.worker.worker_id]
                variant = model.variants[target.variant.name]
                self._routes[target] = _Route(
                    worker=worker,
                    work=variant.service_ms(worker.spec.device.speed, 1),
                    batcher=worker.batchers.get(variant.name),
                    accuracy=variant.accuracy,
                )
        apps = scenario.apps
        self.windows = max(1, math.ceil(scenario.duration_s / window_s))
        self._window_ms = window_s * 1000.0
        # Counts per app: a flat row of windows x outcomes.
        self._table = [[0] * (self.windows * N_OUTCOMES) for _ in apps]
        # Queries the AP waits for, one deque per distinct deadline: arrival
        # order is deadline order within each, so expiry only looks at heads.
        groups: dict[float, deque[_Query]] = {}
        self._app_info: list[tuple[str, str, float, float, Sequence[Target], list[int], deque[_Query]]] = [
            (
                a.task,
                a.name,
                a.deadline_ms,
                a.min_accuracy,
                self.registry.targets(a.task) or [],
                self._table[i],
                groups.setdefault(a.deadline_ms, deque()),
            )
            for i, a in enumerate(apps)
        ]
        self._pending = list(groups.values())
        self._next_expiry = math.inf
        router = self.router
        self._decide = router.decide
        self._release = router.release
        self._learn = router.learn
        self._observe = router.observe

        self._heap: list[tuple[float, int, int, Any, int]] = []
        self._seq = itertools.count()
        self._times: list[float] = arrivals.times_ms.tolist()
        self._apps: list[int] = arrivals.apps.tolist()
        self._z: list[float] = arrivals.jitter_z.tolist()
        cascade_u, escalation_z = arrivals.cascade_draws()
        self._cascade_u: list[float] = cascade_u.tolist()
        self._escalation_z: list[float] = escalation_z.tolist()
        self.escalated = 0  # cascades whose first answer was not kept
        self._next = 0

        self.resolved = [0] * N_OUTCOMES  # outcomes so far, whenever the query arrived
        self.cluster_latency_ms = [0.0] * len(clusters)  # sum over replies and expiries
        self.cluster_replies = [0] * len(clusters)
        self.latencies = array("d")  # end-to-end ms of every admitted query
        self.finished = False

    # -- the event loop -------------------------------------------------------------

    def run_until(self, t_end_ms: float) -> None:
        """Process every arrival and event before ``t_end_ms``."""
        heap = self._heap
        pop = heapq.heappop
        times = self._times
        n_arrivals = len(times)
        at_worker, done, at_ap, batch_timer, arrive = (
            self._at_worker,
            self._done,
            self._at_ap,
            self._batch_timer,
            self._arrive,
        )
        now = self.now_ms
        i = self._next
        next_arrival = times[i] if i < n_arrivals else math.inf
        while True:
            if heap and heap[0][0] <= next_arrival:
                now = heap[0][0]
                if now >= t_end_ms:
                    break
                _, _, kind, subject, version = pop(heap)
                if kind == _AT_WORKER:
                    at_worker(subject, now)
                elif kind == _DONE:
                    if version == subject.version:
                        done(subject, now)
                elif kind == _AT_AP:
                    at_ap(subject, now)
                else:
                    batch_timer(subject, now)
            else:
                if next_arrival >= t_end_ms:
                    break
                now = next_arrival
                arrive(i, now)
                i += 1
                next_arrival = times[i] if i < n_arrivals else math.inf
        self._next = i
        # Time stands at the end of the span (or at the last event, run to the end).
        self.now_ms = t_end_ms if t_end_ms != math.inf else max(now, self.now_ms)
        if self.now_ms > self._next_expiry:
            self._expire_until(self.now_ms)

    def finish(self) -> None:
        """Run to the end: every query gets its outcome, every worker goes idle."""
        self.run_until(math.inf)
        self._expire_until(math.inf)
        for w in self.workers:
            w.advance(max(w.t_last, self.now_ms))
        self.finished = True

    # -- the AP ---------------------------------------------------------------------

    def _arrive(self, i: int, t: float) -> None:
        app = self._apps[i]
        if t > self._next_expiry:
            self._expire_until(t)
        task, name, deadline_ms, min_accuracy, targets, row, pending = self._app_info[app]
        w = int(t / self._window_ms)
        cell = (w if w < self.windows else self.windows - 1) * N_OUTCOMES
        # A fresh view per query, as the live AP makes: a policy may key its
        # pending decisions by the view's identity. The AP spends no simulated
        # time before deciding, so the whole deadline is left. Its clock is
        # simulated time, in seconds as the live AP's ``time.monotonic()``.
        view = _new(RequestView, (task, name, deadline_ms, min_accuracy, t * 0.001))
        try:
            decision = self._decide(view, targets)
        except RejectedError:
            row[cell + REJECTED] += 1
            self.resolved[REJECTED] += 1
            return
        route = self._routes[decision.target]
        worker = route.worker
        worker.dispatched += 1
        rtt = worker.rtt + worker.jitter * self._z[i]
        if rtt < 0.0:
            rtt = 0.0
        deadline = t + deadline_ms
        plan = decision.cascade
        # A cascade's kept answers reach the floor (the calibration's); the rest are escalated.
        accurate = plan is not None or route.accuracy >= min_accuracy
        q = _Query(app, t, deadline, rtt, decision, route, accurate, row, cell)
        if plan is not None:
            q.escalate = self._cascade_u[i] < 1.0 - plan.acceptance.coverage
            q.escalation_z = self._escalation_z[i]
        if not pending and deadline < self._next_expiry:
            self._next_expiry = deadline
        pending.append(q)
        heapq.heappush(self._heap, (q.at_worker, next(self._seq), _AT_WORKER, q, 0))

    def _at_ap(self, q: _Query, t: float) -> None:
        """A reply is back at the AP."""
        if t > self._next_expiry:
            self._expire_until(t)
        if not q.open:
            return  # the AP gave up on it at its deadline
        decision = q.decision
        self._release(decision)
        self._learn(decision, q.rtt, q.compute)
        plan = decision.cascade
        if plan is not None:
            # The first answer's confidence: clear of the threshold unless drawn to be escalated.
            confidence = 0.0 if q.escalate else plan.acceptance.threshold
            if not self.router.accepted(decision, confidence):
                self._escalate(q, t)
                return
        q.open = False
        latency = t - q.arrival
        outcome = OK if q.accurate else INACCURATE
        self._observe(q.origin, OUTCOMES[outcome], latency)
        self._count(q, outcome, latency)

    def _escalate(self, q: _Query, t: float) -> None:
        """A cascade's first answer was not kept: the second step, to an accurate target, from now."""
        info = self._app_info[q.app]
        decision = self.router.escalate(q.decision, info[4], t * 0.001)
        route = self._routes[decision.target]
        worker = route.worker
        worker.dispatched += 1
        self.escalated += 1
        rtt = worker.rtt + worker.jitter * q.escalation_z
        q.rtt = rtt if rtt > 0.0 else 0.0
        q.decision = decision
        q.worker = worker
        q.work = route.work
        q.batcher = route.batcher
        q.accurate = route.accuracy >= info[3]
        q.at_worker = t + q.rtt * 0.5
        heapq.heappush(self._heap, (q.at_worker, next(self._seq), _AT_WORKER, q, 0))

    def _expire_until(self, now: float) -> None:
        """The AP stops waiting for every query whose deadline is before ``now``."""
        nxt = math.inf
        for pending in self._pending:
            while pending and pending[0].deadline < now:
                q = pending.popleft()
                if q.open:
                    self._expire(q)
            if pending and pending[0].deadline < nxt:
                nxt = pending[0].deadline
        self._next_expiry = nxt

    def _expire(self, q: _Query) -> None:
        q.open = False
        latency = q.deadline - q.arrival
        self._release(q.decision)
        self._observe(q.origin, "late", latency)
        self._count(q, LATE, latency)

    def _count(self, q: _Query, outcome: int, latency: float) -> None:
        """The outcome of an admitted query (rejections are counted where they happen)."""
        q.row[q.cell + outcome] += 1
        self.resolved[outcome] += 1
        self.latencies.append(latency)
        cluster = q.worker.cluster
        self.cluster_latency_ms[cluster] += latency
        self.cluster_replies[cluster] += 1

    # -- the workers ----------------------------------------------------------------

    def _at_worker(self, q: _Query, t: float) -> None:
        worker = q.worker
        if worker.batching:
            self._enqueue_batch(worker, q, t)
        elif len(worker.running) < worker.slots:
            worker.advance(t)
            self._start(worker, q, t)
            self._schedule(worker, t)
        else:
            worker.queue.append(q)

    def _start(self, worker: _Worker, q: _Query, t: float) -> None:
        """Run ``q`` now (the caller advanced the clock and reschedules)."""
        q.started = t
        q.finish_v = worker.vclock + q.work
        worker.running.append(q)

    def _schedule(self, worker: _Worker, t: float) -> None:
        """(Re)schedule the worker's next completion; older ones become stale."""
        worker.version += 1
        running = worker.running
        if not running:
            return
        first = running[0].finish_v
        for x in running:
            if x.finish_v < first:
                first = x.finish_v
        t_done = t + (first - worker.vclock) / worker.rates[len(running)]
        heapq.heappush(self._heap, (t_done, next(self._seq), _DONE, worker, worker.version))

    def _done(self, worker: _Worker, t: float) -> None:
        """Executions end; free slots go to the queue."""
        worker.advance(t)
        horizon = worker.vclock + _EPS
        still: list[_Query | _Batch] = []
        push = heapq.heappush
        heap = self._heap
        seq = self._seq
        if worker.batching:
            for x in worker.running:
                if x.finish_v > horizon:
                    still.append(x)
                    continue
                compute = t - x.started
                for q in x.queries:  # type: ignore[union-attr]
                    q.compute = compute
                    push(heap, (t + q.rtt * 0.5, next(seq), _AT_AP, q, 0))
            worker.running = still
            waiters = worker.waiters
            while waiters and len(still) < worker.slots:
                self._start_batch(worker, waiters.popleft(), t)
        else:
            for x in worker.running:
                if x.finish_v > horizon:
                    still.append(x)
                    continue
                x.compute = t - x.started  # type: ignore[union-attr]
                push(heap, (t + x.rtt * 0.5, next(seq), _AT_AP, x, 0))  # type: ignore[union-attr]
            worker.running = still
            queue = worker.queue
            slots = worker.slots
            while queue and len(still) < slots:
                q = queue.popleft()
                if t >= q.deadline:
                    continue  # dropped unserved: its deadline passed while it queued
                self._start(worker, q, t)
        self._schedule(worker, t)

    # -- batching (cloud workers) ---------------------------------------------------

    def _enqueue_batch(self, worker: _Worker, q: _Query, t: float) -> None:
        batcher = q.batcher
        assert batcher is not None
        queue = batcher.queue
        queue.append(q)
        if batcher.armed:
            return
        if len(queue) >= worker.max_batch or t >= queue[0].at_worker + worker.max_wait:
            running = len(worker.running)
            self._arm(worker, batcher, t)
            if len(worker.running) != running:
                self._schedule(worker, t)
        elif len(queue) == 1:
            self._push_timer(batcher, q.at_worker + worker.max_wait)

    def _push_timer(self, batcher: _Batcher, at: float) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), _BATCH_TIMER, batcher, 0))

    def _batch_timer(self, batcher: _Batcher, t: float) -> None:
        worker = batcher.worker
        queue = batcher.queue
        # A timer outlived by its batch (taken full, or re-armed) finds nothing to do.
        if not batcher.armed and queue and t >= queue[0].at_worker + worker.max_wait - _EPS:
            running = len(worker.running)
            self._arm(worker, batcher, t)
            if len(worker.running) != running:
                self._schedule(worker, t)

    def _arm(self, worker: _Worker, batcher: _Batcher, t: float) -> None:
        """The batch is ready: it takes a free slot, or waits for one in FIFO order.

        Starting a batch changes what runs: the caller reschedules the worker.
        """
        batcher.armed = True
        if len(worker.running) < worker.slots and not worker.waiters:
            self._start_batch(worker, batcher, t)
        else:
            worker.waiters.append(batcher)

    def _start_batch(self, worker: _Worker, batcher: _Batcher, t: float) -> None:
        """A slot is free for ``batcher``: run what is queued, up to a full batch."""
        batcher.armed = False
        queue = batcher.queue
        batch: list[_Query] = []
        max_batch = worker.max_batch
        while queue and len(batch) < max_batch:
            q = queue.popleft()
            if t >= q.deadline:
                continue  # dropped unserved: its deadline passed while it waited for a batch
            q.started = t
            batch.append(q)
        if batch:
            worker.advance(t)
            worker.running.append(_Batch(batch, t, worker.vclock + batcher.service[len(batch)]))
        if queue:
            # What is left forms the next batch, by the same rule.
            if len(queue) >= max_batch or t >= queue[0].at_worker + worker.max_wait:
                self._arm(worker, batcher, t)
            else:
                self._push_timer(batcher, queue[0].at_worker + worker.max_wait)

    # -- what a run produced ----------------------------------------------------------

    def table(self) -> np.ndarray:
        """Counts per app, arrival window and outcome: shape (apps, windows, outcomes)."""
        return np.array(self._table, dtype=np.int64).reshape(len(self._table), self.windows, N_OUTCOMES)

    def energy_j(self) -> float:
        duration_s = self.model.scenario.duration_s
        return float(sum(w.energy_j(duration_s) for w in self.workers))

    def energy_by_worker(self) -> dict[str, float]:
        duration_s = self.model.scenario.duration_s
        return {w.spec.worker_id: w.energy_j(duration_s) for w in self.workers}

    def dispatched_by_cluster(self) -> dict[str, int]:
        out = dict.fromkeys(self.model.clusters, 0)
        for w in self.workers:
            out[w.spec.cluster] += w.dispatched
        return out
