"""``apdispatch chaos``: a scenario played live while its workers and the AP are killed,
stopped and restarted at random (seeded), then the accounting checked.

The scenario's workers and an AP start as subprocesses on loopback (as in
``apdispatch demo``); the load generator plays the (shortened) scenario against
the AP in this process; meanwhile a fault schedule drawn from ``--fault-seed``
(:mod:`.faults`) kills, freezes and restarts them. The tool only injects and
counts: the AP's code is the same as in any other run.

The accounting (:mod:`.report`): every query sent gets exactly one outcome,
overall and in every fault window, where an error the client saw (a broken
stream, UNAVAILABLE while the AP is down) is the outcome ``failed``; a query
with no reply at all once its deadline and the grace period have passed is
*lost*. The exit status is 0 when every check holds and nothing was lost, 1
otherwise or when the run failed, 2 for bad input, 130 when interrupted.
Logs and ``report.json`` go to ``build/chaos/<timestamp>/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from apdispatch.common.errors import ApdispatchError
from apdispatch.common.manifest import MANIFEST_NAME
from apdispatch.common.outcomes import OUTCOMES
from apdispatch.policies import STATIC_POLICIES, policy_names
from apdispatch.scenario import ScenarioError, load_scenario
from apdispatch.tools.chaos.faults import FAULT_KINDS, Fault, FaultError, parse_kinds, plan_faults
from apdispatch.tools.chaos.report import checks, format_report
from apdispatch.tools.chaos.run import Topology, play
from apdispatch.tools.demo import DemoError, plan_workers
from apdispatch.tools.processes import ChildError, Children, sigterm_as_interrupt, uninterruptible

__all__ = ["FAULT_KINDS", "Fault", "main", "plan_faults"]

CHAOS_ROOT = Path("build/chaos")


def _run_dir() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = CHAOS_ROOT / stamp
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = CHAOS_ROOT / f"{stamp}-{n}"
    run_dir.mkdir(parents=True)
    return run_dir


def main(args: argparse.Namespace) -> int:
    try:
        scenario = load_scenario(args.scenario)
        if args.duration is not None:
            scenario = scenario.scaled(args.duration)
        if args.policy not in policy_names():
            raise DemoError(f"unknown policy {args.policy!r} (known: {', '.join(policy_names())})")
        models: Path = args.models
        if not (models / MANIFEST_NAME).is_file():
            raise DemoError(f"no model zoo at {models} (build it: apdispatch models build --out {models})")
        specs = plan_workers(scenario, models)
        seed = scenario.seed if args.seed is None else args.seed
        fault_seed = seed if args.fault_seed is None else args.fault_seed
        duration = scenario.duration_s
        faults = plan_faults(
            parse_kinds(args.faults),
            [s.worker_id for s in specs],
            duration_s=duration,
            seed=fault_seed,
            mean_gap_s=args.gap,
            first_at_s=0.1 * duration if args.first_at is None else args.first_at,
            end_margin_s=min(2.0, 0.1 * duration),
        )
    except (ScenarioError, DemoError, FaultError, OSError) as exc:
        print(f"apdispatch chaos: {exc}", file=sys.stderr)
        return 2
    run_dir = _run_dir()
    checkpoint: Path | None = args.checkpoint
    if checkpoint is None and args.policy not in STATIC_POLICIES:
        checkpoint = run_dir / "ap-checkpoint"
    print(
        f"scenario {scenario.name}: {duration:g} s of load, seed {seed}; policy {args.policy}; "
        f"{len(faults)} faults planned (seed {fault_seed}); logs in {run_dir}",
        flush=True,
    )
    children = Children(run_dir)
    topo = Topology.plan(children, specs, models, args.policy, checkpoint)
    result: tuple[Any, ...] | None = None
    rc = 0
    try:
        with sigterm_as_interrupt():
            topo.start()
            print(f"AP at {topo.ap}, {len(specs)} workers registered; load and faults start", flush=True)
            result = asyncio.run(play(topo, scenario, models, faults, seed, sys.stderr.isatty()))
    except KeyboardInterrupt:
        print(f"\ninterrupted; every subprocess stopped. Logs: {run_dir}", file=sys.stderr)
        rc = 130
    except (ChildError, ApdispatchError, OSError, ValueError) as exc:
        print(f"apdispatch chaos: {exc}\nLogs: {run_dir}", file=sys.stderr)
        rc = 1
    finally:
        with uninterruptible():
            topo.thaw()
            children.close()
    if result is None:
        return rc or 1
    load, accounting, windows, records = result
    totals: dict[str, Any] = {"sent": accounting.sent_total, **accounting.counts_total()}
    totals["lost"] = accounting.lost_total
    doc: dict[str, Any] = {
        "scenario": scenario.name,
        "scenario_path": str(scenario.path) if scenario.path else None,
        "duration_s": duration,
        "seed": seed,
        "fault_seed": fault_seed,
        "policy": args.policy,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "run_dir": str(run_dir),
        "ap_starts": topo.ap_starts,
        "faults": [r.to_dict() for r in records],
        "windows": windows,
        "totals": totals,
        "outcomes": list(OUTCOMES),
        "load": load,
    }
    doc["checks"] = checks(doc)
    text = json.dumps(doc, indent=2) + "\n"
    (run_dir / "report.json").write_text(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print()
    print(format_report(doc))
    print(f"\nlogs and report.json in {run_dir}")
    failed_recovery = any(r.error for r in records)
    return 0 if all(doc["checks"].values()) and not failed_recovery else 1
