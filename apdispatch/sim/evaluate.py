"""``apdispatch evaluate SCENARIO...``: the evaluation table, one scenario at a time.

For each scenario it does what ``apdispatch sim SCENARIO --policies all
--seeds N --json OUT/NAME.json --plot OUT/NAME.png`` does (so any row can be
reproduced by that one command), then writes ``OUT/table.md``: one row per
scenario with the upper bound, the best static policy, the learned policies
and the paired gap of ``learned`` to the best static one.

A scenario the shipped checkpoint was trained on is marked, from the
checkpoint's own record (``trained_on`` in ``learned.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apdispatch.policies import policy_names
from apdispatch.scenario import Scenario, ScenarioError, load_scenario
from apdispatch.sim import seeds as multi
from apdispatch.sim.profile import REFERENCE, parse_latencies
from apdispatch.sim.results import DEFAULT_BOUND_RTT, DEFAULT_WINDOW_S

BOUND_NOTE = {
    "expected": "round trips counted by their chance to leave room for the work (`--bound-rtt expected`)",
    "realized": "round trips known before each query is sent (`--bound-rtt realized`)",
}


def load_pattern(scenario: Scenario) -> str:
    """``constant`` for one arrival step, else ``dynamic``: what the issue's criteria tell apart."""
    return "constant" if len(scenario.arrivals.schedule) == 1 else "dynamic"


def trained_on() -> set[str]:
    """Scenario file names the shipped ``learned`` checkpoint was trained on."""
    from apdispatch.learned.checkpoint import CHECKPOINTS

    meta = json.loads((CHECKPOINTS / "learned.json").read_text())
    return {Path(p).name for p in meta.get("trained_on", [])}


def _pct(doc: dict[str, Any] | None, key: str = "success_ratio", ci: str = "success_ci95") -> str:
    if doc is None:
        return "-"
    half = doc.get(ci)
    mean = 100.0 * doc[key]
    return f"{mean:.2f}" if half is None else f"{mean:.2f} ± {100.0 * half:.2f}"


def table_row(doc: dict[str, Any], path: Path, pattern: str, trained: bool) -> list[str]:
    policies = doc["policies"]
    best = doc["best_static"]
    gap = doc["gaps"].get("learned")
    gap_text = "-"
    if gap is not None:
        half = gap["ci95"]
        gap_text = f"{gap['mean']:+.2f}" + ("" if half is None else f" ± {half:.2f}")
        gap_text += f" ({gap['wins']}/{len(gap['per_seed'])})"
    bound = doc["upper_bound"]
    return [
        f"[{doc['scenario']}]({path.as_posix()})" + (" (train)" if trained else ""),
        pattern,
        "-" if bound is None else _pct(bound, "success_ratio", "ci95"),
        f"{best} {_pct(policies[best])}" if best else "-",
        _pct(policies.get("learned")),
        gap_text,
        _pct(policies.get("actor-critic")),
        _pct(policies.get("aset")),
    ]


HEADER = [
    "scenario",
    "load",
    "upper bound",
    "best static",
    "`learned`",
    "`learned` - best static, points (seeds won)",
    "`actor-critic`",
    "`aset`",
]


def markdown(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def standing(docs: Sequence[dict[str, Any]], policy: str = "learned") -> str:
    """One line: on how many scenarios ``policy`` is ahead of the best static policy (mean paired
    gap above 0), level (equal on every seed) or behind (mean below 0), and on how many of those
    it is behind at the 95 % level (gap plus its interval below 0)."""
    ahead = level = behind = even = significant = 0
    for doc in docs:
        gap = doc["gaps"].get(policy)
        if gap is None:
            continue
        if all(g == 0 for g in gap["per_seed"]):
            level += 1
        elif gap["mean"] > 0:
            ahead += 1
        elif gap["mean"] < 0:
            behind += 1
            significant += gap["ci95"] is not None and gap["mean"] + gap["ci95"] < 0
        else:
            even += 1
    n = ahead + level + behind + even
    line = f"`{policy}` against the best static policy, of {n} scenarios: ahead on {ahead}, "
    line += f"level on {level} (equal on every seed), behind on {behind}"
    line += f" ({significant} of them at the 95 % level)"
    return line + (f", even on average on {even}" if even else "")


def bound_gap(docs: Sequence[dict[str, Any]], policy: str = "learned") -> str:
    """One line: the mean gap, in points, between the upper bound and ``policy``, and the widest."""
    gaps = [
        (
            100.0 * (doc["upper_bound"]["success_ratio"] - doc["policies"][policy]["success_ratio"]),
            doc["scenario"],
        )
        for doc in docs
        if doc.get("upper_bound") is not None and policy in doc["policies"]
    ]
    if not gaps:
        return f"`{policy}` against the upper bound: no scenario with both"
    widest, name = max(gaps)
    return (
        f"`{policy}` against the upper bound, of {len(gaps)} scenarios: "
        f"{sum(g for g, _ in gaps) / len(gaps):.2f} points below it on average, {widest:.2f} at most ({name})"
    )


def main(args: argparse.Namespace) -> int:
    try:
        scenarios = [(path, load_scenario(path)) for path in args.scenarios]
        policies = list(policy_names()) if args.policies == "all" else args.policies.split(",")
        first = scenarios[0][1].seed
        seeds = multi.parse_seeds(args.seeds, first if args.seed is None else args.seed)
        latencies: str = getattr(args, "latencies", None) or REFERENCE
        parse_latencies(latencies)  # a bad --latencies fails here, not in a worker process
    except (ScenarioError, OSError, ValueError) as exc:
        print(f"apdispatch evaluate: {exc}", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    trained = trained_on()
    rows = []
    docs = []
    started = time.perf_counter()
    for path, scenario in scenarios:
        t0 = time.perf_counter()
        spec = multi.RunSpec(
            scenario=path,
            duration_s=args.duration,
            models=args.models,
            calibration=None,
            policies=tuple(policies),
            window_s=DEFAULT_WINDOW_S,
            bound=True,
            latencies=latencies,
            bound_rtt=args.bound_rtt,
        )
        reports = multi.run_seeds(spec, seeds, jobs=args.jobs)
        doc = multi.to_json(reports)
        doc["command"] = (
            f"apdispatch sim {path.as_posix()} --policies {args.policies} --seeds {args.seeds}"
            + ("" if args.seed is None else f" --seed {args.seed}")
            + ("" if args.duration is None else f" --duration {args.duration:g}")
            + ("" if latencies == REFERENCE else f" --latencies {latencies}")
            + ("" if args.bound_rtt == DEFAULT_BOUND_RTT else f" --bound-rtt {args.bound_rtt}")
        )
        (out / f"{scenario.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
        docs.append(doc)
        if not args.no_plot:
            from apdispatch.sim.plot import plot_report

            plot_report(reports[0], out / f"{scenario.name}.png")
        rows.append(table_row(doc, path, load_pattern(scenario), path.name in trained))
        print(
            f"{scenario.name}: {time.perf_counter() - t0:.0f} s\n{multi.format_table(reports)}\n", flush=True
        )
    table = markdown(rows)
    # No run time in the file: a re-run on any machine writes the same table.
    note = (
        f"\nSuccess ratio, %, mean ± 95% interval over seeds {', '.join(map(str, seeds))} "
        f"(`apdispatch evaluate`, {latencies} latencies). Upper bound: {BOUND_NOTE[args.bound_rtt]}.\n"
    )
    (out / "table.md").write_text(table + "\n" + note)
    print(f"{table}\n{note}\n{standing(docs)}\n{bound_gap(docs)}")
    print(f"{len(scenarios)} scenarios in {time.perf_counter() - started:.0f} s")
    return 0


__all__ = ["bound_gap", "load_pattern", "main", "markdown", "standing", "table_row", "trained_on"]
