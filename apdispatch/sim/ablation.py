"""``apdispatch ablate SCENARIO...``: what each layer of the learned policy adds, seed by seed.

On the same arrivals (seed by seed), the layers of ``learned`` one on top of
the other:

- ``slack``: the rule alone (the farthest target still in time);
- ``slack-guarded``: the rule after the guards;
- ``learned-frozen``: the guards and the shipped network, whose updates are
  off (the guards still learn their margins and reservations);
- ``learned``: the same, learning online;
- ``learned-stopped``: ``learned`` until ``--stop-learning-s`` (60 s), then
  nothing more learned, by the network or the guards: what it learned until
  then stays in force;

beside the best of the static policies given (``--statics``). Each layer's
gain is the paired difference of success ratios, in points, with its 95 %
interval over the seeds (Student t) and the seeds it won. ``OUT/NAME.json``
holds every figure; ``OUT/table.md`` one row per scenario.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apdispatch.learned.guard_config import parse_guard_overrides
from apdispatch.policies import STATIC_POLICIES
from apdispatch.scenario import ScenarioError, load_scenario
from apdispatch.sim import seeds as multi
from apdispatch.sim.profile import REFERENCE, parse_latencies
from apdispatch.sim.results import DEFAULT_WINDOW_S

LAYERS: tuple[str, ...] = ("slack", "slack-guarded", "learned-frozen", "learned-stopped", "learned")
BEST_STATIC = "best static"


@dataclass(frozen=True, slots=True)
class Step:
    """One comparison: ``policy`` minus ``base``, what ``adds`` names."""

    adds: str
    policy: str
    base: str


STEPS: tuple[Step, ...] = (
    Step("the guards", "slack-guarded", "slack"),
    Step("the network", "learned-frozen", "slack-guarded"),
    Step("the network's updates", "learned", "learned-frozen"),
    Step("learning after the first minute", "learned", "learned-stopped"),
    Step("`learned` over `slack-guarded`", "learned", "slack-guarded"),
    Step("`learned` over the best static", "learned", BEST_STATIC),
)


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """``a - b`` seed by seed (ratios in, points out): mean, 95 % half-width, seeds won, per seed."""
    per_seed = [100.0 * (x - y) for x, y in zip(a, b, strict=True)]
    half = multi.ci95(per_seed)
    return {
        "mean": round(sum(per_seed) / len(per_seed), 4),
        "ci95": None if half is None else round(half, 4),
        "wins": sum(1 for g in per_seed if g > 0),
        "losses": sum(1 for g in per_seed if g < 0),
        "per_seed": [round(g, 4) for g in per_seed],
    }


def ablate(doc: dict[str, Any], statics: Sequence[str]) -> dict[str, Any]:
    """The steps' paired gaps from a ``seeds.to_json`` document of the layers and ``statics``."""
    policies = doc["policies"]
    best = max(statics, key=lambda name: policies[name]["success_ratio"])
    per_seed = {name: policies[name]["success_per_seed"] for name in (*LAYERS, *statics)}
    per_seed[BEST_STATIC] = per_seed[best]
    return {
        "best_static": best,
        "steps": {
            s.adds: {"policy": s.policy, "base": s.base, **paired(per_seed[s.policy], per_seed[s.base])}
            for s in STEPS
        },
    }


def _gap(g: dict[str, Any]) -> str:
    text = f"{g['mean']:+.2f}" + ("" if g["ci95"] is None else f" ± {g['ci95']:.2f}")
    return f"{text} ({g['wins']}/{len(g['per_seed'])})"


HEADER = ["scenario", "best static", *(f"`{name}`" for name in LAYERS), *(s.adds for s in STEPS)]


def table_row(doc: dict[str, Any], path: Path) -> list[str]:
    policies = doc["policies"]
    best = doc["ablation"]["best_static"]
    cells = [f"[{doc['scenario']}]({path.as_posix()})", f"{best} {100 * policies[best]['success_ratio']:.2f}"]
    cells += [f"{100 * policies[name]['success_ratio']:.2f}" for name in LAYERS]
    cells += [_gap(doc["ablation"]["steps"][s.adds]) for s in STEPS]
    return cells


def markdown(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(args: argparse.Namespace) -> int:
    try:
        scenarios = [(path, load_scenario(path)) for path in args.scenarios]
        statics = [s.strip() for s in args.statics.split(",") if s.strip()] or list(STATIC_POLICIES)
        unknown = [s for s in statics if s not in STATIC_POLICIES]
        if unknown:
            raise ValueError(f"--statics: unknown {', '.join(unknown)} (known: {', '.join(STATIC_POLICIES)})")
        seeds = multi.parse_seeds(args.seeds, scenarios[0][1].seed if args.seed is None else args.seed)
        latencies: str = getattr(args, "latencies", None) or REFERENCE
        parse_latencies(latencies)
        guards = parse_guard_overrides(getattr(args, "guard", None))
        stop_learning_s = multi.STOP_LEARNING_S if args.stop_learning_s is None else args.stop_learning_s
        if not stop_learning_s >= 0.0:
            raise ValueError("--stop-learning-s: must be >= 0")
    except (ScenarioError, OSError, ValueError) as exc:
        print(f"apdispatch ablate: {exc}", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    started = time.perf_counter()
    for path, scenario in scenarios:
        t0 = time.perf_counter()
        spec = multi.RunSpec(
            scenario=path,
            duration_s=args.duration,
            models=args.models,
            calibration=None,
            policies=(*statics, *LAYERS),
            window_s=DEFAULT_WINDOW_S,
            bound=False,
            latencies=latencies,
            guards=tuple(guards.items()),
            stop_learning_s=stop_learning_s,
        )
        doc = multi.to_json(multi.run_seeds(spec, seeds, jobs=args.jobs))
        doc["ablation"] = ablate(doc, statics)
        doc["stop_learning_s"] = stop_learning_s
        doc["command"] = " ".join(
            ["apdispatch ablate", path.as_posix(), f"--statics {','.join(statics)}", f"--seeds {args.seeds}"]
            + ([] if args.seed is None else [f"--seed {args.seed}"])
            + ([] if args.duration is None else [f"--duration {args.duration:g}"])
            + [f"--guard {k}={v}" for k, v in guards.items()]
            + ([] if args.stop_learning_s is None else [f"--stop-learning-s {stop_learning_s:g}"])
        )
        (out / f"{scenario.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
        rows.append(table_row(doc, path))
        print(f"{scenario.name} ({time.perf_counter() - t0:.0f} s): " + ", ".join(rows[-1][1:]), flush=True)
    table = markdown(rows)
    note = (
        f"\nSuccess ratio, %, mean over seeds {', '.join(map(str, seeds))}; each gain is the paired "
        f"difference in points, ± its 95 % interval (Student t), with the seeds it won "
        f"(`apdispatch ablate`, {latencies} latencies, statics {', '.join(statics)}).\n"
    )
    (out / "table.md").write_text(table + "\n" + note)
    print(f"\n{table}\n{note}\n{len(scenarios)} scenarios in {time.perf_counter() - started:.0f} s")
    return 0


__all__ = ["LAYERS", "STEPS", "ablate", "main", "markdown", "paired", "table_row"]
