"""An upper bound on the success ratio of a simulated run: what no policy can exceed.

Given a scenario, the variant table and the *realized* arrivals of a run, a linear
program over time windows bounds the number of queries any policy can serve ``ok``
(accurate enough, reply within the deadline). Policies are reported beside it, so the
gap to the limit is visible. The simulator calls::

    upper_bound(scenario, {app: arrival_times_s}, {name: VariantCost(...)})   # rtt="expected"

or, with ``--bound-rtt realized``, adds ``rtt_ms={app: rtt_each_query_would_pay_at_each_cluster}``
(queries x clusters); ``variant_costs`` reads the table from a scenario and a manifest,
uncalibrated.

Device model it bounds (``apdispatch.sim``'s): variant v on device d serves a batch of
b in ``s(b) = (t1 + (b - 1) / 7 * (t8 - t1)) / speed + overhead`` (t1, t8: the
variant's batch-1 and batch-8 latencies on a speed-1.0 device; b <= the device's
``max_batch_size``); a batch holds one slot; n running executions (n <= slots) each
progress at ``1 / (1 + interference * (n - 1))``; each query pays one round trip
``max(0, rtt_ms + jitter_ms * z)`` of the cluster it is sent to; each query goes to at
most one target. Anything that only slows the simulator down (queueing, batch timers,
dropping expired queries, batching only on cloud workers) keeps the bound valid.

Why no policy can do better (pathwise form). Cut time into windows of length L
(window i = [t0 + i L, t0 + (i + 1) L)); a group g is the queries of one app k
arriving in one window i that have the same set of usable targets; n_g of them.
Take any run and an ok query q of group g, served by target t = (worker w, variant v)
in a batch of b:

1. t is usable by q: v has q's task, accuracy(v) >= min_accuracy_k, and
   rtt_q + l_t <= deadline_k, where l_t = min over b of s(b): queueing and
   interference only add to the service time.
2. Its batch makes progress only while q is at the worker, inside
   [a_q, a_q + deadline_k], so only in windows i .. i + ceil(deadline_k / L).
3. The batch needs s(b) units of progress and must end within d_q = deadline_k - r_k of
   its start, r_k a least RTT of k's queries at w's cluster. A worker's time is shared
   by the executions running on it: with n of them, each holds 1 / n of it and
   progresses at 1 / (1 + interference (n - 1)). Whatever the schedule, the batch holds
   at least s(b) g(d_q / s(b)) of w's time, g the lower convex envelope of the points
   (1 + interference (n - 1), (1 + interference (n - 1)) / n), n <= slots: the least
   worker time per unit of progress at a slowdown no larger than d_q / s(b) (a query
   that barely fits alone must run alone). q's share of it, a b-th, is at least c_kt,
   the minimum over b <= max_batch_size of s(b) / b * g(d_q / s(b)). A worker has L
   of its time in one window.

Let f_qj be the share of q's batch's worker time spent in window j (sum_j f_qj = 1) and
x_gtj = sum of f_qj over the ok queries of g served by t. Then sum_tj x_gtj (the ok
queries of g) <= n_g, and sum over g and t on w of c_kt x_gtj <= L for every worker w
and window j: x is feasible for the LP "maximize sum x subject to these", so
the run's ok count is at most the LP's optimum. Workers of one group (same device,
cluster, variants) are pooled, their capacity rows added: a relaxation, and no looser,
since an optimum of the pooled LP split evenly is feasible for the workers. The
number reported is not the solver's optimum but b.y + sum_v max(0, 1 - (A^T y)_v) ub_v
for the solver's duals y >= 0 and ub_v >= x_v (from the demand rows): an upper bound
on every feasible x by weak duality, whatever the solver's tolerances.

RTTs. The usable sets need each query's RTT to each cluster:

- ``rtt_ms`` given (realized): the RTT every query would pay at every cluster in this
  run (the simulator draws them up front, common to all policies): the bound above,
  for every policy run on those draws.
- ``rtt="certain"``: the least RTT that is certain, ``max(0, rtt_ms)`` with no
  jitter, 0 with jitter: pathwise for any draws, loose where jitter lets a cluster
  that is too far on average look usable.
- ``rtt="expected"`` (default): a bound on the *expected* ok count over the RTT draws,
  given the arrivals. A query's RTT is drawn when it is sent, independently of the
  choice and of everything before, so P(ok | q sent to t) <= p_kt =
  P(RTT_c <= deadline_k - l_t); hence E[ok_gt] <= p_kt E[sent_gt] with
  sum_t sent_gt <= n_g: the demand row becomes sum_tj x_gtj / p_kt <= n_g, and the
  capacity rows hold in every run, so in expectation. One run's ratio can exceed it
  by sampling noise through targets with 0 < p < 1 (of order sqrt(p (1 - p) / n)).

Where it is loose: the work is a fluid, so within one window bursts are averaged out
and service is divisible; near capacity, windows longer than the deadlines let it
count queries that bursts make late in any schedule (smaller windows are tighter and
slower); a query may use its arrival window from the window's start; batches are
credited at their best per-query cost whether or not enough queries of one variant
are waiting; the interference a query can bear is read from its deadline and the least
RTT of its app, not from the work its worker is actually sharing at the time; the RTT
rules targets out but does not shorten the time left for the work.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from scipy.optimize import linprog

from apdispatch.common.manifest import Manifest
from apdispatch.scenario import App, Scenario
from apdispatch.sim.profile import LatencyProfile

RttMode = Literal["expected", "certain"]

# Targets whose chance to meet an SLA is below this are left out of the LP (their
# coefficient 1/p would hurt its conditioning); what they could add, p * n, is added
# to the bound instead.
P_MIN = 1e-6
# Slack on comparisons of times and accuracies: errs towards usable, so towards a
# larger bound.
_EPS = 1e-9

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class VariantCost:
    """What the bound needs to know of a variant."""

    name: str
    task: str
    accuracy: float
    latency_ms: float  # batch of 1, alone, on a speed-1.0 device
    latency_ms_batch8: float | None = None  # None: a batch of 8 costs what 1 does (the most generous)
    overhead_ms: float = 0.0  # fixed cost per execution, not scaled by the device's speed


def variant_costs(
    scenario: Scenario, manifest: Manifest | None = None, latencies: LatencyProfile | None = None
) -> dict[str, VariantCost]:
    """The scenario's ``[variants]`` over the manifest's. The manifest's latencies are taken as
    given unless ``latencies`` is a profile; the simulator's are ``reference_profile()``'s."""
    table: dict[str, VariantCost] = {}
    if manifest is not None:
        if latencies is not None:
            manifest = latencies.apply(manifest)
        for v in manifest.variants:
            table[v.name] = VariantCost(v.name, v.task, v.accuracy, v.latency_ms_batch1, v.latency_ms_batch8)
    for name, s in scenario.variants.items():
        table[name] = VariantCost(name, s.task, s.accuracy, s.latency_ms, s.latency_ms_batch8)
    return table


@dataclass(frozen=True, slots=True)
class PoolTarget:
    """A variant on a pool of identical workers (one worker group of one cluster).

    One execution of a batch of b takes ``s(b) = max(0, s1 - overhead + slope (b - 1))
    + overhead`` ms alone, 1 <= b <= max_batch. With n executions running on a worker
    (n <= slots), each progresses at ``1 / (1 + interference (n - 1))``.
    """

    pool: int
    cluster: int
    variant: str
    s1: float
    slope: float
    overhead: float
    max_batch: int
    slots: int = 1
    interference: float = 0.0
    workers: int = 1  # in the pool

    def service_ms(self, b: int) -> float:
        return max(0.0, self.s1 - self.overhead + self.slope * (b - 1)) + self.overhead

    @property
    def latency_ms(self) -> float:
        """Least service time of one query (no queueing, no interference)."""
        return min(self.service_ms(1), self.service_ms(self.max_batch))

    def share(self, slowdown: float) -> float:
        """Least worker time per ms of solo work, for an execution that may take ``slowdown`` times
        its solo time.

        At n executions at once, a ms of solo work takes ``d_n = 1 + interference (n - 1)`` ms
        and ``d_n / n`` of the worker's time. An execution may change n as others start and
        end: the least it can spend is the lower convex envelope of the points (d_n, d_n / n)
        at its slowdown, a mix of two levels at most (a linear program with two rows).
        """
        points = [(1.0 + self.interference * (n - 1), (1.0 + self.interference * (n - 1)) / n)
                  for n in range(1, self.slots + 1)]  # fmt: skip
        best = min((c for d, c in points if d <= slowdown + _EPS), default=math.inf)
        for d_fast, c_fast in points:
            for d_slow, c_slow in points:
                if d_fast <= slowdown < d_slow and c_slow < c_fast:
                    mix = (slowdown - d_fast) / (d_slow - d_fast)
                    best = min(best, c_fast + mix * (c_slow - c_fast))
        return best

    def work_ms(self, budget_ms: float = math.inf) -> float:
        """Least worker time one query takes, over the batch sizes and the concurrency at which
        its execution fits in ``budget_ms``: ``s(b) / b * share(budget / s(b))``. inf when
        nothing fits."""
        best = math.inf
        for b in range(1, self.max_batch + 1):
            solo = self.service_ms(b)
            if solo > budget_ms + _EPS:
                continue
            slowdown = budget_ms / solo if solo > 0 else math.inf
            best = min(best, solo / b * self.share(slowdown))
        return best


@dataclass(frozen=True, slots=True)
class AppBound:
    queries: int
    usable: float  # queries with a usable target (expected mode: sum of the best p): a bound alone
    allocated: float  # ok queries in one optimal LP solution (not a per-app bound: optima may trade apps)


@dataclass(frozen=True, slots=True)
class BoundResult:
    success_ratio: float  # upper bound on ok / all (1.0 when there are no queries)
    ok_bound: float  # upper bound on the number of ok queries
    total: int
    kind: str  # "pathwise" (realized or certain RTTs) or "expectation" (expected)
    rtt: str  # "realized", "certain" or "expected"
    status: int  # linprog's status: 0 = optimal; otherwise the bound is the usable count
    message: str
    lp_value: float  # the LP's primal optimum (+ the left-out small-p terms)
    window_s: float
    t0_s: float  # start of window 0
    per_app: dict[str, AppBound] = field(default_factory=dict)
    window_queries: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    window_ok: FloatArray = field(default_factory=lambda: np.zeros(0))  # LP allocation per arrival window
    n_variables: int = 0
    n_constraints: int = 0
    build_s: float = 0.0
    solve_s: float = 0.0


def _targets(
    scenario: Scenario, variants: Mapping[str, VariantCost], use_interference: bool
) -> tuple[list[PoolTarget], list[float]]:
    """Targets, and the worker time (worker-ms per ms: its worker count) each pool has."""
    targets: list[PoolTarget] = []
    capacities: list[float] = []
    for ci, cluster in enumerate(scenario.clusters):
        for group in cluster.workers:
            if group.count <= 0:
                continue
            dev = scenario.devices[group.device]
            interference = dev.interference if use_interference else 0.0
            for n in range(1, dev.slots + 1):
                if 1.0 + interference * (n - 1) <= 0:
                    raise ValueError(f"device {dev.name}: interference {dev.interference} makes rates <= 0")
            pool = len(capacities)
            capacities.append(float(group.count))
            big_b = max(1, dev.max_batch_size)
            for name in group.variants:
                if name not in variants:
                    raise KeyError(
                        f"variant {name!r} of cluster {cluster.name!r} is not in the variant table"
                    )
                v = variants[name]
                t1 = v.latency_ms / dev.speed
                t8 = (v.latency_ms if v.latency_ms_batch8 is None else v.latency_ms_batch8) / dev.speed
                overhead = max(0.0, v.overhead_ms)
                targets.append(
                    PoolTarget(
                        pool,
                        ci,
                        name,
                        t1 + overhead,
                        (t8 - t1) / 7.0,
                        overhead,
                        big_b,
                        dev.slots,
                        interference,
                        group.count,
                    )
                )
    return targets, capacities


def _rtt_cdf(rtt_ms: float, jitter_ms: float, x_ms: float) -> float:
    """P(max(0, rtt + N(0, jitter)) <= x)."""
    if x_ms < 0:
        return 0.0
    if jitter_ms <= 0:
        return 1.0 if rtt_ms <= x_ms + _EPS else 0.0
    return 0.5 * math.erfc(-(x_ms + _EPS - rtt_ms) / (jitter_ms * math.sqrt(2.0)))


@dataclass
class _Groups:
    app: list[IntArray] = field(default_factory=list)
    window: list[IntArray] = field(default_factory=list)
    count: list[FloatArray] = field(default_factory=list)
    target: list[IntArray] = field(default_factory=list)  # per (group, usable target) pair
    pair_group: list[IntArray] = field(default_factory=list)
    pair_p: list[FloatArray] = field(default_factory=list)
    pair_work: list[FloatArray] = field(default_factory=list)
    n: int = 0

    def add(
        self,
        app: int,
        window: IntArray,
        count: FloatArray,
        tids: Sequence[int],
        p: FloatArray,
        work: FloatArray,
    ) -> None:
        """Groups of one app: ``p`` is (groups x len(tids)), the chance each target can serve
        each; ``work`` the least slot-time of one of the app's queries on each target."""
        g = np.arange(self.n, self.n + len(window), dtype=np.int64)
        self.app.append(np.full(len(window), app, dtype=np.int64))
        self.window.append(window.astype(np.int64))
        self.count.append(count.astype(np.float64))
        if len(tids):
            rows, cols = np.nonzero(p > 0)
            self.pair_group.append(g[rows])
            self.target.append(np.asarray(tids, dtype=np.int64)[cols])
            self.pair_p.append(p[rows, cols].astype(np.float64))
            self.pair_work.append(work[cols].astype(np.float64))
        self.n += len(window)


def _work(
    app: App, tids: Sequence[int], targets: Sequence[PoolTarget], least_rtt_ms: FloatArray
) -> FloatArray:
    """Least slot-time of one of ``app``'s queries on each target: only batches that leave it
    time for the least RTT it can have are counted."""
    out = np.zeros(len(tids))
    for j, i in enumerate(tids):
        w = targets[i].work_ms(app.deadline_ms - float(least_rtt_ms[j]))
        out[j] = w if math.isfinite(w) else targets[i].work_ms()
    return out


def _ints(parts: Sequence[IntArray]) -> IntArray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _floats(parts: Sequence[FloatArray]) -> FloatArray:
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


def schedulable(times_ms: FloatArray, work_ms: float, within_ms: float) -> int:
    """The most of these queries one machine can run, each taking ``work_ms`` without a break,
    each whole inside [its arrival, its arrival + ``within_ms``].

    The windows are all as long and the work all the same, so taking each query in order of
    arrival if it still fits, as early as it can start, is optimal: of any schedule's first
    m queries, this one's first m end no later.
    """
    count = 0
    free = -math.inf
    for t in np.sort(times_ms).tolist():
        end = max(free, t) + work_ms
        if end <= t + within_ms + _EPS:
            free = end
            count += 1
    return count


def _queue_cuts(
    scenario: Scenario,
    app_index: int,
    times_ms: FloatArray,
    tids: Sequence[int],
    targets: Sequence[PoolTarget],
    least_rtt_ms: FloatArray,
) -> list[tuple[int, int, float]]:
    """(app, pool, most of the app's queries the pool can serve in time were it serving nothing
    else), for the pools where that is fewer than the app's queries.

    A pool (no batching) of n workers gives its executions at most n ms of worker time per
    ms, however they share it, and an ok query of the app holds at least c of it inside
    [arrival, arrival + deadline - RTT]: c = min over the pool's targets of ``work_ms`` at the
    deadline less the target's least RTT (step 3 of the module doc: slots shared, at the
    slowdown the deadline allows). So the pool's ok queries are feasible for one machine n
    times as fast that runs jobs of c in those windows, preempting at will. The windows are
    all as long, so the earliest deadline first is the order of arrival, and never preempts:
    ``schedulable`` counts the most such a machine serves. Without interference, c is the
    solo work over the slots.
    """
    app = scenario.apps[app_index]
    by_pool: dict[int, tuple[float, float, int]] = {}  # pool -> (least worker time, least RTT, workers)
    for j, i in enumerate(tids):
        tg = targets[i]
        if tg.max_batch > 1 or tg.interference < 0:
            continue
        work, rtt, _ = by_pool.get(tg.pool, (math.inf, math.inf, 0))
        least = float(least_rtt_ms[j])
        by_pool[tg.pool] = (
            min(work, tg.work_ms(app.deadline_ms - least)),
            min(rtt, least),
            tg.workers,
        )
    cuts = []
    for pool, (work, rtt, workers) in by_pool.items():
        most = schedulable(times_ms, work / workers, app.deadline_ms - rtt)
        if most < len(times_ms):
            cuts.append((app_index, pool, float(most)))
    return cuts


@dataclass(frozen=True, slots=True)
class _Solution:
    ok: float  # certified bound on the LP's optimum
    lp_value: float
    x: FloatArray | None
    var_pair: IntArray  # variable -> its (group, target) pair
    status: int
    message: str
    n_variables: int
    n_constraints: int
    build_s: float
    solve_s: float


def _solve(
    g_app: IntArray,
    g_win: IntArray,
    g_cnt: FloatArray,
    pr_g: IntArray,
    pr_t: IntArray,
    pr_p: FloatArray,
    pr_work: FloatArray,
    span: IntArray,
    targets: Sequence[PoolTarget],
    pool_capacity: Sequence[float],
    window_s: float,
    cuts: Sequence[tuple[int, int, float]] = (),
) -> _Solution:
    """max sum x: demand rows sum_tj x_gtj / p_gt <= n_g; capacity rows sum c_t x_gtj <= workers x L."""
    started = time.perf_counter()
    # Variables: (group, target) pairs, each spread over the windows its work may use.
    pr_span = span[g_app[pr_g]] + 1
    n_var = int(pr_span.sum())
    var_pair = np.repeat(np.arange(len(pr_g), dtype=np.int64), pr_span)
    starts = np.cumsum(pr_span) - pr_span
    var_win = g_win[pr_g][var_pair] + (np.arange(n_var) - starts[var_pair])
    n_windows = int(var_win.max()) + 1
    t_pool = np.array([tg.pool for tg in targets], dtype=np.int64)
    n_groups = len(g_cnt)
    var_t = pr_t[var_pair]
    rows = np.concatenate([pr_g[var_pair], n_groups + t_pool[var_t] * n_windows + var_win])
    cols = np.concatenate([np.arange(n_var), np.arange(n_var)])
    vals = np.concatenate([1.0 / pr_p[var_pair], pr_work[var_pair]])
    n_rows = n_groups + len(pool_capacity) * n_windows
    # Queue rows: an app's ok queries on a pool, at most what the pool could serve of them alone.
    var_app = g_app[pr_g[var_pair]]
    var_pool = t_pool[var_t]
    cut_rows, cut_cols = [], []
    for c, (app, pool, _) in enumerate(cuts):
        mine = np.flatnonzero((var_app == app) & (var_pool == pool))
        cut_rows.append(np.full(len(mine), n_rows + c, dtype=np.int64))
        cut_cols.append(mine)
    if cuts:
        rows = np.concatenate([rows, *cut_rows])
        cols = np.concatenate([cols, *cut_cols])
        vals = np.concatenate([vals, np.ones(sum(len(c) for c in cut_cols))])
    n_rows += len(cuts)
    a_ub = sp.csr_matrix((vals, (rows, cols)), shape=(n_rows, n_var))
    b_ub = np.concatenate(
        [
            g_cnt,
            np.repeat(np.asarray(pool_capacity) * window_s * 1000.0, n_windows),
            np.array([most for _, _, most in cuts], dtype=np.float64),
        ]
    )
    built = time.perf_counter()
    res = linprog(-np.ones(n_var), A_ub=a_ub, b_ub=b_ub, bounds=(0, None), method="highs")
    solved = time.perf_counter()
    if res.status != 0 or res.x is None:
        return _Solution(
            math.inf,
            math.nan,
            None,
            var_pair,
            int(res.status),
            f"LP not solved: {res.message}",
            n_var,
            n_rows,
            built - started,
            solved - built,
        )
    # Weak duality: for any y >= 0, every feasible x has
    #   sum x <= b.y + sum_v max(0, 1 - (A^T y)_v) ub_v,  ub_v = p n_g >= x_v (its demand row);
    # with the solver's duals the last term is ~0, and no solver tolerance enters the bound.
    y = np.maximum(0.0, -np.asarray(res.ineqlin.marginals, dtype=np.float64))
    deficit = np.maximum(0.0, 1.0 - a_ub.T @ y)
    ub = pr_p[var_pair] * g_cnt[pr_g[var_pair]]
    return _Solution(
        float(b_ub @ y + deficit @ ub),
        float(-res.fun),
        np.asarray(res.x, dtype=np.float64),
        var_pair,
        0,
        str(res.message),
        n_var,
        n_rows,
        built - started,
        solved - built,
    )


def upper_bound(
    scenario: Scenario,
    arrivals: Mapping[str, Sequence[float] | npt.NDArray[np.floating]],
    variants: Mapping[str, VariantCost] | Manifest | None = None,
    *,
    window_s: float = 0.1,
    rtt: RttMode = "expected",
    rtt_ms: Mapping[str, npt.ArrayLike] | None = None,
    use_interference: bool = True,
) -> BoundResult:
    """An upper bound on the success ratio of any policy on these arrivals (see the module doc).

    ``arrivals``: app name -> arrival times at the AP (seconds, the simulator's clock);
    apps left out have none. ``variants``: the variant table (``variant_costs``), or a
    manifest to read it from with the scenario's overrides, or None for the scenario's
    ``[variants]`` alone. ``rtt_ms``: app name -> array (queries x clusters, clusters in
    scenario order, rows in the order of ``arrivals[app]``): the RTT each query would pay
    at each cluster; when given, ``rtt`` is ignored and the bound is pathwise.
    ``use_interference``: False bounds with every slot at full speed.
    """
    started = time.perf_counter()
    if window_s <= 0:
        raise ValueError("window_s must be > 0")
    if variants is None or isinstance(variants, Manifest):
        variants = variant_costs(scenario, variants)
    apps = {a.name: i for i, a in enumerate(scenario.apps)}
    unknown = sorted(set(arrivals) - set(apps))
    if unknown:
        raise KeyError(f"arrivals of unknown apps: {', '.join(unknown)}")
    if rtt_ms is not None:
        unknown = sorted(set(rtt_ms) - set(apps))
        if unknown:
            raise KeyError(f"rtt_ms of unknown apps: {', '.join(unknown)}")
    mode = "realized" if rtt_ms is not None else rtt
    if mode not in ("realized", "certain", "expected"):
        raise ValueError(f"rtt must be 'expected' or 'certain', not {rtt!r}")

    targets, pool_capacity = _targets(scenario, variants, use_interference)
    times = {
        a.name: np.asarray(arrivals.get(a.name, ()), dtype=np.float64).reshape(-1) for a in scenario.apps
    }
    total = int(sum(len(t) for t in times.values()))
    nonempty = [t for t in times.values() if len(t)]
    t0 = min(0.0, float(min(t.min() for t in nonempty))) if nonempty else 0.0
    n_clusters = len(scenario.clusters)

    groups = _Groups()
    cuts: list[tuple[int, int, float]] = []
    span = np.zeros(len(scenario.apps), dtype=np.int64)  # windows after the arrival's that work may use
    usable = np.zeros(len(scenario.apps))
    small_p = 0.0  # what targets with p < P_MIN could add (expected mode)
    for app in scenario.apps:
        k = apps[app.name]
        t = times[app.name]
        # (window indices and spans are exact up to float rounding at window edges)
        span[k] = math.ceil(app.deadline_ms / (1000.0 * window_s) - _EPS)
        tids = [
            i
            for i, tg in enumerate(targets)
            if variants[tg.variant].task == app.task
            and variants[tg.variant].accuracy >= app.min_accuracy - _EPS
            and tg.latency_ms <= app.deadline_ms + _EPS
        ]
        if len(t) == 0:
            continue
        win = np.floor((t - t0) / window_s).astype(np.int64)
        if mode == "realized":
            assert rtt_ms is not None
            r = np.asarray(rtt_ms.get(app.name, np.zeros((0, n_clusters))), dtype=np.float64)
            if r.shape != (len(t), n_clusters):
                raise ValueError(f"rtt_ms[{app.name!r}]: shape {r.shape}, expected {(len(t), n_clusters)}")
            lat = np.array([targets[i].latency_ms for i in tids])
            cl = np.array([targets[i].cluster for i in tids], dtype=np.int64)
            ok = r[:, cl] + lat[None, :] <= app.deadline_ms + _EPS  # queries x tids
            keys, counts = np.unique(np.column_stack([win, ok.astype(np.int64)]), axis=0, return_counts=True)
            p = keys[:, 1:].astype(np.float64)
            least = r[:, cl].min(axis=0, initial=math.inf)  # no query of the app has a shorter RTT
            groups.add(k, keys[:, 0], counts.astype(np.float64), tids, p, _work(app, tids, targets, least))
            usable[k] = float(counts[p.max(axis=1, initial=0.0) > 0].sum())
            cuts += _queue_cuts(scenario, k, t * 1000.0, tids, targets, least)
            continue
        p_app = np.zeros(len(tids))
        least_rtt = np.zeros(len(tids))
        for j, i in enumerate(tids):
            c = scenario.clusters[targets[i].cluster]
            slack = app.deadline_ms - targets[i].latency_ms
            least_rtt[j] = max(0.0, c.rtt_ms) if c.jitter_ms <= 0 else 0.0
            if mode == "certain":
                p_app[j] = 1.0 if least_rtt[j] <= slack + _EPS else 0.0
            else:
                p_app[j] = _rtt_cdf(c.rtt_ms, c.jitter_ms, slack)
        win_u, counts = np.unique(win, return_counts=True)
        tiny = (p_app > 0) & (p_app < P_MIN)
        small_p += float(p_app[tiny].sum()) * len(t)
        p_lp = np.where(tiny, 0.0, p_app)
        work = _work(app, tids, targets, least_rtt)
        groups.add(k, win_u, counts.astype(np.float64), tids, np.tile(p_lp, (len(win_u), 1)), work)
        usable[k] = len(t) * float(min(1.0, p_app.max(initial=0.0)))
        cuts += _queue_cuts(scenario, k, t * 1000.0, tids, targets, least_rtt)

    g_app = _ints(groups.app)
    g_win = _ints(groups.window)
    g_cnt = _floats(groups.count)
    pr_g = _ints(groups.pair_group)
    pr_t = _ints(groups.target)
    pr_p = _floats(groups.pair_p)
    pr_work = _floats(groups.pair_work)

    n_arrival_windows = int(g_win.max()) + 1 if len(g_win) else 0
    window_queries = np.zeros(n_arrival_windows, dtype=np.int64)
    np.add.at(window_queries, g_win, g_cnt.astype(np.int64))
    trivial = float(usable.sum()) + small_p
    build_s = time.perf_counter() - started

    if len(pr_g):
        sol = _solve(
            g_app, g_win, g_cnt, pr_g, pr_t, pr_p, pr_work, span, targets, pool_capacity, window_s, cuts
        )
        build_s += sol.build_s
    else:
        sol = _Solution(0.0, 0.0, None, np.zeros(0, dtype=np.int64), 0, "no usable target", 0, 0, 0.0, 0.0)
    ok = min(sol.ok + small_p, trivial, float(total))

    window_ok = np.zeros(n_arrival_windows)
    alloc = np.zeros(len(scenario.apps))
    if sol.x is not None and len(sol.x):
        per_pair = np.bincount(sol.var_pair, weights=sol.x, minlength=len(pr_g))
        np.add.at(window_ok, g_win[pr_g], per_pair)
        np.add.at(alloc, g_app[pr_g], per_pair)
    per_app = {
        a.name: AppBound(queries=len(times[a.name]), usable=float(usable[i]), allocated=float(alloc[i]))
        for i, a in enumerate(scenario.apps)
    }
    return BoundResult(
        success_ratio=min(1.0, ok / total) if total else 1.0,
        ok_bound=ok,
        total=total,
        kind="expectation" if mode == "expected" else "pathwise",
        rtt=mode,
        status=sol.status,
        message=sol.message if sol.status == 0 else f"{sol.message}; bound = usable queries",
        lp_value=sol.lp_value + small_p,
        window_s=window_s,
        t0_s=t0,
        per_app=per_app,
        window_queries=window_queries,
        window_ok=window_ok,
        n_variables=sol.n_variables,
        n_constraints=sol.n_constraints,
        build_s=build_s,
        solve_s=sol.solve_s,
    )
