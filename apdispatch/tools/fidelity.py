"""Sim fidelity: the simulator replays the scenario a live demo just played.

``apdispatch demo --fidelity`` runs :mod:`apdispatch.sim` on the same scenario
(same duration, seed and policies; the simulator's arrival plan *is* the load
generator's, ``apdispatch.sim.arrivals``) and sets each policy's simulated
success ratio beside the live one: ``live - sim`` in percentage points.

It does so twice when it can. First with the calibration it was given
(``--calibration``, by default none: the zoo's tight-loop latencies as they
are). Then with one fitted to the live run itself: every served reply carries
the ``compute_ms`` its worker held a slot for, the load generator keeps their
mean per target, and :func:`apdispatch.sim.calibration.fit_calibration` fits
``compute = scale * latency / speed + overhead`` to them. Both runs, and the
fit, take the variants' latencies from one latency profile (``--latencies``,
``apdispatch.sim.profile``): the shipped reference by default, so that the
fitted scale says how much slower this machine's live workers are than the
reference; ``measured`` fits against what this machine's zoo build timed. The fit sees
only what it can: the AP forwards no batch size, so every reply is set against
the batch-1 figure (cloud batches then look a little slower per request than
they are), and a reply the AP cut off at its deadline carries no timings, so
the slowest executions are missing from it. Both err towards a fitted device
that is a little too fast.

Nothing here starts a process: the simulator runs in this one, in a second or
two per policy for a demo-length scenario.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apdispatch.common.manifest import Manifest
from apdispatch.scenario import Scenario
from apdispatch.sim.calibration import MANIFEST, Calibration, fit_calibration
from apdispatch.sim.engine import OK
from apdispatch.sim.model import load_model
from apdispatch.sim.profile import REFERENCE, LatencyProfile
from apdispatch.sim.results import SimReport, ratios, run_policies
from apdispatch.tools.topology import WorkerSpec

__all__ = [
    "DEFAULT",
    "FITTED",
    "Fidelity",
    "FitResult",
    "calibration_doc",
    "compare",
    "fit_live",
    "format_summary",
    "live_speed",
    "pool_compute",
    "run_fidelity",
    "simulate",
    "to_json",
]

# The two simulator runs, by the name report.json and the table use.
DEFAULT = "default"
FITTED = "fitted"


@dataclass(frozen=True, slots=True)
class FitResult:
    """A calibration fitted to live replies, and the per-target evidence behind it."""

    calibration: Calibration
    replies: int
    targets: dict[str, dict[str, float]]  # key -> n, observed mean, expected at scale 1, ratio


@dataclass(frozen=True, slots=True)
class Fidelity:
    """One simulator run set beside the live results."""

    label: str  # DEFAULT or FITTED
    calibration: Calibration
    source: str  # "manifest", "--calibration" or "fitted"
    sim_pct: dict[str, float]  # policy -> simulated success %
    gap_pts: dict[str, float]  # policy -> live % - sim %
    report: SimReport

    @property
    def latencies(self) -> str:
        """The latency profile the simulator ran with."""
        return self.report.latencies or REFERENCE

    @property
    def mean_abs_gap(self) -> float:
        return sum(abs(g) for g in self.gap_pts.values()) / len(self.gap_pts) if self.gap_pts else 0.0

    @property
    def worst(self) -> tuple[str, float] | None:
        """The policy the simulator misses most, with its gap."""
        if not self.gap_pts:
            return None
        name = max(self.gap_pts, key=lambda p: abs(self.gap_pts[p]))
        return name, self.gap_pts[name]


def live_speed(spec: WorkerSpec) -> float:
    """The speed the live worker really emulates: waiting can slow a worker, never speed it up."""
    return 1.0 / max(1.0, spec.slowdown)


def pool_compute(reports: Iterable[Mapping[str, Any]]) -> dict[str, tuple[int, float]]:
    """Replies and mean ``compute_ms`` per target over several live reports (their ``compute_ms``)."""
    sums: dict[str, tuple[int, float]] = {}
    for report in reports:
        for key, stats in report.get("compute_ms", {}).items():
            n, total = sums.get(key, (0, 0.0))
            sums[key] = (n + int(stats["n"]), total + int(stats["n"]) * float(stats["mean"]))
    return {key: (n, total / n) for key, (n, total) in sorted(sums.items()) if n > 0}


def fit_live(
    reports: Iterable[Mapping[str, Any]], specs: Sequence[WorkerSpec], manifest: Manifest
) -> FitResult | None:
    """One calibration from every policy's replies together (one machine, one set of devices);
    None when no reply carried timings.

    The reports keep a mean per target, not every reply; a target's mean,
    repeated once per reply, gives the same least-squares fit as the replies
    themselves (the manifest figure and the speed are the same for all of
    them). Targets of workers or variants the run did not plan are left out.
    The fit is against ``manifest``'s latencies: pass it through the latency
    profile the simulator will run with (``LatencyProfile.apply``).
    """
    by_id = {s.worker_id: s for s in specs}
    latency = {v.name: v.latency_ms_batch1 for v in manifest.variants}
    samples: list[tuple[float, float, float]] = []
    targets: dict[str, dict[str, float]] = {}
    for key, (n, mean) in pool_compute(reports).items():
        _cluster, worker, variant = key.split("/", 2)
        spec = by_id.get(worker)
        if spec is None or variant not in latency:
            continue
        speed = live_speed(spec)
        samples += [(latency[variant], speed, mean)] * n
        base = latency[variant] / speed
        targets[key] = {
            "n": n,
            "mean_ms": round(mean, 4),
            "manifest_ms": round(base, 4),
            "ratio": round(mean / base, 2),
        }
    if not samples:
        return None
    return FitResult(calibration=_fit(samples), replies=len(samples), targets=targets)


def _fit(samples: Sequence[tuple[float, float, float]]) -> Calibration:
    try:
        return fit_calibration(samples)
    except ValueError:
        # A falling line (seen when one run's targets are few and alike: a fast
        # cloud worker slower per manifest millisecond than slow edge ones) is
        # no calibration; the ratio through the origin still is.
        x = np.array([m / s for m, s, _ in samples])
        y = np.array([c for _, _, c in samples])
        return Calibration(scale=float(x @ y / (x @ x)))


def simulate(
    scenario: Scenario,
    models: Path,
    policies: Sequence[str],
    seed: int,
    calibration: Calibration,
    window_s: float,
    latencies: LatencyProfile | None = None,
) -> SimReport:
    """The simulator on the live run's scenario, seed and policies (no upper bound: not compared)."""
    model = load_model(scenario, models, calibration, latencies)
    return run_policies(model, policies, seed=seed, window_s=window_s, bound=False)


def compare(
    label: str, source: str, calibration: Calibration, live_pct: Mapping[str, float], report: SimReport
) -> Fidelity:
    sim_pct = {
        name: 100.0 * ratios(result.counts)["success_ratio"]
        for name, result in report.results.items()
        if name in live_pct
    }
    gaps = {name: live_pct[name] - pct for name, pct in sim_pct.items()}
    return Fidelity(label, calibration, source, sim_pct, gaps, report)


def run_fidelity(
    scenario: Scenario,
    models: Path,
    live_pct: Mapping[str, float],
    seed: int,
    calibration: Calibration | None,
    fit: FitResult | None,
    window_s: float,
    latencies: LatencyProfile | None = None,
) -> list[Fidelity]:
    """The simulator with the given calibration (None: none), then with the fitted one; ``fit``
    must come from the same ``latencies`` (``fit_live`` on the manifest they were applied to)."""
    policies = list(live_pct)
    given = MANIFEST if calibration is None else calibration
    source = "manifest" if calibration is None else "--calibration"
    report = simulate(scenario, models, policies, seed, given, window_s, latencies)
    runs = [compare(DEFAULT, source, given, live_pct, report)]
    if fit is not None:
        report = simulate(scenario, models, policies, seed, fit.calibration, window_s, latencies)
        runs.append(compare(FITTED, "fitted", fit.calibration, live_pct, report))
    return runs


def calibration_doc(calibration: Calibration) -> dict[str, float]:
    return {"scale": round(calibration.scale, 4), "overhead_ms": round(calibration.overhead_ms, 4)}


def to_json(runs: Sequence[Fidelity], fit: FitResult | None) -> dict[str, Any]:
    """report.json's ``fidelity``: per run its calibration, per policy sim % and gap, and the
    simulated timeline (ok and total per window, the windows of the plot)."""
    doc: dict[str, Any] = {}
    for run in runs:
        policies = {}
        for name, pct in run.sim_pct.items():
            timeline = run.report.results[name].timeline()
            policies[name] = {
                "sim_pct": round(pct, 3),
                "gap_pts": round(run.gap_pts[name], 3),
                "timeline": {
                    "window_s": run.report.window_s,
                    "ok": [int(v) for v in timeline[:, OK]],
                    "total": [int(v) for v in timeline.sum(axis=1)],
                },
            }
        worst = run.worst
        doc[run.label] = {
            "calibration": {**calibration_doc(run.calibration), "source": run.source},
            "latencies": run.latencies,
            "mean_abs_gap_pts": round(run.mean_abs_gap, 3),
            "worst": None if worst is None else {"policy": worst[0], "gap_pts": round(worst[1], 3)},
            "policies": policies,
        }
    if fit is not None:
        doc["fit"] = {"replies": fit.replies, "targets": fit.targets}
    return doc


def format_summary(runs: Sequence[Fidelity], fit: FitResult | None) -> str:
    """Lines under the table: each calibration, and how far its simulator is from live."""
    lines = []
    for run in runs:
        c = run.calibration
        how = {
            "manifest": f"the {run.latencies} latencies as they are",
            "--calibration": "--calibration",
            "fitted": f"fitted to {fit.replies} live replies" if fit is not None else "fitted",
        }[run.source]
        worst = run.worst
        tail = "" if worst is None else f", largest {worst[1]:+.1f} ({worst[0]})"
        lines.append(
            f"sim ({run.label}: scale {c.scale:.3g}, overhead {c.overhead_ms:.3g} ms, {how}): "
            f"mean |live - sim| {run.mean_abs_gap:.1f} points{tail}"
        )
    return "\n".join(lines)
