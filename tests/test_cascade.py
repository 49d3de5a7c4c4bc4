"""Cascades: planning by hand, the router's two steps, and the simulator on the cloud-bottleneck scenario."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from apdispatch.ap.config import APConfig, ConfigError, load_config
from apdispatch.ap.server import AccessPoint
from apdispatch.client import AsyncClient
from apdispatch.common.confidence import Acceptance, acceptance_for
from apdispatch.common.logs import make_logger
from apdispatch.common.manifest import load_manifest
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.policies import RequestView, make_policy
from apdispatch.routing.cascade import Cascade, CascadeConfig, EscalationRates, cascade_candidates
from apdispatch.routing.estimator import LatencyEstimator
from apdispatch.routing.registry import Registry
from apdispatch.routing.router import Router, build_candidates
from apdispatch.scenario import load_scenario
from apdispatch.sim.model import load_model
from apdispatch.sim.results import run_policies
from apdispatch.tools.processes import free_port
from workers.config import WorkerConfig
from workers.runtime import ServiceTime
from workers.server import Worker

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 60.0  # only to turn a hang into a failure
ENTRY = Acceptance(floor=0.94, threshold=0.8, coverage=0.85, accuracy=0.97)


def _variant(name: str, accuracy: float, latency_ms: float, *entries: Acceptance) -> pb.VariantInfo:
    return pb.VariantInfo(
        name=name,
        task="digits",
        accuracy=accuracy,
        latency_ms=latency_ms,
        inputs=[pb.TensorSpec(name="input", datatype="FP32", shape=[-1, 4])],
        acceptance=[pb.Acceptance(**e.to_json()) for e in entries],
    )


def _registry(edge_accuracy: float = 0.91) -> Registry:
    """An edge worker 5 ms away running a small variant calibrated for 0.94, a cloud 50 ms away."""
    registry = Registry(lease_s=60.0)
    registry.register(
        pb.RegisterRequest(
            worker_id="edge-1", address="e:1", cluster="edge", kind="edge", slots=2, link_delay_ms=4.7,
            variants=[_variant("digits-small", edge_accuracy, 5.0, ENTRY)],
        )
    )  # fmt: skip
    registry.register(
        pb.RegisterRequest(
            worker_id="cloud-1", address="c:1", cluster="cloud", kind="cloud", slots=1, link_delay_ms=29.7,
            variants=[_variant("digits-large", 0.954, 30.0)],
        )
    )  # fmt: skip
    return registry


def _view(deadline_ms: float, floor: float = 0.94) -> RequestView:
    return RequestView("digits", "inspection", deadline_ms, floor, 1.0)


def test_a_cascade_is_planned_when_both_steps_fit_by_hand() -> None:
    registry, estimator = _registry(), LatencyEstimator()
    targets = registry.targets("digits") or []
    view = _view(150.0)
    accurate = build_candidates(targets, view.min_accuracy, estimator, view.now_s)
    assert [c.variant for c in accurate] == ["digits-large"]
    # Predictions: edge 4.7 + 0.3 + 5 = 10 ms, cloud 29.7 + 0.3 + 30 = 60 ms.
    assert accurate[0].predicted_ms == pytest.approx(60.0)
    rates = EscalationRates(0.02)
    (cascade,) = cascade_candidates(view, targets, accurate, estimator, rates)
    plan = cascade.ref
    assert isinstance(plan, Cascade) and plan.first.variant.name == "digits-small"
    assert plan.acceptance == ENTRY and plan.planned_escalation is accurate[0].ref
    assert cascade.key == "edge/edge-1/digits-small>cloud/cloud-1/digits-large"
    # The first step plus the escalation at its rate (1 - coverage = 0.15): 10 + 0.15 * 60 = 19 ms.
    assert cascade.predicted_ms == pytest.approx(19.0)
    assert cascade.accuracy == 0.94 and cascade.worker == "edge-1"
    # Both steps must fit: 10 + 60 > 65.
    assert cascade_candidates(_view(65.0), targets, accurate, estimator, rates) == []
    # No entry for the floor (0.98 is above the table's), or an edge variant that meets it: none.
    high = build_candidates(targets, 0.95, estimator, 1.0)
    assert cascade_candidates(_view(150.0, 0.95), targets, high, estimator, rates) == []
    edge_ok = _registry(edge_accuracy=0.95).targets("digits") or []
    both = build_candidates(edge_ok, 0.94, estimator, 1.0)
    assert len(both) == 2 and cascade_candidates(view, edge_ok, both, estimator, rates) == []


def test_escalation_rates_start_from_the_calibration_by_hand() -> None:
    rates = EscalationRates(0.5)
    assert rates.rate("v", ENTRY) == pytest.approx(0.15)
    rates.observe("v", ENTRY, escalated=True)  # 0.15 + 0.5 * (1 - 0.15)
    assert rates.rate("v", ENTRY) == pytest.approx(0.575)
    rates.observe("v", ENTRY, escalated=False)  # 0.575 + 0.5 * (0 - 0.575)
    assert rates.rate("v", ENTRY) == pytest.approx(0.2875)
    with pytest.raises(ValueError, match="rate_alpha"):
        CascadeConfig(rate_alpha=0.0)


def test_the_router_keeps_confident_answers_and_escalates_the_rest() -> None:
    registry = _registry()
    targets = registry.targets("digits") or []
    router = Router(make_policy("fastest"), LatencyEstimator(), CascadeConfig(enabled=True))
    first = router.decide(_view(150.0), targets)
    # fastest takes the cascade: 19 ms expected against the cloud's 60.
    assert first.cascade is not None and first.target.worker.worker_id == "edge-1"
    assert first.target.worker.in_flight == 1
    Router.release(first)
    assert router.accepted(first, 0.9)  # above the threshold (0.8): kept
    assert not router.accepted(first, 0.5)
    second = router.escalate(first, targets, 1.01)
    assert second.target.worker.worker_id == "cloud-1" and second.target.worker.in_flight == 1
    assert second.cascade is None and second.view is first.view
    Router.release(second)
    # One kept, one escalated, from 0.15 at alpha 0.02: 0.15 * 0.98 = 0.147, then + 0.02 * (1 - 0.147).
    assert router.escalations.rate("digits-small", ENTRY) == pytest.approx(0.147 + 0.02 * 0.853)
    # Off (the default): no cascades, the cloud as before.
    plain = Router(make_policy("fastest"), LatencyEstimator()).decide(_view(150.0), targets)
    assert plain.cascade is None and plain.target.worker.worker_id == "cloud-1"


def test_cascades_relieve_the_bottlenecked_cloud_in_the_simulator(models_dir: Path) -> None:
    scenario = load_scenario(ROOT / "scenarios/cloud-bottleneck.toml").scaled(60.0)
    model = load_model(scenario, models_dir)
    without = run_policies(model, ["fastest"], bound=False).results["fastest"]
    with_cascade = run_policies(model, ["fastest"], bound=False, cascade=True).results["fastest"]
    assert without.total == with_cascade.total == sum(with_cascade.counts.values())
    before, after = (r.counts["ok"] / r.total for r in (without, with_cascade))
    assert after > before + 0.1, (before, after)
    # Fewer requests reach the cloud, escalations included, by 40 % or more.
    assert with_cascade.dispatched["cloud"] <= 0.6 * without.dispatched["cloud"], (
        with_cascade.dispatched,
        without.dispatched,
    )
    assert with_cascade.counts["inaccurate"] == 0


async def test_the_ap_keeps_confident_edge_answers_and_escalates_the_rest(models_dir: Path) -> None:
    """A live AP with cascades on, a real ONNX edge worker (digits-small, 91 %) and a real PyTorch
    cloud worker (digits-large, 95 %) 20 ms away; requests that need 0.94."""
    manifest = load_manifest(models_dir)
    small, large = manifest.variant("digits-small"), manifest.variant("digits-large")
    floor = 0.94
    entry = acceptance_for(small.acceptance, floor)
    assert small.accuracy < floor <= large.accuracy and entry is not None
    ap = AccessPoint(
        APConfig(listen=f"127.0.0.1:{free_port()}", policy="fastest", cascade=True).validate(),
        make_logger("warning"),
    )
    address = await ap.start()
    workers = [
        Worker(
            WorkerConfig(
                kind=kind, listen="127.0.0.1:0", models=models_dir, variants=(variant.name,), ap=address,
                cluster=kind, heartbeat_s=0.2, link_delay_ms=delay,
                service_ms={variant.name: ServiceTime(service, service)},
            ),
            make_logger("warning"),
        )
        for kind, variant, delay, service in (("edge", small, 2.0, 5.0), ("cloud", large, 20.0, 10.0))
    ]  # fmt: skip
    for worker in workers:
        await worker.start()
    try:
        async with asyncio.timeout(WAIT_S):
            while len({t.worker.kind for t in ap.registry.targets("digits") or ()}) < 2:
                await asyncio.sleep(0.02)
        with np.load(models_dir / "samples" / "digits.npz") as npz:
            x, y = npz["x"][:64].astype(np.float32), npz["y"][:64]
        async with AsyncClient(address) as client:
            results = [
                await client.infer("digits", x[i : i + 1], deadline_ms=2000, min_accuracy=floor, app="qc")
                for i in range(len(x))
            ]
    finally:
        for worker in workers:
            await worker.close()
        await ap.stop(grace_s=0.5)
    assert all(r.outcome == "ok" for r in results), [r.error for r in results if r.outcome != "ok"]
    kept = [r for r in results if not r.escalated]
    escalated = [r for r in results if r.escalated]
    # About 85 % kept at the edge (the calibration's coverage), the rest answered by the cloud.
    assert kept and escalated and len(kept) > len(escalated)
    for r in kept:
        assert r.served_by is not None and r.served_by.variant == small.name
        assert r.confidence is not None and r.confidence >= entry.threshold
    for r in escalated:
        assert r.served_by is not None and r.served_by.variant == large.name
    # Every first answer counted in the escalation rate, which moved from the calibration's.
    assert ap.dispatcher.router.escalations.rate(small.name, entry) != pytest.approx(1.0 - entry.coverage)
    right = [int(np.argmax(r.output) == y[i]) for i, r in enumerate(results)]
    assert sum(right) >= 0.8 * len(results)


def test_the_aps_cascade_settings_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "ap.toml"
    path.write_text("[ap]\ncascade = true\ncascade_rate_alpha = 0.1\n")
    config = load_config(path)
    assert config.cascade is True and config.cascade_rate_alpha == 0.1
    assert APConfig().cascade is False
    with pytest.raises(ConfigError, match="cascade: must be true or false"):
        APConfig(cascade="yes").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cascade_rate_alpha"):
        APConfig(cascade_rate_alpha=0.0).validate()


def test_serve_and_demo_take_cascade_from_the_command_line() -> None:
    from apdispatch.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve", "--cascade"]).cascade is True
    assert parser.parse_args(["serve"]).cascade is None  # the config file's, or the default
    assert parser.parse_args(["demo", "s.toml", "--cascade"]).cascade is True
