"""The simulator: determinism, bookkeeping, and small cases checked by hand."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from apdispatch.cli import main as cli_main
from apdispatch.common.confidence import acceptance_for
from apdispatch.common.errors import RejectedError
from apdispatch.common.manifest import load_manifest
from apdispatch.policies import STATIC_POLICIES, Candidate, RequestView, make_policy
from apdispatch.routing.estimator import LatencyEstimator
from apdispatch.routing.router import Router, admit
from apdispatch.scenario import Scenario, ScenarioError, load_scenario, parse_scenario
from apdispatch.sim.arrivals import Queries, plan_arrivals
from apdispatch.sim.calibration import Calibration, batch_latency_ms, fit_calibration
from apdispatch.sim.engine import INACCURATE, LATE, OK, OUTCOMES, REJECTED, Simulation
from apdispatch.sim.env import DispatchEnv
from apdispatch.sim.model import SimModel, build_model, load_model
from apdispatch.sim.profile import MEASURED_PROFILE, load_profile, reference_profile
from apdispatch.sim.results import run_policies, simulate, to_json
from apdispatch.tools.topology import build_topology

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((ROOT / "scenarios").rglob("*.toml"))
SIM_SCENARIOS = sorted((ROOT / "scenarios" / "sim").glob("*.toml"))


# -- tiny scenarios, with their own variants (no model manifest needed) -------------------


def tiny(
    *,
    latency_ms: float = 4.0,
    latency_ms_batch8: float | None = None,
    slots: int = 1,
    interference: float = 0.0,
    rtt_ms: float = 0.0,
    jitter_ms: float = 0.0,
    deadline_ms: float = 100.0,
    min_accuracy: float = 0.5,
    kind: str = "edge",
    max_batch_size: int = 1,
    max_wait_ms: float = 0.0,
    idle_w: float = 0.0,
    busy_w: float = 0.0,
    duration_s: float = 1.0,
    clients_per_min: float = 1.0,
) -> SimModel:
    """One app, one worker serving one variant ("v", accuracy 0.9)."""
    variant: dict[str, Any] = {"task": "t", "accuracy": 0.9, "latency_ms": latency_ms}
    if latency_ms_batch8 is not None:
        variant["latency_ms_batch8"] = latency_ms_batch8
    doc = {
        "name": "tiny",
        "duration_s": duration_s,
        "apps": [
            {
                "name": "a",
                "task": "t",
                "deadline_ms": deadline_ms,
                "min_accuracy": min_accuracy,
                "rate_qps": 1.0,
            }
        ],
        "variants": {"v": variant},
        "devices": {
            "d": {
                "speed": 1.0,
                "slots": slots,
                "interference": interference,
                "idle_w": idle_w,
                "busy_w": busy_w,
                "max_batch_size": max_batch_size,
                "max_wait_ms": max_wait_ms,
            }
        },
        "clusters": [
            {
                "name": "c",
                "kind": kind,
                "rtt_ms": rtt_ms,
                "jitter_ms": jitter_ms,
                "workers": [{"device": "d", "count": 1, "variants": ["v"]}],
            }
        ],
        "arrivals": {"schedule": [{"at_s": 0, "clients_per_min": clients_per_min}]},
    }
    return build_model(parse_scenario(doc))


def fixed(times_ms: list[float], z: list[float] | None = None, duration_s: float = 1.0) -> Queries:
    """Queries of app 0 at exactly these times (jitter draws ``z``, default 0)."""
    n = len(times_ms)
    return Queries(
        times_ms=np.asarray(times_ms, dtype=np.float64),
        apps=np.zeros(n, dtype=np.int64),
        jitter_z=np.asarray(z if z is not None else [0.0] * n, dtype=np.float64),
        streams=1,
        duration_s=duration_s,
    )


def run(model: SimModel, arrivals: Queries, policy: str = "fastest") -> Simulation:
    sim = Simulation(model, make_policy(policy), arrivals)
    sim.finish()
    return sim


def counts(sim: Simulation) -> dict[str, int]:
    totals = sim.table().sum(axis=(0, 1))
    return {name: int(totals[i]) for i, name in enumerate(OUTCOMES)}


def latencies(sim: Simulation) -> list[float]:
    return [round(x, 9) for x in sim.latencies]


# -- hand-checkable cases ------------------------------------------------------------------


def test_one_slot_fifo_queueing() -> None:
    # 4 ms of work, 2 ms round trip (1 ms each way), a query every 2 ms: each
    # waits for the one before. Replies at 6, 10, 14 ms; arrivals 0, 2, 4.
    sim = run(tiny(latency_ms=4.0, rtt_ms=2.0), fixed([0.0, 2.0, 4.0]))
    assert latencies(sim) == [6.0, 8.0, 10.0]
    assert counts(sim)["ok"] == 3


def test_no_queueing_when_spaced() -> None:
    sim = run(tiny(latency_ms=4.0, rtt_ms=2.0), fixed([0.0, 10.0, 20.0]))
    assert latencies(sim) == [6.0, 6.0, 6.0]


def test_interference_slows_concurrent_requests_linearly() -> None:
    # Two slots, interference 0.5: two at once each run at 1 / 1.5.
    sim = run(tiny(latency_ms=4.0, slots=2, interference=0.5), fixed([0.0, 0.0]))
    assert latencies(sim) == [6.0, 6.0]
    # Staggered: q0 alone for 2 ms (2 of 4 done), then both at 2/3: q0 ends at
    # 2 + 2 / (2/3) = 5; q1 did 2 by then, alone again it ends at 7.
    sim = run(tiny(latency_ms=4.0, slots=2, interference=0.5), fixed([0.0, 2.0]))
    assert latencies(sim) == [5.0, 5.0]


def test_more_than_slots_wait_in_the_queue() -> None:
    # Two slots, no interference, three at once: the third starts at 4.
    sim = run(tiny(latency_ms=4.0, slots=2), fixed([0.0, 0.0, 0.0]))
    assert latencies(sim) == [4.0, 4.0, 8.0]


def test_batching_waits_at_most_max_wait() -> None:
    # Cloud worker, batches of up to 4, max_wait 3 ms: queries at 0, 1, 2 form
    # one batch when the first has waited 3 ms; a batch of 3 takes
    # 7 + (14 - 7) * 2 / 7 = 9 ms, so it ends at 12.
    model = tiny(
        kind="cloud", latency_ms=7.0, latency_ms_batch8=14.0, max_batch_size=4, max_wait_ms=3.0, slots=1
    )
    sim = run(model, fixed([0.0, 1.0, 2.0]))
    assert latencies(sim) == [12.0, 11.0, 10.0]


def test_full_batch_starts_without_waiting() -> None:
    model = tiny(
        kind="cloud", latency_ms=7.0, latency_ms_batch8=14.0, max_batch_size=4, max_wait_ms=3.0, slots=1
    )
    # The fourth query fills the batch at 1.5 ms; a batch of 4 takes 10 ms.
    sim = run(model, fixed([0.0, 0.5, 1.0, 1.5]))
    assert latencies(sim) == [11.5, 11.0, 10.5, 10.0]
    # A fifth arriving while the slot is busy waits for the next batch: it
    # starts when the slot frees at 11.5 (its max_wait passed by then), alone.
    sim = run(model, fixed([0.0, 0.5, 1.0, 1.5, 2.0]))
    assert latencies(sim)[-1] == 11.5 + 7.0 - 2.0


def test_batch_latency_interpolation() -> None:
    assert batch_latency_ms(1.0, 8.0, 1) == 1.0
    assert batch_latency_ms(1.0, 8.0, 8) == 8.0
    assert batch_latency_ms(1.0, 8.0, 4) == pytest.approx(4.0)


def test_rtt_jitter_is_normal_cut_at_zero_and_split_in_halves() -> None:
    # Each query's round trip is rtt + jitter * z, cut at 0: z = -10 gives 0.
    model = tiny(latency_ms=1.0, rtt_ms=10.0, jitter_ms=2.0)
    sim = run(model, fixed([0.0, 100.0, 200.0], z=[0.0, 1.5, -10.0]))
    assert latencies(sim) == [11.0, 14.0, 1.0]


def test_planned_jitter_stays_within_its_draws() -> None:
    # Many slots: no query waits, so each takes 1 ms plus its own round trip.
    model = tiny(latency_ms=1.0, slots=1000, rtt_ms=10.0, jitter_ms=2.0, duration_s=60.0, clients_per_min=30)
    arrivals = plan_arrivals(model.scenario, seed=3)
    assert len(arrivals) > 100
    sim = run(model, arrivals)
    got = np.frombuffer(sim.latencies, dtype=np.float64)
    expected = 1.0 + np.maximum(0.0, 10.0 + 2.0 * arrivals.jitter_z)
    assert np.allclose(np.sort(got), np.sort(expected))
    assert got.min() >= 1.0


def test_energy_idle_plus_busy_share_of_slots() -> None:
    # Two slots, 2 W idle, 10 W busy; two queries of 4 ms that never overlap:
    # 8 ms with one of two slots running: 2 W * 1 s + 8 W * 0.008 s / 2.
    model = tiny(latency_ms=4.0, slots=2, idle_w=2.0, busy_w=10.0, duration_s=1.0)
    sim = run(model, fixed([0.0, 100.0]))
    assert sim.energy_j() == pytest.approx(2.0 + 8.0 * 0.008 / 2)
    # Both at once, interference 1: each takes 8 ms with two running.
    model = tiny(latency_ms=4.0, slots=2, interference=1.0, idle_w=2.0, busy_w=10.0)
    sim = run(model, fixed([0.0, 0.0]))
    assert sim.energy_j() == pytest.approx(2.0 + 8.0 * 0.008 * 2 / 2)


def test_a_request_past_its_deadline_is_dropped_by_the_worker() -> None:
    # Two slots, interference 1, 10 ms of work, 18 ms deadline; three queries
    # at once. The estimator does not know the interference yet and predicts
    # 15.3 ms for the third, so all are admitted. The first two run at half
    # speed and end at 20 ms: late. The third would start at 20 ms, past its
    # deadline: the worker drops it, so it costs no energy.
    model = tiny(latency_ms=10.0, slots=2, interference=1.0, deadline_ms=18.0, busy_w=1.0)
    sim = run(model, fixed([0.0, 0.0, 0.0]))
    assert counts(sim) == {"ok": 0, "late": 3, "inaccurate": 0, "rejected": 0, "failed": 0}
    # Two ran for 20 ms on both slots: busy_w * 20 ms; the third never ran.
    assert sim.energy_j() == pytest.approx(1.0 * 0.020)
    # Late queries count at their deadline, as the live AP answers them.
    assert latencies(sim) == [18.0, 18.0, 18.0]


def test_impossible_sla_is_rejected() -> None:
    # The round trip alone exceeds the deadline.
    sim = run(tiny(rtt_ms=50.0, deadline_ms=20.0), fixed([0.0, 10.0]))
    assert counts(sim)["rejected"] == 2
    # No variant is accurate enough (0.9 < 0.95).
    sim = run(tiny(min_accuracy=0.95), fixed([0.0]))
    assert counts(sim)["rejected"] == 1


def test_admission_messages_name_the_sla_field() -> None:
    view = RequestView("t", "a", 10.0, 0.5)
    fast = Candidate("k", "w", "c", "v", 0.9, 1.0, 0, 1, 5.0)
    slow = fast._replace(predicted_ms=12.0)
    admit(view, [], [slow, fast])
    with pytest.raises(RejectedError, match=r"sla.deadline_ms: .*fastest 12.00 ms, 10.00 ms left"):
        admit(view, [], [slow])


# -- bookkeeping and determinism -----------------------------------------------------------


@pytest.fixture(scope="module")
def manifest(models_dir: Path) -> Any:
    return load_manifest(models_dir)


@pytest.fixture(scope="module")
def mixed(manifest: Any) -> SimModel:
    return build_model(load_scenario(ROOT / "scenarios/sim/mixed-fast.toml").scaled(30.0), manifest)


def test_counts_add_up(mixed: SimModel) -> None:
    arrivals = plan_arrivals(mixed.scenario, seed=5)
    for name in STATIC_POLICIES:
        sim = run(mixed, arrivals, name)
        table = sim.table()
        assert table.sum() == len(arrivals)
        # Per window and app, the outcomes are exactly the arrivals.
        per_window = arrivals.per_window(sim.window_s, len(mixed.scenario.apps))
        assert np.array_equal(table.sum(axis=2).T, per_window)
        assert sum(sim.resolved) == len(arrivals)
        assert len(sim.latencies) == len(arrivals) - counts(sim)["rejected"]
        # Every decision was released exactly once.
        assert all(w.in_flight == 0 for w in sim.registry.workers())


def test_deterministic_for_a_seed(mixed: SimModel) -> None:
    a = plan_arrivals(mixed.scenario, seed=5)
    b = plan_arrivals(mixed.scenario, seed=5)
    assert np.array_equal(a.times_ms, b.times_ms) and np.array_equal(a.jitter_z, b.jitter_z)
    for name in ("random", "p2c", "fastest"):
        x = simulate(mixed, make_policy(name, 5), a)
        y = simulate(mixed, make_policy(name, 5), b)
        assert np.array_equal(x.table, y.table)
        assert x.energy_j == y.energy_j and x.latency_p50_ms == y.latency_p50_ms
    other = plan_arrivals(mixed.scenario, seed=6)
    assert not np.array_equal(a.times_ms[:50], other.times_ms[:50])


def test_arrivals_are_the_load_generators(mixed: SimModel) -> None:
    from apdispatch.scenario.plan import plan_load

    plan = plan_load(mixed.scenario, seed=5)
    arrivals = plan_arrivals(mixed.scenario, seed=5)
    sent = np.sort(np.concatenate([s.send_times for s in plan.streams]))
    assert np.allclose(arrivals.times_ms, sent * 1000.0)


def test_workers_register_like_the_live_topology(manifest: Any) -> None:
    scenario = load_scenario(ROOT / "scenarios/small-edge-cloud.toml")
    model = build_model(scenario, manifest)
    live = build_topology(scenario, manifest)
    assert [w.worker_id for w in model.workers] == [s.worker_id for s in live]
    assert [w.kind for w in model.workers] == [s.kind for s in live]
    sim = Simulation(model, make_policy("fastest"), plan_arrivals(scenario, 1))
    assert sorted(w.worker_id for w in sim.registry.workers()) == sorted(s.worker_id for s in live)


def test_one_router_for_the_ap_and_the_simulator(mixed: SimModel) -> None:
    import structlog

    from apdispatch.ap.config import APConfig
    from apdispatch.ap.dispatcher import Dispatcher
    from apdispatch.ap.metrics import Stats
    from apdispatch.routing.registry import Registry

    policy = make_policy("fastest")
    estimator = LatencyEstimator()
    ap = Dispatcher(APConfig(), Registry(5.0), estimator, policy, None, Stats(), structlog.get_logger())  # type: ignore[arg-type]
    assert isinstance(ap.router, Router) and ap.router.policy is policy and ap.router.estimator is estimator
    other = make_policy("random")
    ap.policy = other
    assert ap.router.policy is other
    sim = Simulation(mixed, policy, plan_arrivals(mixed.scenario, 1))
    assert type(sim.router) is Router and sim.router.policy is policy


# -- scenarios, JSON, CLI, environment -----------------------------------------------------


def test_the_issue_scenarios_are_all_there() -> None:
    names = {p.stem for p in SIM_SCENARIOS}
    for topology in ("full-edge", "mixed", "full-cloud"):
        for pattern in ("fast", "slow", "constant"):
            assert f"{topology}-{pattern}" in names
    for path in SIM_SCENARIOS:
        scenario = load_scenario(path)
        assert len(scenario.apps) >= 3
        assert len({(a.deadline_ms, a.min_accuracy) for a in scenario.apps}) >= 3


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_every_scenario_simulates(path: Path, models_dir: Path) -> None:
    scenario = load_scenario(path).scaled(8.0)
    model = load_model(scenario, models_dir)
    report = run_policies(model, STATIC_POLICIES, window_s=2.0, bound=False)
    for result in report.results.values():
        assert result.total == report.queries > 0


def test_json_schema(mixed: SimModel) -> None:
    report = run_policies(mixed, ["fastest", "closest"], seed=2)
    doc = json.loads(json.dumps(to_json(report)))
    assert doc["scenario"] == "mixed-fast"
    bound = doc["upper_bound"]
    assert bound is None or 0.0 <= bound["success_ratio"] <= 1.0
    for name in ("fastest", "closest"):
        p = doc["policies"][name]
        for key in ("total", *OUTCOMES, "success_ratio", "violation_ratio", "rejection_ratio", "energy_j"):
            assert key in p
        assert p["total"] == sum(p[o] for o in OUTCOMES) == doc["queries"]
        assert p["success_ratio"] == pytest.approx(p["ok"] / p["total"], abs=1e-6)
        assert p["violation_ratio"] == pytest.approx((p["late"] + p["inaccurate"]) / p["total"], abs=1e-6)
        assert p["rejection_ratio"] == pytest.approx(p["rejected"] / p["total"], abs=1e-6)
        assert sum(p["timeline"]["ok"]) == p["ok"]
        assert sum(a["total"] for a in p["apps"].values()) == p["total"]


# One app that a one-slot box near by can serve only in part, and a fast rack whose round trip
# leaves room for the work on half of the draws (29 + 5 z + 1 <= 30 when z <= 0).
FAR_OR_FULL = """
name = "far-or-full"
duration_s = 20
seed = 3

[[apps]]
name = "camera"
task = "digits"
deadline_ms = 30.0
min_accuracy = 0.9
rate_qps = 20.0
share = 1.0

[variants.net]
task = "digits"
accuracy = 0.95
latency_ms = 10.0

[devices.box]
speed = 1.0
slots = 1
interference = 0.0
idle_w = 1.0
busy_w = 2.0

[devices.rack]
speed = 10.0
slots = 8
interference = 0.0
idle_w = 10.0
busy_w = 20.0

[[clusters]]
name = "near"
kind = "edge"
rtt_ms = 1.0
jitter_ms = 0.0
workers = [ { device = "box", count = 1, variants = ["net"] } ]

[[clusters]]
name = "far"
kind = "edge"
rtt_ms = 29.0
jitter_ms = 5.0
workers = [ { device = "rack", count = 1, variants = ["net"] } ]

[arrivals]
schedule = [ { at_s = 0, clients_per_min = 60 } ]
stream_mean_s = 10.0
"""


def test_the_bound_counts_a_far_cluster_by_its_chance_unless_told_the_draws(
    tmp_path: Path, manifest: Any
) -> None:
    import tomllib

    from apdispatch.sim.bound import schedulable
    from apdispatch.sim.results import upper_bound_hook

    scenario = parse_scenario(tomllib.loads(FAR_OR_FULL))
    model = build_model(scenario, manifest)
    arrivals = plan_arrivals(scenario, 3)
    n = len(arrivals.times_ms)
    box = schedulable(arrivals.times_ms, 10.0, 29.0)  # the most the box can serve in time
    assert 0 < box < n
    # Not knowing a query's draw before sending it, a dispatcher gets at most what the box
    # serves and half of the rest.
    expected = upper_bound_hook(model, arrivals, "expected")
    assert expected == pytest.approx((box + (n - box) / 2) / n, rel=1e-6)
    # Knowing the draws, it could send the lucky half far and give the box the others.
    lucky = 29.0 + 5.0 * arrivals.jitter_z + 1.0 <= 30.0
    clairvoyant = (int(lucky.sum()) + schedulable(arrivals.times_ms[~lucky], 10.0, 29.0)) / n
    realized = upper_bound_hook(model, arrivals, "realized")
    assert realized is not None and expected is not None
    assert realized >= clairvoyant > expected + 0.1
    # Every policy here learns a round trip by sending: none beats the expected bound.
    report = run_policies(model, STATIC_POLICIES, seed=3)
    assert report.upper_bound == expected and report.bound_rtt == "expected"
    for result in report.results.values():
        assert result.counts["ok"] / n <= expected
    # Both from the command line, each saying which it is.
    path = tmp_path / "far.toml"
    path.write_text(FAR_OR_FULL)
    for mode, value in (("expected", expected), ("realized", realized)):
        out = tmp_path / f"{mode}.json"
        argv = ["sim", str(path), "--policies", "fastest", "--seed", "3", "--json", str(out)]
        assert cli_main([*argv, "--bound-rtt", mode]) == 0
        doc = json.loads(out.read_text())["upper_bound"]
        assert doc == {"success_ratio": pytest.approx(value), "rtt": mode}


def test_cli_writes_json_and_plot(tmp_path: Path, models_dir: Path) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = cli_main(
        [
            "sim",
            str(ROOT / "scenarios/small-edge-cloud.toml"),
            "--policies",
            "fastest,random",
            "--duration",
            "10",
            "--window",
            "2",
            "--models",
            str(models_dir),
            "--json",
            str(out),
            "--plot",
            str(png),
            "--seed",
            "4",
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc["policies"]) == {"fastest", "random"} and doc["seed"] == 4
    assert png.stat().st_size > 10_000


def test_cli_names_unknown_policies(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["sim", str(ROOT / "scenarios/small-edge-cloud.toml"), "--policies", "nope"])
    assert rc == 2
    assert "round-robin" in capsys.readouterr().err


def test_unknown_variant_names_the_key() -> None:
    doc = load_scenario(ROOT / "scenarios/small-edge-cloud.toml")
    with pytest.raises(ScenarioError, match=r"clusters\[0\]\.workers\[0\]\.variants: unknown variant"):
        build_model(doc, None)


def test_window_environment(mixed: SimModel) -> None:
    env = DispatchEnv(mixed, window_s=3.0)
    obs = env.reset(seed=1)
    assert obs.shape == (env.observation_size,) and not obs.any()
    steps = 0
    done = False
    rewards = []
    while not done:
        obs, reward, terminated, truncated, info = env.step(steps % env.n_actions)
        assert info["window"] == steps
        assert obs.shape == (env.observation_size,) and obs.dtype == np.float32
        assert 0.0 <= reward <= 1.0 and not truncated
        rewards.append(reward)
        steps += 1
        done = terminated
    assert steps == env.steps_per_episode == math.ceil(mixed.scenario.duration_s / 3.0)
    result = env.result()
    assert result.total == len(plan_arrivals(mixed.scenario, 1))
    # The same seed and actions give the same episode.
    env.reset(seed=1)
    again = [env.step(k % env.n_actions)[1] for k in range(steps)]
    assert again == rewards
    with pytest.raises(RuntimeError):
        env.step(0)


def test_fit_calibration_recovers_scale_and_overhead() -> None:
    truth = Calibration(scale=1.7, overhead_ms=0.12)
    samples = [
        (m, s, truth.scale * m / s + truth.overhead_ms) for m in (0.01, 0.05, 0.2) for s in (0.02, 0.1, 1.0)
    ]
    fitted = fit_calibration(samples)
    assert fitted.scale == pytest.approx(1.7) and fitted.overhead_ms == pytest.approx(0.12)


def test_calibration_applies_to_manifest_variants_only(manifest: Any) -> None:
    scenario: Scenario = load_scenario(ROOT / "scenarios/small-edge-cloud.toml")
    plain = build_model(scenario, manifest)
    scaled = build_model(scenario, manifest, Calibration(scale=2.0, overhead_ms=0.5))
    v, w = plain.variants["digits-small"], scaled.variants["digits-small"]
    assert w.service_ms(0.5) == pytest.approx(2 * v.service_ms(0.5) + 0.5)


def test_outcome_indices_match_names() -> None:
    assert (OUTCOMES[OK], OUTCOMES[LATE], OUTCOMES[INACCURATE], OUTCOMES[REJECTED]) == (
        "ok",
        "late",
        "inaccurate",
        "rejected",
    )


DESIGN_EXAMPLE = """
name = "full-edge-dynamic"
duration_s = 450
seed = 7

[[apps]]
name = "ar-overlay"
task = "digits"
deadline_ms = 50.0
min_accuracy = 0.95
rate_qps = 15.0
share = 0.4

[variants.digits-small]
task = "digits"
accuracy = 0.962
latency_ms = 1.8

[devices.nano]
speed = 0.25
slots = 2
interference = 0.35
idle_w = 1.5
busy_w = 5.0

[[clusters]]
name = "edge-a"
rtt_ms = 3.0
jitter_ms = 0.5
workers = [ { device = "nano", count = 2, variants = ["digits-tiny", "digits-small"] } ]

[arrivals]
schedule = [ { at_s = 0, clients_per_min = 20 }, { at_s = 150, clients_per_min = 60 },
             { at_s = 300, clients_per_min = 100 } ]
stream_mean_s = 30.0
"""


def test_the_design_example_simulates(manifest: Any) -> None:
    import tomllib

    scenario = parse_scenario(tomllib.loads(DESIGN_EXAMPLE)).scaled(20.0)
    model = build_model(scenario, manifest)
    # digits-small comes from the scenario (accuracy 0.962, 1.8 ms), digits-tiny from the manifest.
    small, tiny_ = model.variants["digits-small"], model.variants["digits-tiny"]
    assert (small.source, small.accuracy, small.service_ms(0.25)) == ("scenario", 0.962, 7.2)
    assert tiny_.source == "manifest"
    assert [w.worker_id for w in model.workers] == ["edge-a-1", "edge-a-2"]
    report = run_policies(model, STATIC_POLICIES, bound=False)
    for result in report.results.values():
        assert result.total == report.queries and result.counts["ok"] > 0


# -- where the zoo's variant latencies come from ----------------------------------------------


def _zoo_copy(models_dir: Path, folder: Path, factor: float = 1.0) -> Path:
    """The zoo's manifest alone in ``folder``, every latency the build measured times ``factor``."""
    doc = json.loads((models_dir / "manifest.json").read_text())
    for v in doc["variants"]:
        v["latency_ms_batch1"] *= factor
        v["latency_ms_batch8"] *= factor
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(doc, indent=2))
    return folder


def _sim_doc(tmp_path: Path, zoo: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / f"{zoo.name}-{len(list(tmp_path.glob('*.json')))}.json"
    argv = ["sim", str(ROOT / "scenarios/sim/mixed-fast.toml"), "--policies", "fastest,least-loaded"]
    argv += ["--duration", "30", "--seed", "3", "--models", str(zoo), "--json", str(out), *extra]
    assert cli_main(argv) == 0
    return json.loads(out.read_text())


@pytest.fixture()
def two_builds(tmp_path: Path, models_dir: Path) -> tuple[Path, Path]:
    """Two zoo manifests that differ only in their measured latencies (the second build timed its
    variants on a machine three times as busy)."""
    return _zoo_copy(models_dir, tmp_path / "quiet"), _zoo_copy(models_dir, tmp_path / "busy", 3.0)


def test_two_zoo_builds_give_the_same_simulated_result(tmp_path: Path, two_builds: tuple[Path, Path]) -> None:
    quiet, busy = two_builds
    a, b = _sim_doc(tmp_path, quiet), _sim_doc(tmp_path, busy)
    assert a == b and a["latencies"] == "reference"
    assert a["policies"]["fastest"]["ok"] > 0 and a["upper_bound"] is not None
    # The zoo's variants cost what the shipped profile says; accuracies are the manifest's.
    reference = reference_profile().variants
    assert reference is not None
    manifest = load_manifest(busy)
    model = load_model(load_scenario(ROOT / "scenarios/sim/mixed-fast.toml"), busy)
    assert model.latencies == "reference"
    for v in model.variants.values():
        assert (v.latency_ms, v.latency_ms_batch8) == reference[v.name]
        assert v.accuracy == manifest.variant(v.name).accuracy and v.source == "manifest"


def test_measured_latencies_are_used_when_asked_for(tmp_path: Path, two_builds: tuple[Path, Path]) -> None:
    quiet, busy = two_builds
    a = _sim_doc(tmp_path, quiet, "--latencies", "measured")
    b = _sim_doc(tmp_path, busy, "--latencies", "measured")
    assert a["latencies"] == b["latencies"] == "measured"
    # Variants three times as slow: fewer requests meet their deadlines.
    assert b["policies"]["fastest"]["ok"] < a["policies"]["fastest"]["ok"]
    assert b["upper_bound"]["success_ratio"] < a["upper_bound"]["success_ratio"]
    model = load_model(
        load_scenario(ROOT / "scenarios/sim/mixed-fast.toml"), busy, latencies=MEASURED_PROFILE
    )
    for v in model.variants.values():
        measured = load_manifest(busy).variant(v.name)
        assert (v.latency_ms, v.latency_ms_batch8) == (measured.latency_ms_batch1, measured.latency_ms_batch8)
    # --calibration scales whichever latencies are used.
    scaled = load_model(model.scenario, busy, Calibration(scale=2.0), MEASURED_PROFILE)
    assert scaled.variants["digits-large"].latency_ms == 2.0 * model.variants["digits-large"].latency_ms


def test_a_profile_file_gives_its_own_latencies(tmp_path: Path, two_builds: tuple[Path, Path]) -> None:
    quiet, busy = two_builds
    # The quiet build's measurements written as a profile: the busy build then simulates as the quiet.
    lines = []
    for v in load_manifest(quiet).variants:
        lines += [f"[variants.{v.name}]", f"latency_ms_batch1 = {v.latency_ms_batch1!r}"]
        lines += [f"latency_ms_batch8 = {v.latency_ms_batch8!r}", ""]
    profile = tmp_path / "profile.toml"
    profile.write_text("\n".join(lines))
    a = _sim_doc(tmp_path, quiet, "--latencies", "measured")
    b = _sim_doc(tmp_path, busy, "--latencies", str(profile))
    assert b["latencies"] == str(profile)
    assert a["policies"] == b["policies"] and a["upper_bound"] == b["upper_bound"]
    # A profile that lacks a variant of the zoo is an error that names it.
    profile.write_text("\n".join(lines[4:]))
    with pytest.raises(ScenarioError, match=r"no latencies for digits-tiny .*--latencies measured"):
        load_model(
            load_scenario(ROOT / "scenarios/sim/mixed-fast.toml"), busy, latencies=load_profile(profile)
        )
    assert cli_main(["sim", str(ROOT / "scenarios/sim/mixed-fast.toml"), "--latencies", "nope.toml"]) == 2


def test_generated_scenarios_do_not_depend_on_the_zoo_build(two_builds: tuple[Path, Path]) -> None:
    from apdispatch.sim.generate import generate

    quiet, busy = (load_manifest(p) for p in two_builds)
    assert all(generate(seed, quiet) == generate(seed, busy) for seed in range(5))
    # Deadlines are drawn against the latencies: measured ones that differ give other scenarios.
    assert any(
        generate(seed, quiet, latencies=MEASURED_PROFILE) != generate(seed, busy, latencies=MEASURED_PROFILE)
        for seed in range(5)
    )


def test_the_reference_profile_covers_the_zoo(manifest: Any) -> None:
    reference = reference_profile()
    assert reference.variants is not None
    assert set(reference.variants) == {v.name for v in manifest.variants}
    for b1, b8 in reference.variants.values():
        assert 0 < b1 <= b8


def test_cloud_bottleneck_starves_apps_the_edge_could_serve_confidently(models_dir: Path) -> None:
    """scenarios/cloud-bottleneck.toml: the 0.94 apps can use only the cloud's large variants on
    average, the cloud cannot keep up with them, while the edge's small variants have calibrated
    thresholds for that floor and the edge has room."""
    scenario = load_scenario(ROOT / "scenarios/cloud-bottleneck.toml").scaled(60.0)
    manifest = load_manifest(models_dir)
    edge = {v for c in scenario.clusters if c.kind == "edge" for w in c.workers for v in w.variants}
    for name in ("inspection", "video-analytics"):
        app = scenario.app(name)
        assert not any(manifest.variant(v).accuracy >= app.min_accuracy for v in edge), name
        small = manifest.variant(f"{app.task}-small")
        entry = acceptance_for(small.acceptance, app.min_accuracy)
        assert small.name in edge and entry is not None and entry.coverage >= 0.5, name
    result = run_policies(load_model(scenario, models_dir), ["fastest"], bound=False).results["fastest"]
    table = result.table
    success = {a.name: table[i, :, OK].sum() / table[i].sum() for i, a in enumerate(scenario.apps)}
    assert success["inspection"] < 0.6 and success["video-analytics"] < 0.9, success
    assert success["ar-overlay"] > 0.95 and success["traffic-count"] > 0.95, success


@pytest.mark.parametrize("seed", [-3, 1.5, True, "7"])
def test_a_scenario_seed_is_a_non_negative_integer(seed: object) -> None:
    doc = tomllib.loads((ROOT / "scenarios/demo.toml").read_text())
    doc["seed"] = seed
    with pytest.raises(ScenarioError, match=r"^scenario\.seed: "):
        parse_scenario(doc)


@pytest.mark.parametrize(
    ("table", "key", "value", "message"),
    [
        (None, "duration_s", math.nan, r"^scenario\.duration_s: expected a finite number"),
        (None, "duration_s", 0.0, r"^scenario\.duration_s: must be > 0"),
        ("devices.gateway", "slots", 1.5, r"^devices\.gateway\.slots: expected an integer"),
        ("devices.gateway", "slots", 0, r"^devices\.gateway\.slots: must be >= 1"),
        ("devices.gateway", "interference", -1.0, r"^devices\.gateway\.interference: must be >= 0"),
        ("devices.gateway", "speed", math.inf, r"^devices\.gateway\.speed: expected a finite number"),
        ("devices.gateway", "busy_w", -8.0, r"^devices\.gateway\.busy_w: must be >= 0"),
        ("apps.0", "rate_qps", -5.0, r"^apps\[0\]\.rate_qps: must be > 0"),
        ("apps.0", "share", -0.35, r"^apps\[0\]\.share: must be >= 0"),
        ("clusters.0", "rtt_ms", -2.0, r"^clusters\[0\]\.rtt_ms: must be >= 0"),
        ("arrivals", "stream_mean_s", 0.0, r"^arrivals\.stream_mean_s: must be > 0"),
    ],
)
def test_a_scenario_value_out_of_range_is_refused_by_name(
    table: str | None, key: str, value: object, message: str
) -> None:
    doc = tomllib.loads((ROOT / "scenarios/demo.toml").read_text())
    target: Any = doc
    for part in table.split(".") if table else []:
        target = target[int(part)] if part.isdigit() else target[part]
    target[key] = value
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(doc)
