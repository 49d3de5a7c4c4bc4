"""The success-ratio upper bound: hand-computed cases, and real schedules it must not fall below."""

from __future__ import annotations

import itertools
import math
import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from apdispatch.common.manifest import Manifest, TensorSpec, Variant
from apdispatch.scenario import Scenario, parse_scenario
from apdispatch.sim.bound import BoundResult, VariantCost, schedulable, upper_bound, variant_costs

pytestmark = pytest.mark.unit


def _scenario(
    apps: list[dict[str, Any]],
    variants: dict[str, dict[str, Any]],
    devices: dict[str, dict[str, Any]],
    clusters: list[dict[str, Any]],
) -> Scenario:
    return parse_scenario(
        {
            "name": "t",
            "duration_s": 1.0,
            "apps": [{"rate_qps": 1.0, "share": 1.0, **a} for a in apps],
            "variants": variants,
            "devices": devices,
            "clusters": clusters,
            "arrivals": {"schedule": [{"at_s": 0, "clients_per_min": 1}]},
        }
    )


def _stream(rate_qps: float, duration_s: float, offset_s: float = 0.0) -> np.ndarray:
    """Evenly spaced arrivals: at offset, offset + 1/rate, ... (rate * duration of them)."""
    return offset_s + np.arange(round(rate_qps * duration_s)) / rate_qps


def _one_worker(
    deadline_ms: float, latency_ms: float = 10.0, rtt_ms: float = 1.0, slots: int = 1
) -> Scenario:
    return _scenario(
        apps=[{"name": "a", "task": "t", "deadline_ms": deadline_ms, "min_accuracy": 0.5}],
        variants={"v": {"task": "t", "accuracy": 0.9, "latency_ms": latency_ms}},
        devices={"d": {"speed": 1.0, "slots": slots}},
        clusters=[
            {"name": "edge", "rtt_ms": rtt_ms, "workers": [{"device": "d", "count": 1, "variants": ["v"]}]}
        ],
    )


# --- hand-computed cases ----------------------------------------------------------------------------


def test_one_slot_serves_half_of_a_stream_twice_its_capacity() -> None:
    # 200 qps for 1 s on one slot of 10 ms: 100 fit in the second of arrivals. The work may
    # run until the last deadline less the RTT (0.995 s + 49 ms): back to back from 0, 104
    # executions end by then: 104 / 200. (The fluid alone, which lets a query use its arrival
    # window from the window's start, says 105: windows 0..104 of 10 ms hold one each.)
    sc = _one_worker(deadline_ms=50.0)
    arrivals = {"a": _stream(200, 1.0)}
    r = upper_bound(sc, arrivals, window_s=0.01, rtt="certain")
    assert r.status == 0 and r.total == 200
    assert r.ok_bound == pytest.approx(104.0, abs=1e-6)
    assert r.success_ratio == pytest.approx(0.52, abs=1e-9)
    assert 0.5 <= r.success_ratio <= 0.5 + (50.0 + 10.0) / 10.0 / 200
    # Coarser windows: never below the true capacity (here the queue row holds them to it).
    coarse = upper_bound(sc, arrivals, window_s=0.1, rtt="certain")
    assert 0.52 <= coarse.success_ratio <= 0.5 + (50.0 + 100.0) / 10.0 / 200
    # A real schedule: admit a query when, queued FIFO behind the admitted ones, it
    # still replies in time (RTT 1 ms, half each way): 104 ok, the bound itself.
    admitted, free_at = [], 0.0
    for q, a in enumerate(arrivals["a"] * 1000.0):
        start = max(a + 0.5, free_at)
        if start + 10.0 + 0.5 - a <= 50.0:
            admitted.append((q, (0, "v")))
            free_at = start + 10.0
    assert _ok_count(sc, _queries(arrivals), admitted, np.full((200, 1), 1.0), 0.5) == 104


def test_app_whose_accuracy_floor_no_variant_reaches_gets_nothing() -> None:
    sc = _scenario(
        apps=[
            {"name": "picky", "task": "t", "deadline_ms": 100.0, "min_accuracy": 0.99},
            {"name": "easy", "task": "t", "deadline_ms": 100.0, "min_accuracy": 0.5},
        ],
        variants={
            "v1": {"task": "t", "accuracy": 0.9, "latency_ms": 1.0},
            "v2": {"task": "t", "accuracy": 0.95, "latency_ms": 2.0},
        },
        devices={"d": {"slots": 4}},
        clusters=[
            {"name": "c", "rtt_ms": 2.0, "workers": [{"device": "d", "count": 2, "variants": ["v1", "v2"]}]}
        ],
    )
    r = upper_bound(sc, {"picky": _stream(30, 1.0), "easy": _stream(10, 1.0)})
    assert r.per_app["picky"].usable == 0 and r.per_app["picky"].allocated == 0
    assert r.per_app["easy"].allocated == pytest.approx(10.0)
    assert r.success_ratio == pytest.approx(10 / 40)


@pytest.mark.parametrize("rtt", ["certain", "expected"])
def test_deadline_shorter_than_every_round_trip_plus_service_gives_zero(rtt: str) -> None:
    sc = _scenario(
        apps=[{"name": "a", "task": "t", "deadline_ms": 12.0, "min_accuracy": 0.5}],
        variants={"v": {"task": "t", "accuracy": 0.9, "latency_ms": 5.0}},
        devices={"fast": {"speed": 2.0, "slots": 8}, "slow": {"speed": 0.5}},
        clusters=[
            {"name": "near", "rtt_ms": 3.0, "workers": [{"device": "slow", "count": 4, "variants": ["v"]}]},
            {"name": "far", "rtt_ms": 10.0, "workers": [{"device": "fast", "count": 4, "variants": ["v"]}]},
        ],
    )
    # near: 3 + 5 / 0.5 = 13 ms; far: 10 + 5 / 2 = 12.5 ms; both > 12 ms.
    r = upper_bound(sc, {"a": _stream(50, 2.0)}, rtt=rtt)  # type: ignore[arg-type]
    assert r.total == 100 and r.ok_bound == 0.0 and r.success_ratio == 0.0
    assert r.per_app["a"].usable == 0


def test_a_deadline_of_exactly_round_trip_plus_service_is_met() -> None:
    # speed 0.5: 5 ms of work takes 10; RTT 3 ms: 13 ms is enough, 12.9 is not.
    def bound(deadline_ms: float) -> float:
        sc = _scenario(
            apps=[{"name": "a", "task": "t", "deadline_ms": deadline_ms, "min_accuracy": 0.5}],
            variants={"v": {"task": "t", "accuracy": 0.9, "latency_ms": 5.0}},
            devices={"d": {"speed": 0.5, "slots": 4}},
            clusters=[{"name": "c", "rtt_ms": 3.0, "workers": [{"device": "d", "variants": ["v"]}]}],
        )
        return upper_bound(sc, {"a": _stream(10, 1.0)}, rtt="certain").success_ratio

    assert bound(13.0) == pytest.approx(1.0)
    assert bound(12.9) == 0.0


def test_ample_capacity_gives_one() -> None:
    sc = _one_worker(deadline_ms=100.0, latency_ms=2.0, slots=4)
    r = upper_bound(sc, {"a": _stream(100, 5.0)}, window_s=0.05)
    assert r.status == 0 and r.success_ratio == pytest.approx(1.0)
    assert r.window_ok.sum() == pytest.approx(500.0)
    assert r.window_queries.sum() == 500


def test_two_apps_share_the_edge_and_only_one_can_use_the_cloud() -> None:
    # edge: one slot, 10 ms -> 100 qps, RTT 1 ms. cloud: two slots, 20 ms -> 100 qps, RTT 40 ms.
    # "ar" (25 ms) only fits on the edge (40 + 20 > 25); "batch" (100 ms) fits on both.
    # ar 120 qps, batch 60 qps, for 10 s. The optimum leaves the edge to ar (1000 of its
    # 1200) and sends all of batch (600) to the cloud: 1600 / 1800. Routing batch to the
    # edge would cost ar what batch takes there. Edge allowance: ar can gain at most
    # (25 ms + 10 ms window) x 100 qps = 3.5 queries.
    sc = _scenario(
        apps=[
            {"name": "ar", "task": "t", "deadline_ms": 25.0, "min_accuracy": 0.8},
            {"name": "batch", "task": "t", "deadline_ms": 100.0, "min_accuracy": 0.8},
        ],
        variants={
            "small": {"task": "t", "accuracy": 0.85, "latency_ms": 10.0},
            "large": {"task": "t", "accuracy": 0.95, "latency_ms": 20.0},
        },
        devices={"edge": {"slots": 1}, "gpu": {"slots": 2}},
        clusters=[
            {"name": "e", "rtt_ms": 1.0, "workers": [{"device": "edge", "count": 1, "variants": ["small"]}]},
            {"name": "c", "rtt_ms": 40.0, "workers": [{"device": "gpu", "count": 1, "variants": ["large"]}]},
        ],
    )
    arrivals = {"ar": _stream(120, 10.0), "batch": _stream(60, 10.0)}
    r = upper_bound(sc, arrivals, window_s=0.01, rtt="certain")
    assert r.status == 0 and r.total == 1800
    assert 1600.0 - 1e-6 <= r.ok_bound <= 1603.5 + 1e-6
    assert r.success_ratio == pytest.approx(1600 / 1800, abs=4 / 1800)
    assert r.per_app["batch"].allocated == pytest.approx(600.0, abs=1e-6)
    assert 1000.0 - 1e-6 <= r.per_app["ar"].allocated <= 1003.5 + 1e-6
    assert r.ok_bound == pytest.approx(r.lp_value, rel=1e-7)  # the dual certificate is tight


def test_expected_mode_counts_the_chance_of_a_short_enough_round_trip() -> None:
    # One target, slack 50 - 5 = 45 ms, RTT 40 +- 5 ms: P(RTT <= 45) = Phi(1).
    sc = _scenario(
        apps=[{"name": "a", "task": "t", "deadline_ms": 50.0, "min_accuracy": 0.5}],
        variants={"v": {"task": "t", "accuracy": 0.9, "latency_ms": 5.0}},
        devices={"d": {"slots": 8}},
        clusters=[
            {"name": "c", "rtt_ms": 40.0, "jitter_ms": 5.0, "workers": [{"device": "d", "variants": ["v"]}]}
        ],
    )
    arrivals = {"a": _stream(20, 10.0)}
    phi1 = 0.5 * math.erfc(-1 / math.sqrt(2))
    expected = upper_bound(sc, arrivals)
    assert expected.kind == "expectation" and expected.success_ratio == pytest.approx(phi1, abs=1e-6)
    certain = upper_bound(sc, arrivals, rtt="certain")  # jitter can bring the RTT down to 0
    assert certain.kind == "pathwise" and certain.success_ratio == pytest.approx(1.0)
    draws = np.maximum(0.0, 40.0 + 5.0 * np.random.default_rng(3).standard_normal((200, 1)))
    realized = upper_bound(sc, arrivals, rtt_ms={"a": draws})
    assert realized.rtt == "realized"
    assert realized.success_ratio == pytest.approx(float(np.mean(draws[:, 0] + 5.0 <= 50.0)))


def test_interference_caps_a_worker_below_its_slot_count() -> None:
    # 2 slots, interference 0.5: two running progress at 2 / 1.5 = 1.33 slots' worth.
    sc = _scenario(
        apps=[{"name": "a", "task": "t", "deadline_ms": 1000.0, "min_accuracy": 0.5}],
        variants={"v": {"task": "t", "accuracy": 0.9, "latency_ms": 10.0}},
        devices={"d": {"slots": 2, "interference": 0.5}},
        clusters=[{"name": "c", "rtt_ms": 0.0, "workers": [{"device": "d", "variants": ["v"]}]}],
    )
    arrivals = {"a": _stream(1000, 1.0)}  # 1000 queries, last deadline at ~2 s
    with_i = upper_bound(sc, arrivals, window_s=0.5, rtt="certain")
    without = upper_bound(sc, arrivals, window_s=0.5, rtt="certain", use_interference=False)
    # The fluid: windows 0..3 (span 2 past the arrival window 0 or 1), 4 x 0.5 s x 133.3 qps =
    # 266.7; the queue row a little less: the worker spends at least 7.5 ms on each query, so it
    # does no more than one machine of 7.5 ms a query, which ends 266 in the 1,999 ms to the
    # last deadline. Without interference the fluid says 4 x 0.5 x 200 = 400, and the queue row
    # again less: one machine of 5 ms a query ends 399.
    assert with_i.ok_bound == pytest.approx(266.0)
    assert without.ok_bound == pytest.approx(399.0)


@pytest.mark.parametrize(
    ("deadline_ms", "worker_ms", "served"),
    [
        (1000.0, 7.5, 266),  # time for both slots at once (x 1.5): 15 ms for two, 7.5 of the worker's each
        # 12 ms allows a slowdown of 1.2 at most: 40 % of the work two at a time (x 1.5), 60 % alone,
        # 0.6 x 10 + 0.4 x 15 / 2 = 9 ms of the worker's time, the least any schedule in time spends.
        (12.0, 9.0, 112),
        (10.0, 10.0, 100),  # no slowdown allowed: alone on the worker, 10 ms
    ],
)
def test_interference_is_credited_only_as_far_as_the_deadline_allows_the_slowdown(
    deadline_ms: float, worker_ms: float, served: int
) -> None:
    sc = _scenario(
        apps=[{"name": "a", "task": "t", "deadline_ms": deadline_ms, "min_accuracy": 0.5}],
        variants={"v": {"task": "t", "accuracy": 0.9, "latency_ms": 10.0}},
        devices={"d": {"slots": 2, "interference": 0.5}},
        clusters=[{"name": "c", "rtt_ms": 0.0, "workers": [{"device": "d", "variants": ["v"]}]}],
    )
    arrivals = {"a": _stream(1000, 1.0)}  # arrival windows 0 and 1 of 0.5 s
    r = upper_bound(sc, arrivals, window_s=0.5, rtt="certain")
    windows = 2 + math.ceil(deadline_ms / 500.0)  # and those the work of the last may reach
    # The fluid credits the worker's time in every window the work may reach (266.7, 166.7,
    # 150); the queue row what one machine spending worker_ms a query ends within the deadline
    # of each: queries 0, w, 2w, ... ms of the 1,000 arriving 1 ms apart.
    assert served == schedulable(arrivals["a"] * 1000.0, worker_ms, deadline_ms)
    assert r.ok_bound == pytest.approx(min(windows * 500.0 / worker_ms, served))


@pytest.mark.parametrize(
    ("deadline_ms", "qps"),
    [
        (100.0, 500.0),  # a batch of 8 takes 16 ms instead of 8 x 10: 2 ms a query -> 500 qps
        (15.0, 4000 / (10 + 3 * 6 / 7)),  # 2 ms RTT + s(b) <= 15 ms: b <= 4, s(4) = 12.57 ms
        (12.5, 100.0),  # not even a batch of 2 fits (2 + 10.86 > 12.5): 10 ms a query
        (11.5, 0.0),  # nothing fits (2 + 10 > 11.5)
    ],
)
def test_batching_is_credited_at_the_best_cost_per_query_that_meets_the_deadline(
    deadline_ms: float, qps: float
) -> None:
    # s(b) = 10 + (b - 1) (16 - 10) / 7 ms on one slot; 1000 qps for 10 s; 100 ms windows,
    # so the work may also use the window after the last arrivals: 10.1 s of capacity.
    sc = _scenario(
        apps=[{"name": "a", "task": "t", "deadline_ms": deadline_ms, "min_accuracy": 0.5}],
        variants={"v": {"task": "t", "accuracy": 0.9, "latency_ms": 10.0, "latency_ms_batch8": 16.0}},
        devices={"gpu": {"slots": 1, "max_batch_size": 8}},
        clusters=[{"name": "c", "rtt_ms": 2.0, "workers": [{"device": "gpu", "variants": ["v"]}]}],
    )
    r = upper_bound(sc, {"a": _stream(1000, 10.0)}, window_s=0.1, rtt="certain")
    assert r.ok_bound == pytest.approx(qps * 10.1, rel=1e-6)


def test_a_fixed_overhead_per_execution_is_not_scaled_by_speed() -> None:
    # 4 ms / speed 0.5 + 2 ms = 10 ms a query: 100 qps on one slot; 1 + 10 ms reaches 11 ms.
    sc = _scenario(
        apps=[{"name": "a", "task": "t", "deadline_ms": 11.0, "min_accuracy": 0.5}],
        variants={"v": {"task": "t", "accuracy": 0.9, "latency_ms": 4.0}},
        devices={"d": {"speed": 0.5}},
        clusters=[{"name": "c", "rtt_ms": 1.0, "workers": [{"device": "d", "variants": ["v"]}]}],
    )
    table = {"v": VariantCost("v", "t", 0.9, 4.0, None, overhead_ms=2.0)}
    r = upper_bound(sc, {"a": _stream(200, 10.0)}, table, window_s=0.1, rtt="certain")
    # Each query must start as it arrives (1 + 10 = 11 ms): every other one, 1,000. (The fluid
    # alone says 1,010: it lets the work of the last arrivals use the window after them.)
    assert r.ok_bound == pytest.approx(100 * 10)
    late = {"v": VariantCost("v", "t", 0.9, 4.0, None, overhead_ms=2.5)}
    assert upper_bound(sc, {"a": _stream(200, 10.0)}, late, rtt="certain").ok_bound == 0.0


def test_variant_table_takes_the_scenario_over_the_manifest() -> None:
    spec = TensorSpec(name="x", datatype="FP32", shape=(-1, 4))
    manifest = Manifest(
        root=Path("/nonexistent"),
        variants=tuple(
            Variant(n, "t", "onnx", f"{n}.onnx", 0.9, 1, 1, 1.0, 2.0, (spec,), (spec,)) for n in ("v", "w")
        ),
    )
    sc = _one_worker(deadline_ms=100.0, latency_ms=7.0)
    table = variant_costs(sc, manifest)
    assert table["v"].latency_ms == 7.0 and table["v"].latency_ms_batch8 is None
    assert table["w"].latency_ms == 1.0 and table["w"].latency_ms_batch8 == 2.0


def test_inputs_are_checked() -> None:
    sc = _one_worker(deadline_ms=100.0)
    with pytest.raises(KeyError, match="nope"):
        upper_bound(sc, {"nope": [0.0]})
    with pytest.raises(ValueError, match="shape"):
        upper_bound(sc, {"a": [0.0, 0.1]}, rtt_ms={"a": np.zeros((3, 1))})
    empty = upper_bound(sc, {})
    assert empty.total == 0 and empty.success_ratio == 1.0


# --- real schedules under the simulator's device model ------------------------------------------------


@dataclass(frozen=True)
class _Worker:
    cluster: int
    speed: float
    slots: int
    interference: float
    max_batch: int
    variants: tuple[str, ...]


def _workers(sc: Scenario) -> list[_Worker]:
    out = []
    for ci, cluster in enumerate(sc.clusters):
        for group in cluster.workers:
            d = sc.devices[group.device]
            for _ in range(group.count):
                out.append(_Worker(ci, d.speed, d.slots, d.interference, d.max_batch_size, group.variants))
    return out


def _queries(arrivals: dict[str, np.ndarray]) -> list[tuple[float, str]]:
    """(arrival s, app) in the order of the rows of rtt_ms: app by app, as given."""
    return [(float(t), app) for app, times in arrivals.items() for t in times]


def _run_worker(sc: Scenario, w: _Worker, jobs: list[tuple[float, int, str]]) -> dict[int, float]:
    """Completion time (ms) of each job (arrival at the worker in ms, id, variant): FIFO,
    batches of the head's variant, n running progress at 1 / (1 + interference (n - 1))."""
    jobs = sorted(jobs)
    queue: deque[tuple[float, int, str]] = deque()
    running: list[list[Any]] = []  # [remaining work ms, [ids]]
    done: dict[int, float] = {}
    t, i = 0.0, 0
    while i < len(jobs) or queue or running:
        while queue and len(running) < w.slots:
            v = queue[0][2]
            members = [j for j in queue if j[2] == v][: max(1, w.max_batch)]
            for j in members:
                queue.remove(j)
            spec = sc.variants[v]
            t1 = spec.latency_ms / w.speed
            t8 = (spec.latency_ms if spec.latency_ms_batch8 is None else spec.latency_ms_batch8) / w.speed
            running.append([t1 + (len(members) - 1) / 7 * (t8 - t1), [j[1] for j in members]])
        rate = 1.0 / (1.0 + w.interference * (len(running) - 1)) if running else 0.0
        next_arrival = jobs[i][0] if i < len(jobs) else math.inf
        next_done = t + min(r[0] for r in running) / rate if running else math.inf
        now = min(next_arrival, next_done)
        for r in running:
            r[0] -= (now - t) * rate
        t = now
        for r in [r for r in running if r[0] <= 1e-9]:
            running.remove(r)
            done.update((q, t) for q in r[1])
        if next_arrival <= next_done:
            queue.append(jobs[i])
            i += 1
    return done


def _ok_count(
    sc: Scenario,
    queries: list[tuple[float, str]],
    assignment: list[tuple[int, tuple[int, str]]],
    rtt: np.ndarray,
    split: float,
) -> int:
    """ok queries when query q goes to (worker, variant); the RTT splits split : 1 - split."""
    workers = _workers(sc)
    by_worker: dict[int, list[tuple[float, int, str]]] = {}
    for q, (wi, v) in assignment:
        a_ms = queries[q][0] * 1000.0
        r = rtt[q, workers[wi].cluster]
        by_worker.setdefault(wi, []).append((a_ms + split * r, q, v))
    variant = {q: v for q, (_, v) in assignment}
    ok = 0
    for wi, jobs in by_worker.items():
        for q, end in _run_worker(sc, workers[wi], jobs).items():
            app = sc.app(queries[q][1])
            reply = end + (1 - split) * rtt[q, workers[wi].cluster]
            if sc.variants[variant[q]].accuracy >= app.min_accuracy:
                ok += reply - queries[q][0] * 1000.0 <= app.deadline_ms
    return ok


def _options(sc: Scenario, app_name: str) -> list[tuple[int, str]]:
    """Accurate enough targets of the app, quickest first."""
    app = sc.app(app_name)
    workers = _workers(sc)
    return sorted(
        (
            (wi, v)
            for wi, w in enumerate(workers)
            for v in w.variants
            if sc.variants[v].task == app.task and sc.variants[v].accuracy >= app.min_accuracy
        ),
        key=lambda t: sc.variants[t[1]].latency_ms / workers[t[0]].speed,
    )


def _random_instance(rng: random.Random, n_queries: int) -> tuple[Scenario, dict[str, np.ndarray]]:
    """Few workers, deadlines a few service times long, load around their capacity."""
    tasks = ["t1", "t2"][: rng.randint(1, 2)]
    variants: dict[str, dict[str, Any]] = {
        f"{task}-{k}": {
            "task": task,
            "accuracy": rng.uniform(0.6, 1.0),
            "latency_ms": (lat := rng.uniform(2.0, 12.0)),
            **({"latency_ms_batch8": lat * rng.uniform(1.0, 8.0)} if rng.random() < 0.7 else {}),
        }
        for task in tasks
        for k in range(rng.randint(1, 3))
    }
    devices: dict[str, dict[str, Any]] = {
        f"d{k}": {
            "speed": rng.uniform(0.5, 2.0),
            "slots": rng.randint(1, 3),
            "interference": rng.choice([0.0, rng.uniform(0.0, 0.6)]),
            "max_batch_size": rng.choice([1, 1, 4, 8]),
        }
        for k in range(rng.randint(1, 2))
    }
    clusters: list[dict[str, Any]] = [
        {
            "name": f"c{k}",
            "rtt_ms": rng.uniform(0.0, 15.0),
            "jitter_ms": rng.choice([0.0, rng.uniform(0.0, 5.0)]),
            "workers": [
                {
                    "device": rng.choice(sorted(devices)),
                    "count": rng.randint(1, 2),
                    "variants": rng.sample(sorted(variants), rng.randint(1, len(variants))),
                }
            ],
        }
        for k in range(rng.randint(1, 2))
    ]
    apps: list[dict[str, Any]] = [
        {
            "name": f"a{k}",
            "task": rng.choice(tasks),
            "deadline_ms": rng.uniform(20.0, 80.0),
            "min_accuracy": rng.uniform(0.5, 0.9),
        }
        for k in range(rng.randint(1, 3))
    ]
    sc = _scenario(apps, variants, devices, clusters)
    # Slot-seconds the queries would need at batch size 1, over the slots there are, times a load factor.
    work_s = float(np.mean([v["latency_ms"] for v in variants.values()])) / 1000.0
    slots = sum(devices[g["device"]]["slots"] * g["count"] for c in clusters for g in c["workers"])
    horizon = n_queries * work_s / slots / rng.uniform(0.7, 3.0)
    return sc, _arrivals(rng, [a["name"] for a in apps], n_queries, horizon)


def _tiny_instance(rng: random.Random, n_queries: int) -> tuple[Scenario, dict[str, np.ndarray]]:
    """One worker (sometimes two), a burst of queries, deadlines of one to four service times."""
    variants: dict[str, dict[str, Any]] = {
        f"v{k}": {
            "task": "t",
            "accuracy": rng.uniform(0.7, 1.0),
            "latency_ms": (lat := rng.uniform(4.0, 10.0)),
            **({"latency_ms_batch8": lat * rng.uniform(1.0, 8.0)} if rng.random() < 0.5 else {}),
        }
        for k in range(rng.randint(1, 2))
    }
    devices: dict[str, dict[str, Any]] = {
        "d": {
            "slots": rng.randint(1, 2),
            "interference": rng.choice([0.0, rng.uniform(0.0, 0.6)]),
            "max_batch_size": rng.choice([1, 4]),
        }
    }
    clusters: list[dict[str, Any]] = [
        {
            "name": f"c{k}",
            "rtt_ms": rng.uniform(0.0, 4.0),
            "jitter_ms": rng.choice([0.0, 1.0]),
            "workers": [{"device": "d", "count": 1, "variants": sorted(variants)}],
        }
        for k in range(rng.randint(1, 2))
    ]
    apps: list[dict[str, Any]] = [
        {
            "name": f"a{k}",
            "task": "t",
            "deadline_ms": rng.uniform(8.0, 25.0),
            "min_accuracy": rng.uniform(0.6, 0.8),
        }
        for k in range(rng.randint(1, 2))
    ]
    sc = _scenario(apps, variants, devices, clusters)
    return sc, _arrivals(rng, [a["name"] for a in apps], n_queries, rng.uniform(0.002, 0.015))


def _arrivals(rng: random.Random, apps: list[str], n_queries: int, horizon_s: float) -> dict[str, np.ndarray]:
    """n_queries uniform over [0, horizon_s), each of a random app."""
    times = sorted(rng.uniform(0.0, horizon_s) for _ in range(n_queries))
    names = [rng.choice(apps) for _ in times]
    return {a: np.array([t for t, n in zip(times, names, strict=True) if n == a]) for a in apps}


def _draw_rtts(rng: random.Random, sc: Scenario, n: int) -> np.ndarray:
    return np.array([[max(0.0, rng.gauss(c.rtt_ms, c.jitter_ms)) for c in sc.clusters] for _ in range(n)])


def _bound(sc: Scenario, arrivals: dict[str, np.ndarray], rtt: np.ndarray, window_s: float) -> BoundResult:
    rows, start = {}, 0
    for app, times in arrivals.items():
        rows[app] = rtt[start : start + len(times)]
        start += len(times)
    return upper_bound(sc, arrivals, window_s=window_s, rtt_ms=rows)


@pytest.mark.parametrize("seed", range(12))
def test_bound_is_above_the_best_of_all_assignments_on_tiny_instances(seed: int) -> None:
    rng = random.Random(seed)
    sc, arrivals = _tiny_instance(rng, n_queries=7)
    queries = _queries(arrivals)
    rtt = _draw_rtts(rng, sc, len(queries))
    split = rng.random()
    options = [[None, *_options(sc, app)[:2]] for _, app in queries]
    best = 0
    for choice in itertools.product(*options):
        assignment = [(q, c) for q, c in enumerate(choice) if c is not None]
        best = max(best, _ok_count(sc, queries, assignment, rtt, split))
    for window_s in (0.001, 0.005, 0.05):
        r = _bound(sc, arrivals, rtt, window_s)
        assert r.status == 0
        assert r.ok_bound >= best - 1e-6, (window_s, r.ok_bound, best)


@pytest.mark.parametrize("seed", range(20))
def test_bound_is_above_greedy_and_random_schedules(seed: int) -> None:
    rng = random.Random(1000 + seed)
    sc, arrivals = _random_instance(rng, n_queries=60)
    queries = _queries(arrivals)
    rtt = _draw_rtts(rng, sc, len(queries))
    split = rng.random()
    order = sorted(range(len(queries)), key=lambda q: queries[q][0])

    # Greedy with hindsight: each query, in arrival order, goes where it adds the most ok
    # queries to the schedule so far (simulated), or nowhere.
    greedy: list[tuple[int, tuple[int, str]]] = []
    current = 0
    for q in order:
        best_gain, best_target = 0, None
        for target in _options(sc, queries[q][1]):
            gain = _ok_count(sc, queries, [*greedy, (q, target)], rtt, split) - current
            if gain > best_gain:
                best_gain, best_target = gain, target
        if best_target is not None:
            greedy.append((q, best_target))
            current += best_gain
    randomly = [(q, rng.choice(opts)) for q in order if (opts := _options(sc, queries[q][1]))]
    achieved = max(current, _ok_count(sc, queries, randomly, rtt, split))

    window_s = rng.choice([0.002, 0.005, 0.02])
    r = _bound(sc, arrivals, rtt, window_s)
    assert r.status == 0
    assert r.ok_bound >= achieved - 1e-6, (window_s, r.ok_bound, achieved)
    certain = upper_bound(sc, arrivals, window_s=window_s, rtt="certain")
    assert certain.ok_bound >= r.ok_bound - 1e-6  # the least certain RTTs only add usable targets


# -- one worker's queue: what a fluid misses --------------------------------------------


def _pairs_on(count: int) -> Scenario:
    # 10 ms a query on a 1-slot worker (count of them), 1 ms RTT, 15 ms deadline: a query
    # must start within 4 ms of its arrival, so of two arriving 1 ms apart one worker serves one.
    return _scenario(
        apps=[{"name": "a", "task": "t", "deadline_ms": 15.0, "min_accuracy": 0.5}],
        variants={"v": {"task": "t", "accuracy": 0.9, "latency_ms": 10.0}},
        devices={"d": {"speed": 1.0, "slots": 1}},
        clusters=[
            {"name": "c", "rtt_ms": 1.0, "workers": [{"device": "d", "count": count, "variants": ["v"]}]}
        ],
    )


@pytest.mark.parametrize(("count", "served"), [(1, 10), (2, 20)])
def test_a_one_slot_worker_serves_one_query_of_a_burst_the_fluid_would_share(count: int, served: int) -> None:
    pairs = np.sort(np.concatenate([_stream(10, 1.0), _stream(10, 1.0, offset_s=0.001)]))
    r = upper_bound(_pairs_on(count), {"a": pairs}, window_s=0.1, rtt="certain")
    assert r.ok_bound == pytest.approx(served)


def test_a_shared_worker_serves_only_what_its_slowdown_leaves_time_for() -> None:
    # Bursts of 6 queries on a 2-slot worker, 10 ms alone, 15 ms each when two run (interference
    # 0.5), 30 ms deadline: any schedule holds at least 7.5 ms of the worker per query, so 4 of
    # each burst at most (two pairs), not the 6 that two slots at full speed would run.
    scenario = _scenario(
        apps=[{"name": "a", "task": "t", "deadline_ms": 30.0, "min_accuracy": 0.5}],
        variants={"v": {"task": "t", "accuracy": 0.9, "latency_ms": 10.0}},
        devices={"d": {"speed": 1.0, "slots": 2, "interference": 0.5}},
        clusters=[{"name": "c", "rtt_ms": 0.0, "workers": [{"device": "d", "count": 1, "variants": ["v"]}]}],
    )
    bursts = np.repeat(np.arange(10.0), 6)
    r = upper_bound(scenario, {"a": bursts}, window_s=0.1, rtt="certain")
    assert r.ok_bound == pytest.approx(40)


def _brute_force(times: list[float], work: float, within: float) -> int:
    """Most queries one machine can run, each whole in [arrival, arrival + within]: every subset."""
    best = 0
    for mask in range(1 << len(times)):
        chosen = [t for i, t in enumerate(times) if mask >> i & 1]
        if len(chosen) <= best:
            continue
        end = -math.inf
        fits = True
        for t in chosen:  # in arrival order: the windows are all as long, so this order is best
            end = max(end, t) + work
            fits = fits and end <= t + within + 1e-9
        if fits:
            best = len(chosen)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_greedy_schedule_is_the_most_a_machine_can_serve(seed: int) -> None:
    rng = np.random.default_rng(seed)
    times = np.sort(rng.uniform(0.0, 40.0, size=int(rng.integers(1, 10)))).tolist()
    work = float(rng.uniform(2.0, 10.0))
    within = work + float(rng.uniform(0.0, 12.0))
    assert schedulable(np.asarray(times), work, within) == _brute_force(times, work, within)
