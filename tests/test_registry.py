"""Registry membership, leases and registration checks."""

from __future__ import annotations

import pytest

from apdispatch.common.confidence import acceptance_for
from apdispatch.common.errors import InvalidRequestError
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.routing.registry import Registry


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _req(worker_id: str, task: str = "t", **kw: object) -> pb.RegisterRequest:
    fields: dict[str, object] = {
        "worker_id": worker_id,
        "address": "127.0.0.1:7000",
        "cluster": "c",
        "kind": "edge",
        "slots": 1,
        "variants": [
            pb.VariantInfo(
                name=f"{task}-v",
                task=task,
                accuracy=0.9,
                latency_ms=1.0,
                inputs=[pb.TensorSpec(name="input", datatype="FP32", shape=[-1, 4])],
            )
        ],
    }
    fields.update(kw)
    return pb.RegisterRequest(**fields)  # type: ignore[arg-type]


def test_lease_expires_without_heartbeat() -> None:
    clock = FakeClock()
    registry = Registry(lease_s=3.0, clock=clock)
    registry.register(_req("a"))
    registry.register(_req("b"))
    clock.now += 2.0
    assert registry.heartbeat("a")
    clock.now += 1.5
    gone = registry.expire()
    assert [w.worker_id for w in gone] == ["b"]
    assert [t.worker.worker_id for t in registry.targets("t") or []] == ["a"]
    assert not registry.heartbeat("b")


def test_targets_rebuilt_on_change() -> None:
    registry = Registry(lease_s=3.0)
    assert registry.targets("t") is None
    registry.register(_req("a"))
    registry.register(_req("b", task="u"))
    assert registry.tasks() == ["t", "u"]
    registry.deregister("a")
    assert registry.targets("t") is None
    assert registry.tasks() == ["u"]


def test_reregistration_keeps_in_flight() -> None:
    registry = Registry(lease_s=3.0)
    worker = registry.register(_req("a"))
    worker.in_flight = 3
    again = registry.register(_req("a", slots=2))
    assert again.in_flight == 3
    assert again.slots == 2


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"worker_id": ""}, "worker_id"),
        ({"address": "nohostport"}, "address"),
        ({"slots": 0}, "slots"),
        ({"kind": "fog"}, "kind"),
        ({"variants": []}, "variants"),
    ],
)
def test_bad_registration_names_the_field(override: dict[str, object], field: str) -> None:
    registry = Registry(lease_s=3.0)
    request = _req("a")
    for key, value in override.items():
        if key == "variants":
            del request.variants[:]
        else:
            setattr(request, key, value)
    with pytest.raises(InvalidRequestError) as info:
        registry.register(request)
    assert info.value.field == field


def test_acceptance_tables_are_kept_by_floor_and_checked() -> None:
    registry = Registry(lease_s=3.0)
    request = _req("a")
    request.variants[0].acceptance.extend(
        [
            pb.Acceptance(floor=0.9, threshold=0.7, coverage=0.6, accuracy=0.93),
            pb.Acceptance(floor=0.8, threshold=0.4, coverage=0.9, accuracy=0.85),
        ]
    )
    worker = registry.register(request)
    table = worker.variants["t-v"].acceptance
    assert [(a.floor, a.threshold, a.coverage) for a in table] == [(0.8, 0.4, 0.9), (0.9, 0.7, 0.6)]
    assert acceptance_for(table, 0.85) == table[1]
    request.variants[0].acceptance[1].threshold = 1.5
    with pytest.raises(InvalidRequestError) as info:
        registry.register(request)
    assert info.value.field == "variants[0].acceptance[1].threshold"
