"""``apdispatch sim SCENARIO.toml``: every chosen policy on the same simulated arrivals.

(The flags are defined in ``apdispatch.cli``, which imports this module only
when ``sim`` runs.)

Prints one line per policy as it finishes, then the table; ``--json`` writes
the report (``apdispatch.sim.results``), ``--plot`` the timelines
(``apdispatch.sim.plot``), ``--bench`` measures the simulator instead
(``apdispatch.sim.speed``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apdispatch.learned.guard_config import parse_guard_overrides
from apdispatch.policies import LEARNED_POLICIES, Policy, make_policy, resolve_policies
from apdispatch.scenario import Scenario, ScenarioError, load_scenario
from apdispatch.sim.calibration import parse_calibration
from apdispatch.sim.model import SimModel, load_model
from apdispatch.sim.profile import parse_latencies
from apdispatch.sim.results import PolicyResult, SimReport, format_table, ratios, run_policies, to_json


def _checkpointed(
    checkpoint: Path | None, guards: dict[str, Any] | None = None
) -> Callable[[str, int], Policy] | None:
    """With ``--checkpoint``: learned policies resume from it and write it when their run ends.

    ``guards``: ``--guard`` overrides, for every policy that has guards or margins.
    """
    if checkpoint is None:
        if not guards:
            return None
        from apdispatch.sim.seeds import guarded_maker

        return guarded_maker(guards)
    from apdispatch.learned.factory import checkpoint_kind, uses_checkpoint

    kind = checkpoint_kind(checkpoint)

    def make(name: str, seed: int) -> Policy:
        if name not in LEARNED_POLICIES:
            return make_policy(name, seed, guards=guards)
        if not uses_checkpoint(name, kind):
            return make_policy(name, seed, background=False, guards=guards)
        start = checkpoint if kind is not None else None
        return make_policy(name, seed, start, background=False, save_to=checkpoint, guards=guards)

    return make


def main(args: argparse.Namespace) -> int:
    try:
        scenario = load_scenario(args.scenario)
        if args.duration is not None:
            scenario = scenario.scaled(args.duration)
        if args.window <= 0:
            raise ScenarioError("--window: must be > 0")
        latencies = parse_latencies(getattr(args, "latencies", None))
        model = load_model(scenario, args.models, parse_calibration(args.calibration), latencies)
        policies = resolve_policies(args.policies)
        guards = parse_guard_overrides(getattr(args, "guard", None))
    except (ScenarioError, OSError, KeyError, ValueError) as exc:
        print(f"apdispatch sim: {exc}", file=sys.stderr)
        return 2
    if args.bench:
        from apdispatch.sim.speed import DEFAULT_POLICY, run

        policy = policies[0] if args.policies != "all" else DEFAULT_POLICY
        return run(model, policy=policy, repeats=args.repeats, seed=args.seed, json_out=args.json)

    seed = scenario.seed if args.seed is None else args.seed
    if getattr(args, "seeds", None) is not None:
        return _main_seeds(args, scenario, model, policies, seed, guards)
    print(
        f"scenario {scenario.name}: {scenario.duration_s:g} s, seed {seed}, "
        f"{len(model.workers)} workers in {len(model.clusters)} clusters, {model.latencies} latencies",
        flush=True,
    )
    started = time.perf_counter()

    def progress(name: str, result: PolicyResult) -> None:
        r = ratios(result.counts)
        print(
            f"[{name}] {result.total} queries: success {100 * r['success_ratio']:.1f} %, "
            f"violations {100 * r['violation_ratio']:.1f} %, rejected {100 * r['rejection_ratio']:.1f} %",
            flush=True,
        )

    report = run_policies(
        model,
        policies,
        seed=seed,
        window_s=args.window,
        progress=progress,
        bound=not args.no_bound,
        bound_rtt=args.bound_rtt,
        make=_checkpointed(getattr(args, "checkpoint", None), guards),
        queue_model=args.queue_model,
        cascade=args.cascade,
    )
    print(f"\n{format_table(report)}")
    print(f"\n{len(policies)} policies x {report.queries} queries in {time.perf_counter() - started:.1f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(report), indent=2) + "\n")
        print(f"report: {args.json}")
    if args.plot is not None:
        from apdispatch.sim.plot import plot_report

        plot_report(report, args.plot)
        print(f"plot: {args.plot}")
    return 0


def _main_seeds(
    args: argparse.Namespace,
    scenario: Scenario,
    model: SimModel,
    policies: list[str],
    seed: int,
    guards: dict[str, Any],
) -> int:
    """``--seeds``: every policy on every seed; means, intervals and paired gaps."""
    from apdispatch.sim import seeds as multi

    try:
        seeds = multi.parse_seeds(args.seeds, seed)
        if getattr(args, "checkpoint", None) is not None:
            # Parallel seeds writing one checkpoint would race; resuming is a one-seed affair.
            raise ValueError("--checkpoint: not with --seeds (run one seed to resume and save)")
    except ValueError as exc:
        print(f"apdispatch sim: {exc}", file=sys.stderr)
        return 2
    print(
        f"scenario {scenario.name}: {scenario.duration_s:g} s, seeds {', '.join(map(str, seeds))}, "
        f"{len(model.workers)} workers in {len(model.clusters)} clusters, {model.latencies} latencies, "
        f"{args.jobs} job(s)",
        flush=True,
    )
    spec = multi.RunSpec(
        scenario=args.scenario,
        duration_s=args.duration,
        models=args.models,
        calibration=args.calibration,
        policies=tuple(policies),
        window_s=args.window,
        bound=not args.no_bound,
        bound_rtt=args.bound_rtt,
        latencies=getattr(args, "latencies", None),
        guards=tuple(guards.items()),
        queue_model=args.queue_model,
        cascade=args.cascade,
    )
    started = time.perf_counter()

    def progress(report: SimReport) -> None:
        best = max(report.results.values(), key=lambda r: ratios(r.counts)["success_ratio"])
        print(
            f"[seed {report.seed}] {report.queries} queries; best {best.policy} "
            f"{100 * ratios(best.counts)['success_ratio']:.1f} %",
            flush=True,
        )

    reports = multi.run_seeds(spec, seeds, jobs=args.jobs, progress=progress)
    print(f"\n{multi.format_table(reports)}")
    print(f"\n{len(policies)} policies x {len(seeds)} seeds in {time.perf_counter() - started:.1f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(multi.to_json(reports), indent=2) + "\n")
        print(f"report: {args.json}")
    if args.plot is not None:
        from apdispatch.sim.plot import plot_report

        plot_report(reports[0], args.plot)  # the timelines of the first seed
        print(f"plot: {args.plot} (seed {reports[0].seed})")
    return 0
