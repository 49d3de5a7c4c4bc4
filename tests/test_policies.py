"""Static policies on hand-made candidate sets, and the router's optional rejection hook."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from apdispatch.policies import STATIC_POLICIES, Candidate, RequestView, make_policy
from apdispatch.routing.static import FastestPolicy
from apdispatch.scenario import load_scenario
from apdispatch.tools.decision_bench import candidate_sets, measure

ROOT = Path(__file__).resolve().parent.parent

REQUEST = RequestView(task="digits", app="ar", deadline_ms=50.0, min_accuracy=0.8)


def _c(key: str, *, rtt: float, in_flight: int, slots: int, predicted: float, accuracy: float) -> Candidate:
    return Candidate(
        key=key,
        worker=key,
        cluster=key,
        variant="v",
        accuracy=accuracy,
        rtt_ms=rtt,
        in_flight=in_flight,
        slots=slots,
        predicted_ms=predicted,
    )


NEAR_BUSY = _c("near", rtt=1.0, in_flight=4, slots=1, predicted=20.0, accuracy=0.85)
MID_IDLE = _c("mid", rtt=5.0, in_flight=0, slots=2, predicted=6.0, accuracy=0.90)
FAR_ACCURATE = _c("far", rtt=40.0, in_flight=1, slots=8, predicted=45.0, accuracy=0.99)
CANDIDATES = [NEAR_BUSY, MID_IDLE, FAR_ACCURATE]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("closest", "near"),
        ("fastest", "mid"),
        ("most-accurate", "far"),
        ("least-loaded", "mid"),
    ],
)
def test_deterministic_rules(name: str, expected: str) -> None:
    assert make_policy(name).choose(REQUEST, CANDIDATES).key == expected


def test_round_robin_cycles_per_task() -> None:
    policy = make_policy("round-robin")
    picks = [policy.choose(REQUEST, CANDIDATES).key for _ in range(6)]
    assert picks == ["near", "mid", "far", "near", "mid", "far"]


def test_random_covers_all_and_is_seeded() -> None:
    a = [make_policy("random", seed=3).choose(REQUEST, CANDIDATES).key for _ in range(1)]
    policy = make_policy("random", seed=3)
    picks = [policy.choose(REQUEST, CANDIDATES).key for _ in range(300)]
    assert set(picks) == {"near", "mid", "far"}
    assert picks[0] == a[0]
    again = make_policy("random", seed=3)
    assert picks == [again.choose(REQUEST, CANDIDATES).key for _ in range(300)]


def test_p2c_never_picks_the_most_loaded_of_two() -> None:
    policy = make_policy("p2c", seed=1)
    # near has load 4/1, far 1/8 and mid 0/2: near loses every pair it is in.
    picks = [policy.choose(REQUEST, CANDIDATES).key for _ in range(300)]
    assert "near" not in picks
    assert {"mid", "far"} == set(picks)


def test_single_candidate_is_always_chosen() -> None:
    for name in STATIC_POLICIES:
        assert make_policy(name).choose(REQUEST, [MID_IDLE]) is MID_IDLE


def test_unknown_policy_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="round-robin"):
        make_policy("nope")


# -- the optional rejection hook -----------------------------------------------------------


class SeesRejections(FastestPolicy):
    """``fastest``, with the optional ``rejected`` hook: what the router tells it."""

    def __init__(self) -> None:
        self.rejections: list[RequestView] = []

    def rejected(self, request: RequestView) -> None:
        self.rejections.append(request)


def test_router_tells_rejections_in_the_simulator(models_dir: Path) -> None:
    from apdispatch.common.manifest import load_manifest
    from apdispatch.sim.arrivals import plan_arrivals
    from apdispatch.sim.engine import REJECTED, Simulation
    from apdispatch.sim.model import build_model

    scenario = load_scenario(ROOT / "scenarios/sim/mixed-fast.toml").scaled(20.0)
    model = build_model(scenario, load_manifest(models_dir))
    policy = SeesRejections()
    arrivals = plan_arrivals(scenario, seed=3)
    sim = Simulation(model, policy, arrivals)
    sim.finish()
    rejected = sim.resolved[REJECTED]
    assert rejected > 50  # the scenario's peaks overload it: there is something to tell
    # Each rejection, and nothing else, reached the policy, stamped with the simulated clock.
    assert len(policy.rejections) == rejected
    times_s = [r.now_s for r in policy.rejections]
    assert times_s == sorted(times_s) and times_s[0] >= 0.0 and times_s[-1] <= scenario.duration_s
    assert set(times_s) <= {float(t) * 0.001 for t in arrivals.times_ms}


def test_router_tells_rejections_in_the_live_ap(models_dir: Path) -> None:
    import structlog

    from apdispatch.ap.config import APConfig
    from apdispatch.ap.dispatcher import Dispatcher
    from apdispatch.ap.metrics import Stats
    from apdispatch.client import build_request
    from apdispatch.common.errors import ApdispatchError, RejectedError
    from apdispatch.common.manifest import load_manifest
    from apdispatch.common.protocol import dispatcher_pb2 as pb
    from apdispatch.routing.estimator import LatencyEstimator
    from apdispatch.routing.registry import Registry
    from apdispatch.sim.model import build_model

    # The AP's registry, with the workers of the demo scenario registered as live ones register.
    model = build_model(load_scenario(ROOT / "scenarios/small-edge-cloud.toml"), load_manifest(models_dir))
    registry = Registry(60.0)
    for spec in model.workers:
        registry.register(spec.register_request())
    policy = SeesRejections()
    # No forwarder: a rejected request never reaches one.
    ap = Dispatcher(APConfig(), registry, LatencyEstimator(), policy, None, Stats(), structlog.get_logger())  # type: ignore[arg-type]
    x = np.load(models_dir / "samples" / "digits.npz")["x"][:1]
    replies: list[pb.InferResponse | ApdispatchError] = []
    before = time.monotonic()
    # No worker answers within a microsecond: admission rejects it.
    ap.submit(build_request("digits", x, deadline_ms=0.001, app="ar"), time.monotonic(), replies.append)
    assert len(replies) == 1 and isinstance(replies[0], RejectedError)
    assert [(r.task, r.app) for r in policy.rejections] == [("digits", "ar")]
    assert before <= policy.rejections[0].now_s <= time.monotonic()
    # Invalid input is not a routing decision: the policy hears nothing of it.
    ap.submit(build_request("digits", x[0, :1], deadline_ms=100.0), time.monotonic(), replies.append)
    assert len(replies) == 2 and not isinstance(replies[1], RejectedError)
    assert len(policy.rejections) == 1


def test_decision_bench_times_further_passes_while_asked() -> None:
    # ``bench --decisions`` goes on until the learner has published an update:
    # here, until a counter says so, one pass over the sets at a time.
    sets = candidate_sets(8, 5, seed=3)
    asked = []

    def more() -> bool:
        asked.append(1)
        return len(asked) < 3

    report = measure(make_policy("fastest"), sets, repeats=2, more=more)
    assert report["decisions"] == 5 * 4  # 2 passes, then 2 more while asked
    assert len(asked) == 3
    assert measure(make_policy("fastest"), sets, repeats=2)["decisions"] == 10
