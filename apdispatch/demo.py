"""``apdispatch demo``: a scenario run live on loopback, once per policy.

The scenario's workers start once, as subprocesses (``apdispatch.topology``
gives their flags: the same as in the compose file). Then, for every policy,
a fresh AP subprocess starts on the same address (workers re-register with
it within a heartbeat), the load generator plays the (shortened) scenario
against it in this process, and the AP stops: each policy starts from empty
state and sees the same arrivals (same seed).

Every subprocess runs in its own session and is killed on the way out,
whatever the way out (error, Ctrl-C, SIGTERM); their logs go to
``build/demo/<timestamp>/``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from apdispatch.errors import ApdispatchError
from apdispatch.policies import STATIC_POLICIES, policy_names
from apdispatch.processes import Child, ChildError, Children, free_port, wait_for_workers
from apdispatch.scenario import Scenario, ScenarioError, load_scenario
from apdispatch.topology import WorkerSpec, build_topology
from workers.zoo.manifest import MANIFEST_NAME, load_manifest

DEMO_ROOT = Path("build/demo")
REGISTER_TIMEOUT_S = 90.0  # a cold cloud worker imports torch and loads models first


class DemoError(RuntimeError):
    """The demo could not run; the message says which process and shows its log's end."""


def resolve_policies(text: str) -> list[str]:
    """``static`` or a comma list; unknown names are an error listing the known ones."""
    known = [*STATIC_POLICIES, *(n for n in policy_names() if n not in STATIC_POLICIES)]
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            continue
        if name == "static":
            names += [p for p in STATIC_POLICIES if p not in names]
        elif name in known:
            if name not in names:
                names.append(name)
        else:
            raise DemoError(f"unknown policy {name!r} (known: static, {', '.join(known)})")
    if not names:
        raise DemoError("--policies: no policy given")
    return names


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that the finally blocks stop the children."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """A second Ctrl-C must not cut the clean-up short and leave children behind."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- the load generator -------------------------------------------------------


async def _load(scenario: Scenario, ap: str, models: Path, seed: int, progress: bool) -> dict[str, Any]:
    # Imported here: the load generator is only needed once the topology runs.
    from apdispatch.loadgen import run_load

    report = await run_load(scenario, ap, models, seed=seed, progress=progress)
    if not report.counts_add_up:
        raise DemoError(f"outcomes do not add up: {report.total} outcomes, {report.sent} sent")
    return report.to_dict()


# --- the table -------------------------------------------------------------------

OUTCOMES = ("ok", "late", "inaccurate", "rejected", "failed")


def summary_row(policy: str, report: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"policy": policy, "sent": int(report["sent"])}
    for key in OUTCOMES:
        row[key] = int(report[key])
    row["success_pct"] = 100.0 * row["ok"] / row["sent"] if row["sent"] else 0.0
    latency = report.get("latency_ms", {})
    row["p50_ms"] = latency.get("p50")
    row["p99_ms"] = latency.get("p99")
    return row


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["policy", "sent", *OUTCOMES, "success %", "p50 ms", "p99 ms"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    body = [
        [
            r["policy"],
            str(r["sent"]),
            *(str(r[k]) for k in OUTCOMES),
            f"{r['success_pct']:.1f}",
            ms(r["p50_ms"]),
            ms(r["p99_ms"]),
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return " | ".join([first, *rest])

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(b) for b in body)])


# --- the run -----------------------------------------------------------------------


def plan_workers(scenario: Scenario, models: Path) -> tuple[WorkerSpec, ...]:
    """The scenario's workers, checked against the zoo before anything starts."""
    manifest = load_manifest(models)
    specs = build_topology(scenario, manifest)
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
) -> None:
    """Fills ``results`` policy by policy, so that what finished survives a later failure."""
    models_arg = str(models.resolve())
    # One address for every AP: the workers keep registering with it.
    ap = f"127.0.0.1:{free_port()}"
    children = Children(run_dir)
    try:
        workers: dict[str, Child] = {}
        for i, policy in enumerate(policies):
            ap_child = children.start(f"ap-{i + 1}-{policy}", ["serve", "--listen", ap, "--policy", policy])
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
            }
            for child in workers.values():
                if child.exited() is not None:
                    raise DemoError(f"worker {child.name} stopped:\n{child.describe()}")
    finally:
        with _uninterruptible():
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
        specs = plan_workers(scenario, models)
    except (ScenarioError, DemoError, OSError) as exc:
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
        with _sigterm_as_interrupt():
            run_demo(scenario, specs, models, policies, run_dir, seed, results, progress=sys.stderr.isatty())
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
    doc = {
        "scenario": scenario.name,
        "scenario_path": str(scenario.path) if scenario.path else None,
        "duration_s": scenario.duration_s,
        "seed": seed,
        "run_dir": str(run_dir),
        "complete": rc == 0,
        "policies": results,
    }
    text = json.dumps(doc, indent=2) + "\n"
    (run_dir / "report.json").write_text(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print()
    print(format_table(rows))
    print(
        f"\nlogs and report.json in {run_dir}"
        + (f"; reports also in {args.json}" if args.json is not None else "")
    )
    return rc
