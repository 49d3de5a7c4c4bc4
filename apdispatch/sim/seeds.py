"""One scenario over several seeds: means, 95% confidence intervals, paired gaps.

A seed draws new arrivals (streams, their apps and lengths, every query's
time), new jitter and new policy randomness. Every policy runs on every seed
(:func:`apdispatch.sim.results.run_policies`), so comparisons between two
policies are *paired*: the gap between ``learned`` and the best static policy
is computed seed by seed, and its interval comes from those per-seed gaps,
which is much tighter than comparing two independent intervals.

Intervals are Student-t 95% intervals of the mean over seeds (``n - 1``
degrees of freedom); with one seed there is none.

Seeds run in parallel processes (``jobs``); each rebuilds the scenario's model
from the arguments, and a run's result does not depend on which process ran
it or in which order.

The JSON document keeps the single-seed schema at the top (``scenario``,
``upper_bound.success_ratio``, ``policies.NAME.{total, ok, ..., success_ratio,
violation_ratio, rejection_ratio, energy_j}``: counts summed over seeds,
ratios and energy averaged over seeds) and adds ``seeds``, per-seed values
and ``ci95`` half-widths, ``best_static`` and ``gaps`` (each learned policy
minus the best static one, per seed)::

    {"scenario": NAME, "seeds": [..], "duration_s": D, "queries": Q, "latencies": PROFILE,
     "upper_bound": {"success_ratio": X, "ci95": H, "per_seed": [..], "rtt": MODE},
     "best_static": NAME,
     "policies": {NAME: {..., "success_ratio": X, "success_ci95": H,
                         "success_per_seed": [..]}},
     "gaps": {NAME: {"vs": BEST_STATIC, "mean": X, "ci95": H, "per_seed": [..],
                     "wins": N}}}
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from apdispatch.policies import (
    LEARNED_POLICIES,
    STATIC_POLICIES,
    Candidate,
    Feedback,
    Policy,
    RequestView,
    make_policy,
)
from apdispatch.routing.estimator import DEFAULT_QUEUE_MODEL
from apdispatch.sim.engine import OUTCOMES
from apdispatch.sim.results import (
    DEFAULT_BOUND_RTT,
    DEFAULT_WINDOW_S,
    BoundRtt,
    SimReport,
    ratios,
    run_policies,
)

if TYPE_CHECKING:
    from apdispatch.learned.policy import ActorCriticPolicy


def parse_seeds(text: str, default: int) -> list[int]:
    """``5`` (five seeds from ``default``), ``7,8,9`` or ``7-11``."""
    text = text.strip()
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        elif "-" in text.lstrip("-"):
            first, last = (int(s) for s in text.split("-", 1))
            seeds = list(range(first, last + 1))
        else:
            n = int(text)
            if n < 1:
                raise ValueError
            seeds = list(range(default, default + n))
    except ValueError:
        raise ValueError(f"--seeds: expected N, A-B or A,B,C, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: expected distinct seeds, got {text!r}")
    return seeds


def ci95(values: Sequence[float]) -> float | None:
    """Half-width of the Student-t 95% interval of the mean; None for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    from scipy.stats import t

    sd = float(np.std(np.asarray(values, dtype=np.float64), ddof=1))
    return float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


# ``learned-stopped`` learns this long (s of the run's clock), then nothing more.
STOP_LEARNING_S = 60.0


@dataclass(frozen=True, slots=True)
class RunSpec:
    """What a worker process needs to rebuild and run one seed (picklable, no live objects)."""

    scenario: Path
    duration_s: float | None
    models: Path | None
    calibration: str | None
    policies: tuple[str, ...]
    window_s: float
    bound: bool
    latencies: str | None = None  # --latencies (None: the reference profile)
    guards: tuple[tuple[str, object], ...] = ()  # --guard KEY=VALUE overrides
    queue_model: str = DEFAULT_QUEUE_MODEL  # the latency estimator's (--queue-model)
    cascade: bool = False  # the router offers cascades (--cascade)
    stop_learning_s: float = STOP_LEARNING_S  # when ``learned-stopped`` stops learning (run's clock)
    bound_rtt: BoundRtt = DEFAULT_BOUND_RTT  # what the upper bound knows of round trips (--bound-rtt)


def run_seed(spec: RunSpec, seed: int) -> SimReport:
    # Imported here so that a worker process builds its model from files alone.
    from apdispatch.scenario import load_scenario
    from apdispatch.sim.calibration import parse_calibration
    from apdispatch.sim.model import load_model
    from apdispatch.sim.profile import parse_latencies

    scenario = load_scenario(spec.scenario)
    if spec.duration_s is not None:
        scenario = scenario.scaled(spec.duration_s)
    model = load_model(
        scenario, spec.models, parse_calibration(spec.calibration), parse_latencies(spec.latencies)
    )
    make = guarded_maker(dict(spec.guards), spec.stop_learning_s)
    return run_policies(
        model,
        spec.policies,
        seed=seed,
        window_s=spec.window_s,
        bound=spec.bound,
        bound_rtt=spec.bound_rtt,
        make=make,
        queue_model=spec.queue_model,
        cascade=spec.cascade,
    )


# Policies the simulator builds besides the deployable ones, for the ablations:
# ``learned`` with its network frozen (no online updates; its guards still
# learn), and ``learned`` that stops learning altogether after a warm-up.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "learned-frozen": ("learned", {"learn": False}),
    "learned-stopped": ("learned", {}),
}
STOPS_LEARNING = frozenset({"learned-stopped"})


class StopsLearning(Policy):
    """``policy``, whose online learning (network, margins, reservations) stops at ``at_s`` (run's clock).

    What it learned until then stays in force: a deployment that learned
    through its first minute and was then fixed, on the same run.
    """

    def __init__(self, policy: ActorCriticPolicy, at_s: float) -> None:
        self.policy = policy
        self.name = policy.name
        self.at_s = at_s
        self.stopped = False

    def choose(self, request: RequestView, candidates: Sequence[Candidate]) -> Candidate:
        if not self.stopped and request.now_s >= self.at_s:
            self.policy.stop_learning()
            self.stopped = True
        return self.policy.choose(request, candidates)

    def observe(self, feedback: Feedback) -> None:
        self.policy.observe(feedback)

    def rejected(self, request: RequestView) -> None:
        self.policy.rejected(request)

    def close(self) -> None:
        self.policy.close()


def guarded_maker(
    guards: dict[str, object], stop_learning_s: float = STOP_LEARNING_S
) -> Callable[[str, int], Policy]:
    """``make_policy`` as the simulator calls it (learning inline), with ``--guard`` overrides
    and the ``VARIANTS``."""

    def make(name: str, seed: int) -> Policy:
        base, options = VARIANTS.get(name, (name, {}))
        policy = make_policy(base, seed, background=False, guards=guards, **options)
        if name in STOPS_LEARNING:
            from apdispatch.learned.policy import ActorCriticPolicy

            assert isinstance(policy, ActorCriticPolicy)
            return StopsLearning(policy, stop_learning_s)
        return policy

    return make


def run_seeds(
    spec: RunSpec,
    seeds: Sequence[int],
    *,
    jobs: int = 1,
    progress: Callable[[SimReport], None] | None = None,
) -> list[SimReport]:
    """Every seed, in seed order whatever order they finish in."""
    if jobs <= 1 or len(seeds) == 1:
        reports = []
        for seed in seeds:
            report = run_seed(spec, seed)
            if progress is not None:
                progress(report)
            reports.append(report)
        return reports
    # Spawned, not forked: a fork of a process that runs gRPC or torch
    # threads (the AP, a test session) can deadlock in the child.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(jobs, len(seeds)), mp_context=context) as pool:
        futures = [pool.submit(run_seed, spec, seed) for seed in seeds]
        done: list[SimReport] = []
        for future in futures:
            report = future.result()
            if progress is not None:
                progress(report)
            done.append(report)
    return done


@dataclass(frozen=True, slots=True)
class Summary:
    """One policy over all seeds."""

    policy: str
    success: list[float]  # per seed, ratios
    violation: list[float]
    rejection: list[float]
    energy_j: list[float]
    counts: dict[str, int]  # summed over seeds

    @property
    def mean(self) -> float:
        return float(np.mean(self.success))


def summarize(reports: Sequence[SimReport]) -> dict[str, Summary]:
    names = list(reports[0].results)
    out: dict[str, Summary] = {}
    for name in names:
        results = [r.results[name] for r in reports]
        per = [ratios(res.counts) for res in results]
        counts: dict[str, int] = {k: sum(res.counts[k] for res in results) for k in OUTCOMES}
        out[name] = Summary(
            policy=name,
            success=[p["success_ratio"] for p in per],
            violation=[p["violation_ratio"] for p in per],
            rejection=[p["rejection_ratio"] for p in per],
            energy_j=[res.energy_j for res in results],
            counts=counts,
        )
    return out


def best_static(summaries: dict[str, Summary]) -> str | None:
    """The static policy with the highest mean success (first in the list on a tie)."""
    static = [s for name, s in summaries.items() if name in STATIC_POLICIES]
    if not static:
        return None
    return max(static, key=lambda s: s.mean).policy


@dataclass(frozen=True, slots=True)
class Gap:
    policy: str
    vs: str
    per_seed: list[float]  # success ratio points (x 100), policy minus vs

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_seed))

    @property
    def ci95(self) -> float | None:
        return ci95(self.per_seed)

    @property
    def wins(self) -> int:
        return sum(1 for g in self.per_seed if g > 0)


def gaps(summaries: dict[str, Summary]) -> dict[str, Gap]:
    """Each learned policy against the best static one, seed by seed, in points."""
    best = best_static(summaries)
    if best is None:
        return {}
    ref = summaries[best].success
    return {
        name: Gap(name, best, [100.0 * (a - b) for a, b in zip(s.success, ref, strict=True)])
        for name, s in summaries.items()
        if name in LEARNED_POLICIES
    }


def _round(values: Sequence[float], digits: int = 6) -> list[float]:
    return [round(float(v), digits) for v in values]


def _opt(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def _dispatched(reports: Sequence[SimReport], policy: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reports:
        for cluster, n in r.results[policy].dispatched.items():
            out[cluster] = out.get(cluster, 0) + n
    return out


def to_json(reports: Sequence[SimReport]) -> dict[str, Any]:
    first = reports[0]
    summaries = summarize(reports)
    policies: dict[str, Any] = {}
    for name, s in summaries.items():
        total = sum(s.counts.values())
        policies[name] = {
            "total": total,
            **s.counts,
            "success_ratio": round(s.mean, 6),
            "violation_ratio": round(float(np.mean(s.violation)), 6),
            "rejection_ratio": round(float(np.mean(s.rejection)), 6),
            "energy_j": round(float(np.mean(s.energy_j)), 3),
            "success_ci95": _opt(ci95(s.success)),
            "success_per_seed": _round(s.success),
            # Queries sent per cluster over every seed (a cascade's escalations included).
            "dispatched": _dispatched(reports, name),
        }
    bounds = [r.upper_bound for r in reports]
    upper: dict[str, Any] | None = None
    if all(b is not None for b in bounds):
        values = [float(b) for b in bounds if b is not None]
        upper = {"success_ratio": round(float(np.mean(values)), 6), "ci95": _opt(ci95(values))}
        upper["rtt"] = first.bound_rtt
        upper["per_seed"] = _round(values)
    return {
        "scenario": first.scenario,
        "seeds": [r.seed for r in reports],
        "duration_s": first.duration_s,
        "queries": [r.queries for r in reports],
        "latencies": first.latencies,
        "upper_bound": upper,
        "best_static": best_static(summaries),
        "policies": policies,
        "gaps": {
            name: {
                "vs": g.vs,
                "mean": round(g.mean, 4),
                "ci95": _opt(g.ci95, 4),
                "per_seed": _round(g.per_seed, 4),
                "wins": g.wins,
            }
            for name, g in gaps(summaries).items()
        },
    }


def _pm(mean: float, half: float | None) -> str:
    return f"{mean:.2f}" if half is None else f"{mean:.2f} ± {half:.2f}"


def format_table(reports: Sequence[SimReport]) -> str:
    summaries = summarize(reports)
    best = best_static(summaries)
    header = ["policy", "success %", "violations %", "rejected %", "energy kJ"]
    body = []
    for name, s in summaries.items():
        mark = " (best static)" if name == best else ""
        body.append(
            [
                name + mark,
                _pm(100 * s.mean, None if (h := ci95(s.success)) is None else 100 * h),
                f"{100 * float(np.mean(s.violation)):.2f}",
                f"{100 * float(np.mean(s.rejection)):.2f}",
                f"{float(np.mean(s.energy_j)) / 1000:.1f}",
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return " | ".join(
            [cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))]
        )

    lines = [line(header), "-+-".join("-" * w for w in widths), *(line(b) for b in body)]
    bounds = [r.upper_bound for r in reports if r.upper_bound is not None]
    if len(bounds) == len(reports):
        half = ci95(bounds)
        mean = _pm(100 * float(np.mean(bounds)), None if half is None else 100 * half)
        lines.append(f"upper bound: success {mean} %")
    for g in gaps(summaries).values():
        lines.append(
            f"{g.policy} - {g.vs}: {_pm(g.mean, g.ci95)} points "
            f"(better on {g.wins} of {len(g.per_seed)} seeds)"
        )
    seeds = ", ".join(str(r.seed) for r in reports)
    lines.append(f"mean over seeds {seeds}; ± is the 95% interval of the mean (Student t)")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_WINDOW_S",
    "Gap",
    "RunSpec",
    "Summary",
    "best_static",
    "ci95",
    "format_table",
    "gaps",
    "parse_seeds",
    "run_seed",
    "run_seeds",
    "summarize",
    "to_json",
]
