"""``apdispatch demo``: a scenario run live on loopback, once per policy.

The scenario's workers start once, as subprocesses (``apdispatch.tools.topology``
gives their flags: the same as in the compose file). Then, for every policy,
a fresh AP subprocess starts on the same address (workers re-register with
it within a heartbeat), the load generator plays the (shortened) scenario
against it in this process, and the AP stops: each policy starts from empty
state and sees the same arrivals (same seed).

Every subprocess runs in its own session and is killed on the way out,
whatever the way out (error, Ctrl-C, SIGTERM); their logs go to
``build/demo/<timestamp>/``.

After the live runs: ``report.json`` (written first, so that nothing later
can lose it), with ``--fidelity`` the simulator on the same run
(``apdispatch.tools.fidelity``: two more pairs of columns in the table), and the
figure of success over time (``apdispatch.tools.demo_plot``), into the run folder
and to ``--plot``. Then the table, and for every policy that is not static (the
learned ones) its gap to the best static policy of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from apdispatch.common.errors import ApdispatchError
from apdispatch.common.manifest import MANIFEST_NAME, load_manifest
from apdispatch.common.outcomes import OUTCOMES
from apdispatch.policies import STATIC_POLICIES, resolve_policies
from apdispatch.scenario import Scenario, ScenarioError, load_scenario
from apdispatch.sim.calibration import Calibration
from apdispatch.sim.profile import LatencyProfile, parse_latencies
from apdispatch.sim.results import text_table
from apdispatch.tools.processes import (
    Child,
    ChildError,
    Children,
    free_port,
    sigterm_as_interrupt,
    uninterruptible,
    wait_for_workers,
)
from apdispatch.tools.topology import WorkerSpec, build_topology

DEMO_ROOT = Path("build/demo")
PLOT_NAME = "success.png"  # written into every run folder
REGISTER_TIMEOUT_S = 90.0  # a cold cloud worker imports torch and loads models first


class DemoError(RuntimeError):
    """The demo could not run; the message says which process and shows its log's end."""


# --- the load generator -------------------------------------------------------


async def _load(scenario: Scenario, ap: str, models: Path, seed: int, progress: bool) -> dict[str, Any]:
    # Imported here: the load generator is only needed once the topology runs.
    from apdispatch.tools.loadgen import run_load

    report = await run_load(scenario, ap, models, seed=seed, progress=progress)
    if not report.counts_add_up:
        raise DemoError(f"outcomes do not add up: {report.total} outcomes, {report.sent} sent")
    return report.to_dict()


# --- the table -------------------------------------------------------------------


def summary_row(policy: str, report: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"policy": policy, "sent": int(report["sent"])}
    for key in OUTCOMES:
        row[key] = int(report[key])
    row["success_pct"] = 100.0 * row["ok"] / row["sent"] if row["sent"] else 0.0
    latency = report.get("latency_ms", {})
    row["p50_ms"] = latency.get("p50")
    row["p99_ms"] = latency.get("p99")
    # Accuracy measured from the samples' labels: over every answer received, and the
    # app furthest below (or least above) its floor, in points.
    judged = [b["accuracy"] for b in report.get("per_app", {}).values() if b.get("accuracy", {}).get("n")]
    n = sum(a["n"] for a in judged)
    row["accuracy_pct"] = 100.0 * sum(a["top1"] * a["n"] for a in judged) / n if n else None
    row["above_floor_pts"] = min((100.0 * (a["top1"] - a["min_accuracy"]) for a in judged), default=None)
    return row


def against_best_static(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per policy of the run that is not static: its success % against the best
    static policy of the same run. None when the run lacks either kind."""
    static = [r for r in rows if r["policy"] in STATIC_POLICIES]
    if not static:
        return []
    best = max(static, key=lambda r: float(r["success_pct"]))
    return [
        f"{r['policy']}: {r['success_pct']:.1f} %, {r['success_pct'] - best['success_pct']:+.1f} points "
        f"against the best static policy ({best['policy']}, {best['success_pct']:.1f} %)"
        for r in rows
        if r["policy"] not in STATIC_POLICIES
    ]


# Columns the table gains with --fidelity: (header, row key), shown when some row has the key.
FIDELITY_COLUMNS = (
    ("sim %", "sim_pct"),
    ("live - sim", "sim_gap"),
    ("sim fit %", "fit_pct"),
    ("live - fit", "fit_gap"),
)


def add_fidelity(rows: Sequence[dict[str, Any]], label: str, sim_pct: dict[str, float]) -> None:
    """Put one simulator run's success % and gap (points) into the rows: ``sim_*`` for the
    given calibration, ``fit_*`` for the fitted one."""
    prefix = "fit" if label == "fitted" else "sim"
    for row in rows:
        pct = sim_pct.get(row["policy"])
        if pct is not None:
            row[f"{prefix}_pct"] = pct
            row[f"{prefix}_gap"] = row["success_pct"] - pct


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    extra = [(h, k) for h, k in FIDELITY_COLUMNS if any(k in r for r in rows)]
    header = [
        "policy",
        "sent",
        *OUTCOMES,
        "success %",
        "p50 ms",
        "p99 ms",
        "accuracy %",
        "worst app - floor",
        *(h for h, _ in extra),
    ]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    def pct(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        return f"{value:+.1f}" if key.endswith("_gap") else f"{value:.1f}"

    body = [
        [
            r["policy"],
            str(r["sent"]),
            *(str(r[k]) for k in OUTCOMES),
            f"{r['success_pct']:.1f}",
            ms(r["p50_ms"]),
            ms(r["p99_ms"]),
            ms(r.get("accuracy_pct")),
            "-" if r.get("above_floor_pts") is None else f"{r['above_floor_pts']:+.1f}",
            *(pct(r, k) for _, k in extra),
        ]
        for r in rows
    ]
    return "\n".join(text_table(header, body))


# --- the run -----------------------------------------------------------------------


def plan_workers(
    scenario: Scenario, models: Path, latencies: LatencyProfile | None = None
) -> tuple[WorkerSpec, ...]:
    """The scenario's workers, checked against the zoo before anything starts.

    ``latencies`` gives the emulated devices' service times (default: the reference profile).
    """
    manifest = load_manifest(models)
    specs = build_topology(scenario, manifest, latencies)
    # A missing model file would only show as a worker crash; say it up front.
    built = {v.name for v in manifest.variants}
    for spec in specs:
        for name in spec.variants:
            if name not in built:
                raise DemoError(f"variant {name!r} is defined only by the scenario: no model to serve")
            path = manifest.path(manifest.variant(name))
            if not path.is_file():
                raise DemoError(f"worker {spec.worker_id}: model file {path} is missing")
    return specs


def run_demo(
    scenario: Scenario,
    specs: Sequence[WorkerSpec],
    models: Path,
    policies: Sequence[str],
    run_dir: Path,
    seed: int,
    results: dict[str, Any],
    progress: bool = True,
    cascade: bool = False,
) -> None:
    """Fills ``results`` policy by policy, so that what finished survives a later failure.

    ``cascade``: the APs offer cascades (``serve --cascade``).
    """
    models_arg = str(models.resolve())
    # One address for every AP: the workers keep registering with it.
    ap = f"127.0.0.1:{free_port()}"
    children = Children(run_dir)
    try:
        workers: dict[str, Child] = {}
        for i, policy in enumerate(policies):
            argv = ["serve", "--listen", ap, "--policy", policy, *(["--cascade"] if cascade else [])]
            ap_child = children.start(f"ap-{i + 1}-{policy}", argv)
            if not workers:
                # The workers start after the first AP so that their first
                # registration finds it; later APs get re-registrations.
                workers = {
                    spec.worker_id: children.start(
                        spec.worker_id,
                        spec.argv(listen="127.0.0.1:0", models=models_arg, ap=ap),
                    )
                    for spec in specs
                }
            started = time.monotonic()
            reported = wait_for_workers(ap, ap_child, workers, REGISTER_TIMEOUT_S)
            if reported and reported != policy:
                raise DemoError(f"the AP runs policy {reported!r}, not {policy!r}")
            print(
                f"[{policy}] {len(workers)} workers registered in "
                f"{time.monotonic() - started:.1f} s; {scenario.duration_s:.0f} s of load",
                flush=True,
            )
            # What else loads this machine shows in live results (slowed workers,
            # a load generator behind schedule): keep it beside them.
            load_before = os.getloadavg()
            try:
                report = asyncio.run(_load(scenario, ap, models, seed, progress))
            except (ApdispatchError, OSError, ValueError) as exc:
                raise DemoError(f"[{policy}] the load run failed: {exc}\n{ap_child.describe()}") from exc
            rc = children.stop(ap_child)
            if rc != 0:
                print(f"[{policy}] warning: the AP exited with {rc}; see {ap_child.log}", flush=True)
            results[policy] = {
                "report": report,
                "summary": summary_row(policy, report),
                "ap_exit_code": rc,
                "ap_log": str(ap_child.log),
                "loadavg_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
            }
            for child in workers.values():
                if child.exited() is not None:
                    raise DemoError(f"worker {child.name} stopped:\n{child.describe()}")
    finally:
        with uninterruptible():
            children.close()


def main(args: argparse.Namespace) -> int:
    try:
        scenario = load_scenario(args.scenario)
        if args.duration is not None:
            scenario = scenario.scaled(args.duration)
        policies = resolve_policies(args.policies)
        models: Path = args.models
        if not (models / MANIFEST_NAME).is_file():
            raise DemoError(f"no model zoo at {models} (build it: apdispatch models build --out {models})")
        calibration_arg: str | None = getattr(args, "calibration", None)
        latencies_arg: str | None = getattr(args, "latencies", None)
        latencies = parse_latencies(latencies_arg)
        specs = plan_workers(scenario, models, latencies)
        # --calibration or --latencies alone asks for the comparison it configures.
        fidelity = bool(getattr(args, "fidelity", False)) or calibration_arg is not None
        fidelity = fidelity or latencies_arg is not None
        calibration = None
        if calibration_arg is not None:
            from apdispatch.sim.calibration import parse_calibration

            calibration = parse_calibration(calibration_arg)
    except (ValueError, DemoError, OSError) as exc:  # ValueError: ScenarioError and --policies
        print(f"apdispatch demo: {exc}", file=sys.stderr)
        return 2
    seed = scenario.seed if args.seed is None else args.seed
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = DEMO_ROOT / stamp
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = DEMO_ROOT / f"{stamp}-{n}"
    run_dir.mkdir(parents=True)
    print(
        f"scenario {scenario.name}: {scenario.duration_s:g} s per policy, seed {seed}; "
        f"policies {', '.join(policies)}; logs in {run_dir}",
        flush=True,
    )
    results: dict[str, Any] = {}
    rc = 0
    try:
        with sigterm_as_interrupt():
            run_demo(
                scenario,
                specs,
                models,
                policies,
                run_dir,
                seed,
                results,
                progress=sys.stderr.isatty(),
                cascade=bool(getattr(args, "cascade", False)),
            )
    except KeyboardInterrupt:
        print(f"\ninterrupted; every subprocess stopped. Logs: {run_dir}", file=sys.stderr)
        rc = 130
    except (DemoError, ChildError, ScenarioError) as exc:
        print(f"apdispatch demo: {exc}\nLogs: {run_dir}", file=sys.stderr)
        rc = 1
    if not results:
        return rc
    if rc != 0:
        print(f"\nresults of the {len(results)} of {len(policies)} policies that finished:", file=sys.stderr)
    rows = [r["summary"] for r in results.values()]
    doc: dict[str, Any] = {
        "scenario": scenario.name,
        "scenario_path": str(scenario.path) if scenario.path else None,
        "duration_s": scenario.duration_s,
        "seed": seed,
        "run_dir": str(run_dir),
        "complete": rc == 0,
        "policies": results,
    }
    # Written before the simulator and the plot run, so that neither can lose the live results.
    _write_report(doc, run_dir, args)
    notes: list[str] = []
    if fidelity:
        try:
            notes.append(_fidelity(doc, rows, scenario, specs, models, seed, calibration, latencies))
        except (ScenarioError, ValueError, KeyError, OSError) as exc:
            notes.append(f"sim fidelity failed: {exc}")
            rc = rc or 1
        _write_report(doc, run_dir, args)
    plots = [run_dir / PLOT_NAME]
    plot_arg: Path | None = getattr(args, "plot", None)
    if plot_arg is not None:
        plots.append(plot_arg)
    try:
        from apdispatch.tools.demo_plot import plot_success

        for path in plots:
            plot_success(doc, path)
        notes.append(f"plot: {', '.join(str(p) for p in plots)}")
    except ImportError as exc:
        # matplotlib comes with the `all` extra; without it only an asked-for plot is an error.
        notes.append(f"no plot ({exc}; install the 'all' extra)")
        if plot_arg is not None:
            rc = rc or 1
    print()
    print(format_table(rows))
    for line in against_best_static(rows):
        print(line)
    for note in notes:
        print(note)
    print(
        f"\nlogs and report.json in {run_dir}"
        + (f"; reports also in {args.json}" if args.json is not None else "")
    )
    return rc


def _write_report(doc: dict[str, Any], run_dir: Path, args: argparse.Namespace) -> None:
    text = json.dumps(doc, indent=2) + "\n"
    (run_dir / "report.json").write_text(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)


def _fidelity(
    doc: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    scenario: Scenario,
    specs: Sequence[WorkerSpec],
    models: Path,
    seed: int,
    calibration: Calibration | None,
    latencies: LatencyProfile,
) -> str:
    """The simulator on what just ran live: columns into ``rows``, ``fidelity`` into ``doc``;
    returns the summary lines. The fit and both simulator runs use ``latencies``."""
    # Imported here: the simulator (and, for learned policies, torch) only when asked for.
    from apdispatch.tools import fidelity as fid
    from apdispatch.tools.demo_plot import window_s

    live_pct = {r["policy"]: float(r["success_pct"]) for r in rows}
    reports = [r["report"] for r in doc["policies"].values()]
    fit = fid.fit_live(reports, specs, latencies.apply(load_manifest(models)))
    print(f"simulating {len(live_pct)} policies for sim fidelity ...", flush=True)
    started = time.monotonic()
    runs = fid.run_fidelity(
        scenario, models, live_pct, seed, calibration, fit, window_s(scenario.duration_s), latencies
    )
    for run in runs:
        add_fidelity(rows, run.label, run.sim_pct)
    doc["fidelity"] = fid.to_json(runs, fit)
    return f"{fid.format_summary(runs, fit)}\n(simulated in {time.monotonic() - started:.1f} s)"
