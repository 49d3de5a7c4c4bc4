"""Which workers exist, what they serve, and how busy the AP keeps them.

Workers announce themselves (Register) and keep a lease alive (Heartbeat);
a lease that runs out removes the worker. Targets per task are cached and
rebuilt only when the set of workers changes, so the request path reads a
ready list.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from apdispatch.common.confidence import Acceptance
from apdispatch.common.errors import InvalidRequestError, PermissionDeniedError
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.common.tensors import DATATYPE_TO_DTYPE, TensorSpec


@dataclass(frozen=True, slots=True)
class VariantInfo:
    name: str
    task: str
    accuracy: float
    latency_ms: float  # alone on its worker, as the worker announced it
    latency_ms_batch8: float
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    # Per accuracy floor (ascending), the confidence its answers need to reach it.
    acceptance: tuple[Acceptance, ...] = ()


@dataclass(slots=True, eq=False)
class Worker:
    worker_id: str
    address: str
    cluster: str
    kind: str
    slots: int
    link_delay_ms: float
    streaming: bool
    variants: dict[str, VariantInfo]
    expires_at: float
    registration: pb.RegisterRequest
    in_flight: int = 0  # requests sent and not yet answered
    # Out of routing for now: it failed or stalled (apdispatch.routing.outlier).
    ejected: bool = False
    # The identity (certificate subject or token) that registered it; "" on an open AP.
    owner: str = ""


@dataclass(slots=True, eq=False)
class Target:
    """A (worker, variant) pair: what a routing decision picks."""

    worker: Worker
    variant: VariantInfo
    key: str = field(init=False)

    def __post_init__(self) -> None:
        self.key = f"{self.worker.cluster}/{self.worker.worker_id}/{self.variant.name}"


def _specs(raw: Iterable[pb.TensorSpec]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_proto(t) for t in raw)


def _validate_registration(req: pb.RegisterRequest) -> None:
    if not req.worker_id:
        raise InvalidRequestError("worker_id", "must not be empty")
    if not req.address or ":" not in req.address:
        raise InvalidRequestError("address", f"expected host:port, got {req.address!r}")
    if req.slots < 1:
        raise InvalidRequestError("slots", f"must be >= 1, got {req.slots}")
    if req.kind not in ("edge", "cloud"):
        raise InvalidRequestError("kind", f"must be 'edge' or 'cloud', got {req.kind!r}")
    if not req.variants:
        raise InvalidRequestError("variants", "at least one variant is needed")
    for i, v in enumerate(req.variants):
        if not v.name or not v.task:
            raise InvalidRequestError(f"variants[{i}]", "name and task must be set")
        if not 0.0 <= v.accuracy <= 1.0:
            raise InvalidRequestError(f"variants[{i}].accuracy", "must be in [0, 1]")
        for key in ("latency_ms", "latency_ms_batch8"):
            value = getattr(v, key)
            if not (math.isfinite(value) and value >= 0.0):
                raise InvalidRequestError(f"variants[{i}].{key}", f"must be finite and >= 0, got {value}")
        if v.max_batch_size < 0:
            raise InvalidRequestError(
                f"variants[{i}].max_batch_size", f"must be >= 0, got {v.max_batch_size}"
            )
        for j, a in enumerate(v.acceptance):
            for key in ("floor", "threshold", "coverage", "accuracy"):
                value = getattr(a, key)
                if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                    where = f"variants[{i}].acceptance[{j}].{key}"
                    raise InvalidRequestError(where, f"must be in [0, 1], got {value}")
        if not v.inputs:
            raise InvalidRequestError(f"variants[{i}].inputs", "at least one input is needed")
        _validate_specs(f"variants[{i}].inputs", v.inputs)
        _validate_specs(f"variants[{i}].outputs", v.outputs)


# A declared spec is what the AP checks requests against and slices replies
# by: a datatype it cannot map or a shape it cannot size would fail there.
_MAX_RANK = 16


def _validate_specs(where: str, specs: Sequence[pb.TensorSpec]) -> None:
    names: set[str] = set()
    for j, spec in enumerate(specs):
        at = f"{where}[{j}]"
        if not spec.name:
            raise InvalidRequestError(f"{at}.name", "must not be empty")
        if spec.name in names:
            raise InvalidRequestError(f"{at}.name", f"{spec.name!r} is declared twice")
        names.add(spec.name)
        if spec.datatype not in DATATYPE_TO_DTYPE:
            raise InvalidRequestError(
                f"{at}.datatype",
                f"unknown datatype {spec.datatype[:32]!r} (known: {', '.join(DATATYPE_TO_DTYPE)})",
            )
        if len(spec.shape) > _MAX_RANK:
            raise InvalidRequestError(f"{at}.shape", f"at most {_MAX_RANK} dimensions, got {len(spec.shape)}")
        bad = [d for d in spec.shape if d != -1 and d < 1]
        if bad:
            raise InvalidRequestError(f"{at}.shape", f"each dimension must be -1 (any) or >= 1, got {bad[0]}")


class Registry:
    def __init__(self, lease_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.lease_s = lease_s
        self._clock = clock
        self._workers: dict[str, Worker] = {}
        self._targets: dict[str, list[Target]] = {}
        self._routable: dict[str, list[Target]] = {}  # per task, the targets of workers not ejected
        self._inputs: dict[str, tuple[TensorSpec, ...]] = {}
        self.version = 0  # bumped on every change of the worker set

    # -- membership -------------------------------------------------------

    def _owned(self, worker_id: str, owner: str) -> Worker | None:
        """The live worker of that id; PermissionDeniedError when another identity owns it."""
        worker = self._workers.get(worker_id)
        if worker is None or worker.expires_at <= self._clock():
            return None  # a lapsed lease frees the id, whether or not expire() ran yet
        if worker.owner != owner:
            raise PermissionDeniedError(
                f"worker_id: {worker_id[:64]!r} is registered by another identity; "
                "it is free again once that one deregisters or its lease runs out"
            )
        return worker

    def register(self, req: pb.RegisterRequest, owner: str = "") -> Worker:
        _validate_registration(req)
        live = self._owned(req.worker_id, owner)
        variants = {
            v.name: VariantInfo(
                name=v.name,
                task=v.task,
                accuracy=v.accuracy,
                latency_ms=v.latency_ms,
                latency_ms_batch8=v.latency_ms_batch8,
                inputs=_specs(v.inputs),
                outputs=_specs(v.outputs),
                max_batch_size=max(1, v.max_batch_size),
                acceptance=tuple(
                    sorted(
                        (Acceptance(a.floor, a.threshold, a.coverage, a.accuracy) for a in v.acceptance),
                        key=lambda a: a.floor,
                    )
                ),
            )
            for v in req.variants
        }
        for v in variants.values():
            known = self._inputs.get(v.task)
            if known is not None and known != v.inputs and self._serves_task_elsewhere(v.task, req.worker_id):
                raise InvalidRequestError(
                    f"variants[{v.name}].inputs",
                    f"differ from the inputs task {v.task!r} has on other workers",
                )
        old = self._workers.get(req.worker_id)
        worker = Worker(
            worker_id=req.worker_id,
            address=req.address,
            cluster=req.cluster or "default",
            kind=req.kind,
            slots=req.slots,
            link_delay_ms=req.link_delay_ms,
            streaming=req.streaming,
            variants=variants,
            expires_at=self._clock() + self.lease_s,
            registration=req,
            # Requests already sent to it are still in flight after a re-register.
            in_flight=old.in_flight if old is not None else 0,
            owner=owner if live is None else live.owner,
        )
        self._workers[req.worker_id] = worker
        self._rebuild()
        return worker

    def heartbeat(self, worker_id: str, owner: str = "") -> bool:
        worker = self._workers.get(worker_id)
        if worker is None:
            return False
        if worker.owner != owner and self._owned(worker_id, owner) is None:
            return False  # another identity's lapsed lease: not this caller's to renew
        worker.expires_at = self._clock() + self.lease_s
        return True

    def deregister(self, worker_id: str, owner: str = "") -> Worker | None:
        self._owned(worker_id, owner)  # refused while another identity's lease runs
        worker = self._workers.pop(worker_id, None)
        if worker is not None:
            self._rebuild()
        return worker

    def expire(self) -> list[Worker]:
        """Forget every worker whose lease ran out; return them."""
        now = self._clock()
        gone = [w for w in self._workers.values() if w.expires_at <= now]
        for w in gone:
            del self._workers[w.worker_id]
        if gone:
            self._rebuild()
        return gone

    def _serves_task_elsewhere(self, task: str, worker_id: str) -> bool:
        return any(
            w.worker_id != worker_id and any(v.task == task for v in w.variants.values())
            for w in self._workers.values()
        )

    def _rebuild(self) -> None:
        targets: dict[str, list[Target]] = {}
        inputs: dict[str, tuple[TensorSpec, ...]] = {}
        for worker in self._workers.values():
            for variant in worker.variants.values():
                targets.setdefault(variant.task, []).append(Target(worker, variant))
                inputs.setdefault(variant.task, variant.inputs)
        self._targets = targets
        self._inputs = inputs
        self._filter()
        self.version += 1

    def _filter(self) -> None:
        # When every worker of a task is out, all stay in (Envoy's panic
        # routing): a request then tries a worker rather than none.
        self._routable = {
            task: [t for t in targets if not t.worker.ejected] or targets
            for task, targets in self._targets.items()
        }

    def set_ejected(self, worker: Worker, ejected: bool) -> None:
        """Take a worker out of routing, or put it back (the outlier detector's call)."""
        if worker.ejected != ejected:
            worker.ejected = ejected
            self._filter()

    # -- reads on the request path -----------------------------------------

    def targets(self, task: str) -> list[Target] | None:
        """The targets to route ``task`` to (ejected workers left out); None when no worker serves it."""
        return self._routable.get(task)

    def all_targets(self, task: str) -> list[Target]:
        """Every target serving ``task``, ejected ones included."""
        return self._targets.get(task, [])

    def inputs(self, task: str) -> tuple[TensorSpec, ...] | None:
        return self._inputs.get(task)

    def tasks(self) -> list[str]:
        return sorted(self._targets)

    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    def get(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    def lease_left(self, worker: Worker) -> float:
        return max(0.0, worker.expires_at - self._clock())
