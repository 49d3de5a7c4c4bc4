"""How fast the simulator runs: simulated queries per second of wall time, on one core.

``apdispatch sim SCENARIO --bench`` (or ``python -m apdispatch.sim.speed
[SCENARIO]``) plans the scenario's arrivals once, then simulates them under
one static policy ``--repeats`` times, each on a fresh simulation, pinned to
one CPU where the OS allows it. It prints the median rate and the rate that
99 % of the repeats reached (the 1st percentile: the slow tail).

The rate counts every query of the plan (rejected ones included) over the
time of ``Simulation(...)`` plus ``finish()``: the AP's routing and the
event loop, not the planning of arrivals (shared by every policy of a run).
The headline figure is per CPU second of this process (``process_time``),
which other processes sharing the core do not inflate; the wall-clock rate
is printed beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from apdispatch.policies import make_policy
from apdispatch.scenario import load_scenario
from apdispatch.sim.arrivals import plan_arrivals
from apdispatch.sim.engine import Simulation
from apdispatch.sim.model import SimModel
from apdispatch.sim.profile import REFERENCE, parse_latencies

DEFAULT_SCENARIO = Path("scenarios/sim/mixed-fast.toml")
DEFAULT_POLICY = "fastest"


def pin_to_one_core() -> int | None:
    """Run on one CPU (the first this process may use); None where unsupported."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def bench(model: SimModel, *, policy: str, repeats: int, seed: int | None = None) -> dict[str, Any]:
    scenario = model.scenario
    seed = scenario.seed if seed is None else seed
    arrivals = plan_arrivals(scenario, seed)
    cpu_rates = []
    wall_rates = []
    for _ in range(repeats):
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        sim = Simulation(model, make_policy(policy, seed), arrivals)
        sim.finish()
        cpu_rates.append(len(arrivals) / (time.process_time() - cpu))
        wall_rates.append(len(arrivals) / (time.perf_counter() - wall))
    return {
        "scenario": scenario.name,
        "policy": policy,
        "latencies": model.latencies,
        "queries": len(arrivals),
        "repeats": repeats,
        "median_qps": float(np.median(cpu_rates)),
        "p99_qps": float(np.percentile(cpu_rates, 1)),
        "max_qps": float(np.max(cpu_rates)),
        "wall_median_qps": float(np.median(wall_rates)),
        "wall_p99_qps": float(np.percentile(wall_rates, 1)),
    }


def run(model: SimModel, *, policy: str, repeats: int, seed: int | None, json_out: Path | None) -> int:
    cpu = pin_to_one_core()
    # Other processes on the core lower even the CPU-time rate (caches, switches): the load
    # average says how busy the machine was.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = bench(model, policy=policy, repeats=repeats, seed=seed)
    result["cpu"] = cpu
    result["load_average_1min"] = load
    where = f"cpu {cpu}" if cpu is not None else "one process"
    if load is not None:
        where += f" (load average {load:.2f} on {os.cpu_count()} CPUs)"
    print(
        f"{result['scenario']}, policy {policy}, {model.latencies} latencies: "
        f"{result['queries']} queries x {repeats} runs on {where}\n"
        f"simulated queries per CPU second: median {result['median_qps']:,.0f}, "
        f"p99 {result['p99_qps']:,.0f} (99% of runs at least this), best {result['max_qps']:,.0f}\n"
        f"per wall-clock second: median {result['wall_median_qps']:,.0f}, "
        f"p99 {result['wall_p99_qps']:,.0f} (lower when other processes share the core)"
    )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    from apdispatch.sim.model import load_model

    parser = argparse.ArgumentParser(prog="python -m apdispatch.sim.speed", description=__doc__)
    parser.add_argument("scenario", type=Path, nargs="?", default=DEFAULT_SCENARIO)
    parser.add_argument("--policy", default=DEFAULT_POLICY)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--models", type=Path, default=Path("build/models"))
    parser.add_argument(
        "--latencies", default=REFERENCE, help="reference, measured or a profile file (apdispatch sim's)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    model = load_model(load_scenario(args.scenario), args.models, latencies=parse_latencies(args.latencies))
    return run(model, policy=args.policy, repeats=args.repeats, seed=args.seed, json_out=args.json)


if __name__ == "__main__":
    sys.exit(main())
