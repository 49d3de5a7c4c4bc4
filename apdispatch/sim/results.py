"""Running a scenario once per policy, and what comes out: counts, ratios, JSON, a table.

Every policy runs on a fresh :class:`~apdispatch.sim.engine.Simulation` (fresh
registry, estimator and policy) over the same arrival plan and the same jitter
draws, so differences between policies are the policies' doing.

The JSON document::

    {"scenario": NAME, "seed": N, "duration_s": D, "window_s": W, "queries": Q,
     "latencies": PROFILE, "upper_bound": {"success_ratio": X, "rtt": MODE} | null,
     "policies": {NAME: {"total", "ok", "late", "inaccurate", "rejected", "failed",
                         "success_ratio", "violation_ratio", "rejection_ratio", "energy_j",
                         "latency_ms": {"p50", "p99"}, "dispatched": {CLUSTER: n},
                         "timeline": {"window_s", "ok": [...], "late": [...], ...},
                         "apps": {APP: {counts and ratios, "timeline": {...}}}}}}

Timelines count queries by the window they *arrived* in, so each window's
counts add up to its arrivals.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from apdispatch.policies import Policy, make_policy
from apdispatch.routing.cascade import CascadeConfig
from apdispatch.routing.estimator import DEFAULT_QUEUE_MODEL, LatencyEstimator
from apdispatch.sim.arrivals import Queries, plan_arrivals
from apdispatch.sim.engine import OUTCOMES, Simulation
from apdispatch.sim.model import SimModel

DEFAULT_WINDOW_S = 10.0

# What the upper bound knows of each query's round trip (``apdispatch.sim.bound``):
# "expected", the chance that the draw is short enough, bounds every dispatcher that
# learns a round trip only by sending the query (the AP's policies all do); "realized",
# the draw itself, bounds even one that knew it in advance (higher where a distant
# cluster is in time for some draws only).
BoundRtt = Literal["expected", "realized"]
BOUND_RTTS: tuple[BoundRtt, ...] = ("expected", "realized")
DEFAULT_BOUND_RTT: BoundRtt = "expected"


@dataclass(frozen=True, slots=True)
class PolicyResult:
    policy: str
    table: np.ndarray  # (apps, windows, outcomes) counts by arrival window
    energy_j: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    dispatched: dict[str, int]  # queries sent per cluster

    @property
    def counts(self) -> dict[str, int]:
        totals = self.table.sum(axis=(0, 1))
        return {name: int(totals[i]) for i, name in enumerate(OUTCOMES)}

    @property
    def total(self) -> int:
        return int(self.table.sum())

    def timeline(self) -> np.ndarray:
        """Counts per window and outcome, all apps together: (windows, outcomes)."""
        return self.table.sum(axis=0)


@dataclass(frozen=True, slots=True)
class SimReport:
    scenario: str
    seed: int
    duration_s: float
    window_s: float
    app_names: tuple[str, ...]
    arrivals_per_window: np.ndarray  # (windows, apps), the same for every policy
    results: dict[str, PolicyResult] = field(default_factory=dict)
    upper_bound: float | None = None
    latencies: str | None = None  # the latency profile of the zoo's variants (apdispatch.sim.profile)
    bound_rtt: BoundRtt = DEFAULT_BOUND_RTT  # what the upper bound knew of the round trips

    @property
    def queries(self) -> int:
        return int(self.arrivals_per_window.sum())


def ratios(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    if total == 0:
        return {"success_ratio": 0.0, "violation_ratio": 0.0, "rejection_ratio": 0.0}
    return {
        "success_ratio": counts["ok"] / total,
        "violation_ratio": (counts["late"] + counts["inaccurate"]) / total,
        "rejection_ratio": counts["rejected"] / total,
    }


def simulate(
    model: SimModel,
    policy: Policy,
    arrivals: Queries,
    *,
    window_s: float = DEFAULT_WINDOW_S,
    queue_model: str = DEFAULT_QUEUE_MODEL,
    cascade: bool = False,
) -> PolicyResult:
    """One run of ``model`` under ``policy`` (a fresh policy object: it keeps state).

    ``queue_model`` is the latency estimator's (``apdispatch.routing.estimator.QUEUE_MODELS``);
    ``cascade``: the router offers cascades (``apdispatch.routing.cascade``).
    """
    estimator = LatencyEstimator(queue_model=queue_model)
    config = CascadeConfig(enabled=cascade)
    sim = Simulation(model, policy, arrivals, window_s=window_s, estimator=estimator, cascade=config)
    sim.finish()
    return result_of(sim, policy.name)


def result_of(sim: Simulation, name: str) -> PolicyResult:
    lat50: float | None = None
    lat99: float | None = None
    if sim.latencies:
        p50, p99 = np.percentile(np.frombuffer(sim.latencies, dtype=np.float64), [50, 99])
        lat50, lat99 = float(p50), float(p99)
    return PolicyResult(
        policy=name,
        table=sim.table(),
        energy_j=sim.energy_j(),
        latency_p50_ms=lat50,
        latency_p99_ms=lat99,
        dispatched=sim.dispatched_by_cluster(),
    )


def run_policies(
    model: SimModel,
    policies: Sequence[str],
    *,
    seed: int | None = None,
    window_s: float = DEFAULT_WINDOW_S,
    make: Callable[[str, int], Policy] | None = None,
    progress: Callable[[str, PolicyResult], None] | None = None,
    bound: bool = True,
    bound_rtt: BoundRtt = DEFAULT_BOUND_RTT,
    queue_model: str = DEFAULT_QUEUE_MODEL,
    cascade: bool = False,
) -> SimReport:
    """Each policy on the same arrivals (``seed``, default the scenario's), plus the upper bound.

    Policies come from ``make(name, seed)``; by default ``make_policy`` with
    learned policies learning inline (no background thread), so that a run
    is reproducible.
    """
    scenario = model.scenario
    seed = scenario.seed if seed is None else seed
    arrivals = plan_arrivals(scenario, seed)
    per_window = arrivals.per_window(window_s, len(scenario.apps))
    report = SimReport(
        scenario=scenario.name,
        seed=seed,
        duration_s=scenario.duration_s,
        window_s=window_s,
        app_names=tuple(a.name for a in scenario.apps),
        arrivals_per_window=per_window,
        upper_bound=upper_bound_hook(model, arrivals, bound_rtt) if bound else None,
        latencies=model.latencies,
        bound_rtt=bound_rtt,
    )
    for name in policies:
        policy = make(name, seed) if make is not None else make_policy(name, seed, background=False)
        try:
            result = simulate(
                model, policy, arrivals, window_s=window_s, queue_model=queue_model, cascade=cascade
            )
        finally:
            policy.close()  # learned policies stop their learner threads
        report.results[name] = result
        if progress is not None:
            progress(name, result)
    return report


# -- the upper bound ------------------------------------------------------------------


def upper_bound_hook(model: SimModel, arrivals: Queries, rtt: BoundRtt = DEFAULT_BOUND_RTT) -> float | None:
    """The best success ratio any dispatcher could reach on these arrivals, or None.

    Computed by ``apdispatch.sim.bound.upper_bound`` from the realized arrivals of the run,
    each app's arrival times, and the round trips as ``rtt`` says:

    - ``"expected"``: each cluster's round-trip distribution (``rtt_ms``, ``jitter_ms``). The
      simulator draws a query's round trip independently of everything a policy sees before
      it sends the query, so a query sent to a target is ok with at most the chance that the
      draw leaves room for the target's work: a bound on the expected ok count for every
      policy here.
    - ``"realized"``: the round trip each query would pay at each cluster in this run (the
      draws the simulator uses, whichever cluster a policy picks): a bound that holds run by
      run, even for a dispatcher that knew the draws in advance.

    Variant costs are the model's calibrated ones, without the calibration's fixed overhead
    (leaving it out can only raise the bound).
    """
    if importlib.util.find_spec("apdispatch.sim.bound") is None:
        return None
    bound: Any = importlib.import_module("apdispatch.sim.bound")
    scenario = model.scenario
    if rtt not in BOUND_RTTS:
        raise ValueError(f"bound rtt must be one of {', '.join(BOUND_RTTS)}, not {rtt!r}")
    times_s = arrivals.times_ms / 1000.0
    per_app_times = {app.name: times_s[arrivals.apps == a] for a, app in enumerate(scenario.apps)}
    per_app_rtt = None
    if rtt == "realized":
        rtt_ms = np.array([c.rtt_ms for c in scenario.clusters], dtype=np.float64)
        jitter = np.array([c.jitter_ms for c in scenario.clusters], dtype=np.float64)
        per_app_rtt = {
            app.name: np.maximum(
                0.0, rtt_ms[None, :] + jitter[None, :] * arrivals.jitter_z[arrivals.apps == a][:, None]
            )
            for a, app in enumerate(scenario.apps)
        }
    costs = {
        v.name: bound.VariantCost(v.name, v.task, v.accuracy, v.latency_ms, v.latency_ms_batch8)
        for v in model.variants.values()
    }
    # Given rtt_ms (the realized draws), upper_bound ignores rtt.
    value = bound.upper_bound(scenario, per_app_times, costs, rtt="expected", rtt_ms=per_app_rtt)
    return float(value.success_ratio)


# -- JSON and the table -----------------------------------------------------------------


def _timeline_json(table: np.ndarray, window_s: float) -> dict[str, Any]:
    doc: dict[str, Any] = {"window_s": window_s}
    for i, name in enumerate(OUTCOMES):
        doc[name] = [int(v) for v in table[:, i]]
    return doc


def _counts_json(counts: dict[str, int]) -> dict[str, Any]:
    doc: dict[str, Any] = {"total": sum(counts.values()), **counts}
    doc.update({k: round(v, 6) for k, v in ratios(counts).items()})
    return doc


def to_json(report: SimReport) -> dict[str, Any]:
    policies: dict[str, Any] = {}
    for name, result in report.results.items():
        doc = _counts_json(result.counts)
        doc["energy_j"] = round(result.energy_j, 3)
        doc["latency_ms"] = {
            "p50": None if result.latency_p50_ms is None else round(result.latency_p50_ms, 3),
            "p99": None if result.latency_p99_ms is None else round(result.latency_p99_ms, 3),
        }
        doc["dispatched"] = result.dispatched
        doc["timeline"] = _timeline_json(result.timeline(), report.window_s)
        apps = {}
        for a, app in enumerate(report.app_names):
            table = result.table[a]
            totals = table.sum(axis=0)
            app_doc = _counts_json({n: int(totals[i]) for i, n in enumerate(OUTCOMES)})
            app_doc["timeline"] = _timeline_json(table, report.window_s)
            apps[app] = app_doc
        doc["apps"] = apps
        policies[name] = doc
    return {
        "scenario": report.scenario,
        "seed": report.seed,
        "duration_s": report.duration_s,
        "window_s": report.window_s,
        "queries": report.queries,
        "latencies": report.latencies,
        "upper_bound": (
            None
            if report.upper_bound is None
            else {"success_ratio": report.upper_bound, "rtt": report.bound_rtt}
        ),
        "policies": policies,
    }


def text_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return " | ".join([first, *rest])

    rule = "-+-".join("-" * w for w in widths)
    return [line(header), rule, *(line(b) for b in body)]


def format_table(report: SimReport) -> str:
    header = ["policy", "total", *OUTCOMES, "success %", "violations %", "rejected %", "energy kJ", "p50 ms"]
    body = []
    for name, result in report.results.items():
        counts = result.counts
        r = ratios(counts)
        body.append(
            [
                name,
                str(result.total),
                *(str(counts[k]) for k in OUTCOMES),
                f"{100 * r['success_ratio']:.1f}",
                f"{100 * r['violation_ratio']:.1f}",
                f"{100 * r['rejection_ratio']:.1f}",
                f"{result.energy_j / 1000:.1f}",
                "-" if result.latency_p50_ms is None else f"{result.latency_p50_ms:.1f}",
            ]
        )
    lines = text_table(header, body)
    if report.upper_bound is not None:
        lines.append(f"upper bound: success {100 * report.upper_bound:.1f} %")
    return "\n".join(lines)


__all__ = [
    "BOUND_RTTS",
    "DEFAULT_BOUND_RTT",
    "DEFAULT_WINDOW_S",
    "BoundRtt",
    "PolicyResult",
    "SimReport",
    "format_table",
    "ratios",
    "result_of",
    "run_policies",
    "simulate",
    "to_json",
    "upper_bound_hook",
]
