"""The latency estimator's maths against hand-computed cases."""

from __future__ import annotations

import pytest

from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.routing.estimator import DEFAULT_NETWORK_MS, ComputeModel, LatencyEstimator
from apdispatch.routing.registry import Registry


def _registry(slots: int = 2, latency_ms: float = 4.0, link_delay_ms: float = 10.0) -> Registry:
    registry = Registry(lease_s=5.0)
    registry.register(
        pb.RegisterRequest(
            worker_id="w1",
            address="127.0.0.1:1",
            cluster="edge-a",
            kind="edge",
            slots=slots,
            link_delay_ms=link_delay_ms,
            variants=[
                pb.VariantInfo(
                    name="v",
                    task="t",
                    accuracy=0.9,
                    latency_ms=latency_ms,
                    inputs=[pb.TensorSpec(name="input", datatype="FP32", shape=[-1, 4])],
                )
            ],
        )
    )
    return registry


def test_prior_prediction_is_link_delay_plus_announced_latency() -> None:
    registry = _registry()
    (target,) = registry.targets("t") or []
    estimator = LatencyEstimator()
    assert estimator.predict(target) == pytest.approx(10.0 + DEFAULT_NETWORK_MS + 4.0)


def test_queue_term_when_every_slot_is_busy() -> None:
    registry = _registry(slots=2, latency_ms=4.0)
    (target,) = registry.targets("t") or []
    estimator = LatencyEstimator()
    # 3 in flight + this one = 4 requests on 2 slots: 2 ahead of it wait for
    # a slot, served 2 at a time at 4 ms each -> 2 * 4 / 2 = 4 ms of queue.
    assert estimator.predict(target, in_flight=3) == pytest.approx(10.3 + 4.0 + 4.0)
    # 1 in flight: both run at once, no queue.
    assert estimator.predict(target, in_flight=1) == pytest.approx(10.3 + 4.0)


def test_compute_model_recovers_a_linear_interference_slope() -> None:
    model = ComputeModel.prior(1.0)
    # compute(n) = 2 + 0.5 * (n - 1), observed alternately at n = 1 and n = 3.
    for _ in range(400):
        model.observe(1.0, 2.0, alpha=0.05)
        model.observe(3.0, 3.0, alpha=0.05)
    assert model.slope() == pytest.approx(0.5, rel=0.02)
    assert model.predict(1.0) == pytest.approx(2.0, rel=0.02)
    assert model.predict(5.0) == pytest.approx(4.0, rel=0.02)


def test_constant_concurrency_gives_no_slope() -> None:
    model = ComputeModel.prior(1.0)
    for _ in range(50):
        model.observe(1.0, 3.0)
    assert model.slope() == 0.0
    assert model.predict(4.0) == pytest.approx(3.0, rel=0.1)


def test_network_mean_moves_towards_observations() -> None:
    registry = _registry(link_delay_ms=0.0)
    (target,) = registry.targets("t") or []
    estimator = LatencyEstimator(alpha=0.5)
    estimator.observe(target, in_flight_at_dispatch=0, network_ms=2.3, compute_ms=4.0)
    # 0.3 + 0.5 * (2.3 - 0.3) = 1.3
    assert estimator.network_ms(target.worker) == pytest.approx(1.3)


def test_work_queue_model_counts_what_is_left_of_the_running_request() -> None:
    # One slot, 4 ms a request, 10.3 ms round trip: a request dispatched at 0 reaches the
    # worker at 5.15 ms and frees the slot at 9.15 ms.
    registry = _registry(slots=1, latency_ms=4.0)
    (target,) = registry.targets("t") or []
    work = LatencyEstimator(queue_model="work")
    work.dispatched(target, now_s=0.0)
    target.worker.in_flight = 1
    # At 6 ms, a new request would reach the worker at 11.15 ms: the slot is free by then.
    assert work.predict(target, now_s=0.006) == pytest.approx(10.3 + 4.0)
    # At 1 ms it would arrive at 6.15 ms and wait 3 ms for the slot.
    assert work.predict(target, now_s=0.001) == pytest.approx(10.3 + 3.0 + 4.0)
    # "count" takes a whole compute for the request ahead, however far along it is.
    assert LatencyEstimator().predict(target) == pytest.approx(10.3 + 4.0 + 4.0)


def test_work_queue_model_takes_the_slot_that_frees_first() -> None:
    registry = _registry(slots=2, latency_ms=4.0, link_delay_ms=0.0)  # round trip 0.3 ms
    (target,) = registry.targets("t") or []
    work = LatencyEstimator(queue_model="work")
    for now_s, in_flight in ((0.0, 0), (0.002, 1), (0.0021, 2)):
        target.worker.in_flight = in_flight
        work.dispatched(target, now_s)
    target.worker.in_flight = 3
    # Slots free at 4.15 (first) and 6.15 ms (second); the third request queued behind the
    # first, to 8.15 ms. A fourth at 3 ms reaches the worker at 3.15 ms and waits for 6.15 ms.
    assert work.predict(target, now_s=0.003) == pytest.approx(0.3 + 3.0 + 4.0)
    # Once nothing is in flight the plan is forgotten: no wait.
    target.worker.in_flight = 0
    assert work.predict(target, now_s=0.003) == pytest.approx(0.3 + 4.0)


def test_unknown_queue_model_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="queue_model"):
        LatencyEstimator(queue_model="fifo")


def test_work_queue_model_waits_no_longer_than_count_says() -> None:
    # Five dispatched at once to one slot plan it busy to 20.15 ms; when four replies are back at
    # 1 ms (a batch served them), the plan is stale: "count" (one request ahead, 4 ms) caps it.
    registry = _registry(slots=1, latency_ms=4.0, link_delay_ms=0.0)
    (target,) = registry.targets("t") or []
    work = LatencyEstimator(queue_model="work")
    for in_flight in range(5):
        target.worker.in_flight = in_flight
        work.dispatched(target, 0.0)
    target.worker.in_flight = 1
    assert work.predict(target, now_s=0.001) == pytest.approx(0.3 + 4.0 + 4.0)
