"""Random scenarios from a seed: topologies, SLAs and load patterns the repo's files do not have.

Training on these instead of on the repo's scenario files leaves every
file in ``scenarios/`` held out: the evaluation table then measures how
the shipped policy does on deployments it has never seen. A learned
policy trained on three hand-written scenarios also picks up their
coincidences (there, the most accurate variant was always the farthest),
which a spread of generated ones breaks.

Every scenario uses the model zoo's variants (the manifest), so the
simulator calibrates it as it does the repo's files. Deadlines and load are
drawn against the variants' latencies in a latency profile
(``apdispatch.sim.profile``, the shipped reference by default), so that a
seed gives the same scenario whichever machine built the zoo. The draws:

- 1-4 edge clusters (a gateway-to-Jetson class device: 1-3 slots, linear
  interference, small variants), sometimes a MEC server that runs the
  large variants slowly, and 0-2 cloud clusters (batching GPUs, large
  variants, 15-80 ms round trips with up to 50 % jitter);
- 2-6 apps, each with an accuracy floor taken from a variant of its task
  (or none) and a deadline between 1.3x and 12x the best time a
  qualifying target could serve it in;
- a load pattern (constant, steps up, down-and-up, bursts or a random
  walk) whose peak is 0.4x-1.8x of a rough capacity estimate (at most 600 queries/s).

``generate(seed, manifest, latencies=...)`` gives the document (a dict in the scenario
format of DESIGN.md), ``scenario_toml`` writes it out, and
``generated_scenario`` parses it into a ``Scenario``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apdispatch.common.manifest import MANIFEST_NAME, Manifest, Variant, load_manifest
from apdispatch.scenario import Scenario, ScenarioError, parse_scenario
from apdispatch.sim.profile import LatencyProfile, parse_latencies, reference_profile

DURATION_S = 300.0
MAX_QPS = 600.0
PATTERNS = ("constant", "steps-up", "down-up", "bursts", "walk")


def _tiers(manifest: Manifest) -> dict[str, list[Variant]]:
    """Per task, its variants from the least to the most accurate."""
    tasks: dict[str, list[Variant]] = {}
    for v in manifest.variants:
        tasks.setdefault(v.task, []).append(v)
    return {t: sorted(vs, key=lambda v: v.accuracy) for t, vs in sorted(tasks.items())}


def _loguniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _r(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _device(
    rng: np.random.Generator,
    *,
    speed: tuple[float, float],
    slots: tuple[int, int],
    interference: float,
    idle_w: tuple[float, float],
) -> dict[str, Any]:
    """A device table: speed log-uniform, slots and interference (up to the given) uniform.

    Busy power is 2-4x idle power; one slot has no one to interfere with.
    """
    n = int(rng.integers(slots[0], slots[1] + 1))
    idle = rng.uniform(*idle_w)
    return {
        "speed": _r(_loguniform(rng, *speed)),
        "slots": n,
        "interference": _r(rng.uniform(0.0, interference)) if n > 1 else 0.0,
        "idle_w": _r(idle),
        "busy_w": _r(idle * rng.uniform(2.0, 4.0)),
    }


def generate(
    seed: int, manifest: Manifest, duration_s: float = DURATION_S, latencies: LatencyProfile | None = None
) -> dict[str, Any]:
    """A random scenario document for ``seed`` (the same seed and profile, the same document)."""
    manifest = (reference_profile() if latencies is None else latencies).apply(manifest)
    rng = np.random.default_rng(seed)
    tiers = _tiers(manifest)
    tasks = list(tiers)
    # Edge devices run every variant but the task's most accurate one (the
    # cloud's); the MEC server and the cloud run the most accurate ones.
    light = {t: vs[:-1] or vs for t, vs in tiers.items()}
    heavy = {t: vs[-1:] for t, vs in tiers.items()}

    devices: dict[str, dict[str, Any]] = {}
    clusters: list[dict[str, Any]] = []

    def add_cluster(
        kind: str, name: str, device: dict[str, Any], rtt: float, hosted: list[str], count: int
    ) -> None:
        devices[name] = device
        clusters.append(
            {
                "name": name,
                "kind": kind,
                "rtt_ms": _r(rtt),
                "jitter_ms": _r(rtt * rng.uniform(0.05, 0.5 if kind == "cloud" else 0.3)),
                "workers": [{"device": name, "count": count, "variants": hosted}],
            }
        )

    n_edge = int(rng.integers(1, 5))
    for i in range(n_edge):
        device = _device(rng, speed=(0.0005, 0.003), slots=(1, 3), interference=0.4, idle_w=(2.0, 8.0))
        # One or two tasks, and a non-empty subset of their light variants.
        served = rng.choice(tasks, size=int(rng.integers(1, len(tasks) + 1)), replace=False)
        hosted = []
        for task in sorted(str(t) for t in served):
            options = light[task]
            keep = rng.random(len(options)) < 0.7
            if not keep.any():
                keep[int(rng.integers(len(options)))] = True
            hosted += [v.name for v, k in zip(options, keep, strict=True) if k]
        add_cluster("edge", f"edge-{i + 1}", device, rng.uniform(0.5, 10.0), hosted, int(rng.integers(1, 3)))

    if rng.random() < 0.3:
        # A MEC server: the accurate variants, near, slowly.
        device = _device(rng, speed=(0.004, 0.02), slots=(1, 2), interference=0.3, idle_w=(20.0, 50.0))
        hosted = [v.name for t in tasks for v in heavy[t]]
        add_cluster("edge", "mec", device, rng.uniform(3.0, 12.0), hosted, 1)

    n_cloud = int(rng.choice([0, 1, 1, 2]))
    for i in range(n_cloud):
        device = _device(rng, speed=(0.08, 0.5), slots=(2, 8), interference=0.15, idle_w=(40.0, 80.0))
        batch = int(rng.choice([1, 4, 8]))
        device["max_batch_size"] = batch
        device["max_wait_ms"] = _r(rng.uniform(1.0, 4.0)) if batch > 1 else 0.0
        hosted = [v.name for t in tasks for v in heavy[t]]
        if rng.random() < 0.3:
            hosted += [v.name for t in tasks for v in light[t][-1:]]
        rtt = rng.uniform(15.0, 80.0)
        add_cluster("cloud", f"cloud-{i + 1}", device, rtt, hosted, int(rng.integers(1, 3)))

    # Best-case time of each variant anywhere: round trip plus one request alone.
    best_ms: dict[str, float] = {}
    slot_capacity = 0.0  # requests per second, each worker on its cheapest variant
    for c in clusters:
        device = devices[c["name"]]
        group = c["workers"][0]
        costs = [manifest.variant(n).latency_ms_batch1 / device["speed"] for n in group["variants"]]
        for name, cost in zip(group["variants"], costs, strict=True):
            best_ms[name] = min(best_ms.get(name, math.inf), c["rtt_ms"] + cost)
        per_slot = 1000.0 / min(costs) * (2.0 if device.get("max_batch_size", 1) > 1 else 1.0)
        slot_capacity += group["count"] * device["slots"] * per_slot

    apps = []
    served_tasks = sorted({manifest.variant(n).task for n in best_ms})
    for i in range(int(rng.integers(2, 7))):
        task = str(rng.choice(served_tasks))
        reachable = [v for v in tiers[task] if v.name in best_ms]
        if rng.random() < 0.2:
            floor = 0.5  # any variant will do
        else:
            # Rounded down: the variant the floor was taken from still qualifies.
            source = float(rng.choice([v.accuracy for v in reachable]))
            floor = math.floor(1000.0 * (source - rng.uniform(0.0, 0.03))) / 1000.0
        fastest = min(best_ms[v.name] for v in reachable if v.accuracy >= floor)
        apps.append(
            {
                "name": f"app-{i + 1}",
                "task": task,
                "deadline_ms": _r(min(500.0, max(5.0, fastest * _loguniform(rng, 1.3, 12.0))), 3),
                "min_accuracy": floor,
                "rate_qps": _r(rng.uniform(5.0, 30.0), 3),
                "share": _r(rng.uniform(0.5, 2.0), 3),
            }
        )

    # Peak concurrent streams that offer `load` x the capacity estimate.
    shares = np.array([a["share"] for a in apps])
    rates = np.array([a["rate_qps"] for a in apps])
    per_stream_qps = float((shares * rates).sum() / shares.sum())
    stream_mean_s = _r(rng.uniform(10.0, 40.0), 3)
    load = rng.uniform(0.4, 1.8)
    # A cloud GPU serves thousands per second: offered load stops at
    # MAX_QPS, where the edge is long saturated, so that a run stays short.
    offered_qps = min(MAX_QPS, load * slot_capacity)
    peak = offered_qps / per_stream_qps / stream_mean_s * 60.0
    pattern = str(rng.choice(PATTERNS))
    return {
        "name": f"generated-{seed}",
        "duration_s": duration_s,
        "seed": seed,
        "pattern": pattern,
        "apps": apps,
        "devices": devices,
        "clusters": clusters,
        "arrivals": {"schedule": _schedule(rng, pattern, peak, duration_s), "stream_mean_s": stream_mean_s},
    }


def _schedule(
    rng: np.random.Generator, pattern: str, peak: float, duration_s: float
) -> list[dict[str, float]]:
    if pattern == "constant":
        levels = [1.0]
    elif pattern == "steps-up":
        levels = [0.2, 0.6, 1.0]
    elif pattern == "down-up":
        levels = [0.6, 0.4, 0.2, 0.6]
    elif pattern == "bursts":
        n = int(rng.integers(4, 11))
        levels = [1.0 if k % 2 else 0.15 for k in range(n)]
    else:
        levels = list(rng.uniform(0.1, 1.0, size=int(rng.integers(3, 9))))
    # Levels are relative to the top of the pattern: the peak is the top.
    top = max(levels)
    step = duration_s / len(levels)
    return [
        {"at_s": _r(k * step), "clients_per_min": _r(max(0.5, peak * level / top), 3)}
        for k, level in enumerate(levels)
    ]


def generated_scenario(
    seed: int, manifest: Manifest, duration_s: float = DURATION_S, latencies: LatencyProfile | None = None
) -> Scenario:
    return parse_scenario(generate(seed, manifest, duration_s, latencies))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def scenario_toml(doc: dict[str, Any]) -> str:
    """The document in the scenario file format (what ``load_scenario`` reads back)."""
    lines = [f"# apdispatch generate --seeds {doc['seed']},  load pattern: {doc['pattern']}", ""]
    lines += [f"{k} = {_toml_value(doc[k])}" for k in ("name", "duration_s", "seed")]
    for app in doc["apps"]:
        lines += ["", "[[apps]]", *(f"{k} = {_toml_value(v)}" for k, v in app.items())]
    for name, device in doc["devices"].items():
        lines += ["", f"[devices.{name}]", *(f"{k} = {_toml_value(v)}" for k, v in device.items())]
    for cluster in doc["clusters"]:
        lines += ["", "[[clusters]]", *(f"{k} = {_toml_value(v)}" for k, v in cluster.items())]
    arrivals = doc["arrivals"]
    lines += ["", "[arrivals]", f"schedule = {_toml_value(arrivals['schedule'])}"]
    lines += [f"stream_mean_s = {_toml_value(arrivals['stream_mean_s'])}", ""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from apdispatch.sim.seeds import parse_seeds

    try:
        seeds = parse_seeds(args.seeds, 0)
    except ValueError as exc:
        print(f"apdispatch generate: {exc}", file=sys.stderr)
        return 2
    if not (args.models / MANIFEST_NAME).is_file():
        print(f"apdispatch generate: no model manifest in {args.models} (make models)", file=sys.stderr)
        return 2
    try:
        latencies = parse_latencies(getattr(args, "latencies", None))
        manifest = latencies.apply(load_manifest(args.models))
    except ScenarioError as exc:
        print(f"apdispatch generate: {exc}", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        path = out / f"generated-{seed}.toml"
        path.write_text(scenario_toml(generate(seed, manifest, args.duration, latencies)))
        print(path)
    return 0
