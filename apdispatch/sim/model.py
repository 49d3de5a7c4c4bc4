"""The simulated system a scenario describes: variants, devices, workers, clusters.

Built once per scenario (:func:`build_model`) and shared by every simulated
run of it. Workers get the ids the live topology gives them
(``<cluster>-<n>``, n counting the cluster's workers from 1), register with the
simulator's AP through the same ``RegisterRequest`` a live worker sends, and
announce their calibrated batch-1 latency as the estimator's prior.

The device model (see ``apdispatch.sim.engine`` for how it runs):

- service time of variant v alone on device d: ``latency_ms(v) / d.speed``
  (plus the calibration's fixed overhead for manifest variants, see
  ``apdispatch.sim.calibration``); a batch of b: linear between the batch-1
  and batch-8 figures. A zoo variant's ``latency_ms`` comes from a latency
  profile (``apdispatch.sim.profile``: the shipped reference by default, not
  the build's measurement);
- up to ``slots`` executions run at once, and slow each other down linearly
  (ECSRL): with n running, each progresses at ``1 / (1 + interference*(n-1))``;
- more wait in the worker's FIFO queue;
- cloud workers batch requests for the same variant (``max_batch_size``,
  ``max_wait_ms`` of their device); a batch holds one slot;
- power: ``idle_w`` always, plus ``(busy_w - idle_w) * running / slots``.

Kinds: a cluster's ``kind`` when given; otherwise cloud when every variant is a
torch variant in the manifest (as in ``apdispatch.tools.topology``), or, for variants
only the scenario defines, when the device batches (``max_batch_size > 1``);
edge otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from apdispatch.common.confidence import Acceptance
from apdispatch.common.manifest import MANIFEST_NAME, Manifest, TensorSpec, load_manifest
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.scenario import Device, Scenario, ScenarioError
from apdispatch.sim.calibration import MANIFEST, MEASURED_BATCH, Calibration, batch_latency_ms
from apdispatch.sim.profile import LatencyProfile, reference_profile

EDGE = "edge"
CLOUD = "cloud"

# The input a variant announces when only the scenario defines it: the
# registry wants one, and every variant of a task must announce the same.
_GENERIC_INPUT = TensorSpec(name="input", datatype="FP32", shape=(-1,))


@dataclass(frozen=True, slots=True)
class SimVariant:
    name: str
    task: str
    accuracy: float
    latency_ms: float  # batch 1, speed-1.0 device, calibrated
    latency_ms_batch8: float
    overhead_ms: float  # fixed cost per execution, whatever the device
    runtime: str | None  # "onnx" / "torch" from the manifest; None if only the scenario defines it
    source: str  # "scenario" or "manifest"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    acceptance: tuple[Acceptance, ...] = ()  # the manifest's calibration (none for a scenario's own)

    def service_ms(self, speed: float, batch: int = 1) -> float:
        """One execution of ``batch`` requests alone on a device of ``speed``."""
        return batch_latency_ms(self.latency_ms, self.latency_ms_batch8, batch) / speed + self.overhead_ms


@dataclass(frozen=True, slots=True)
class SimWorker:
    worker_id: str
    cluster: str
    kind: str  # "edge" or "cloud"
    device: Device
    variants: tuple[SimVariant, ...]
    rtt_ms: float
    jitter_ms: float
    max_batch_size: int  # 1 unless the worker is a cloud worker on a batching device
    max_wait_ms: float

    @property
    def batching(self) -> bool:
        """Cloud workers batch (as ``workers.cloud.BatchingScheduler`` does), even at size 1."""
        return self.kind == CLOUD

    def register_request(self) -> pb.RegisterRequest:
        """What a live worker of this shape sends the AP."""
        speed = self.device.speed
        return pb.RegisterRequest(
            worker_id=self.worker_id,
            address=f"sim.{self.worker_id}:0",
            cluster=self.cluster,
            kind=self.kind,
            slots=self.device.slots,
            link_delay_ms=self.rtt_ms,
            streaming=True,
            variants=[
                pb.VariantInfo(
                    name=v.name,
                    task=v.task,
                    accuracy=v.accuracy,
                    latency_ms=v.service_ms(speed, 1),
                    latency_ms_batch8=v.service_ms(speed, MEASURED_BATCH),
                    inputs=[_spec(t) for t in v.inputs],
                    outputs=[_spec(t) for t in v.outputs],
                    max_batch_size=self.max_batch_size,
                    acceptance=[pb.Acceptance(**a.to_json()) for a in v.acceptance],
                )
                for v in self.variants
            ],
        )


@dataclass(frozen=True, slots=True)
class SimModel:
    scenario: Scenario
    variants: dict[str, SimVariant]
    workers: tuple[SimWorker, ...]
    calibration: Calibration
    latencies: str  # the latency profile the zoo's variants took their cost from

    @property
    def clusters(self) -> tuple[str, ...]:
        """Cluster names in scenario order."""
        return tuple(c.name for c in self.scenario.clusters)


def _spec(t: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=t.name, datatype=t.datatype, shape=list(t.shape))


def resolve_variant(
    name: str, scenario: Scenario, manifest: Manifest | None, calibration: Calibration, where: str
) -> SimVariant:
    """A variant's accuracy and cost: the scenario's table wins, the manifest fills in."""
    known = None
    if manifest is not None:
        known = next((v for v in manifest.variants if v.name == name), None)
    spec = scenario.variants.get(name)
    if spec is not None:
        if spec.latency_ms <= 0:
            raise ScenarioError(f"variants.{name}.latency_ms: must be > 0")
        if spec.latency_ms_batch8 is not None:
            b8 = spec.latency_ms_batch8
        elif known is not None:
            # Keep the measured batching gain of the variant it overrides.
            b8 = spec.latency_ms * known.latency_ms_batch8 / known.latency_ms_batch1
        else:
            b8 = MEASURED_BATCH * spec.latency_ms  # nothing known: batching gains nothing
        return SimVariant(
            name=name,
            task=spec.task,
            accuracy=spec.accuracy,
            latency_ms=spec.latency_ms,
            latency_ms_batch8=b8,
            overhead_ms=0.0,
            runtime=known.runtime if known is not None else None,
            source="scenario",
            inputs=known.inputs if known is not None else (_GENERIC_INPUT,),
            outputs=known.outputs if known is not None else (),
        )
    if known is None:
        where_manifest = "no model manifest" if manifest is None else f"the manifest in {manifest.root}"
        raise ScenarioError(
            f"{where}.variants: unknown variant {name!r}: neither the scenario's [variants] "
            f"nor {where_manifest} defines it"
        )
    return SimVariant(
        name=name,
        task=known.task,
        accuracy=known.accuracy,
        latency_ms=calibration.scale * known.latency_ms_batch1,
        latency_ms_batch8=calibration.scale * known.latency_ms_batch8,
        overhead_ms=calibration.overhead_ms,
        runtime=known.runtime,
        source="manifest",
        inputs=known.inputs,
        outputs=known.outputs,
        acceptance=known.acceptance,
    )


def _kind(declared: str | None, variants: Sequence[SimVariant], device: Device) -> str:
    if declared is not None:
        return declared
    runtimes = {v.runtime for v in variants if v.runtime is not None}
    if runtimes:
        return CLOUD if "torch" in runtimes else EDGE
    return CLOUD if device.max_batch_size > 1 else EDGE


def build_model(
    scenario: Scenario,
    manifest: Manifest | None = None,
    calibration: Calibration = MANIFEST,
    latencies: LatencyProfile | None = None,
) -> SimModel:
    """Every worker of ``scenario``, with calibrated variants; errors name the scenario key.

    The zoo's variants cost what ``latencies`` says (default: the reference
    profile, ``apdispatch.sim.profile``), not what the build measured.
    """
    profile = reference_profile() if latencies is None else latencies
    if manifest is not None:
        manifest = profile.apply(manifest)
    variants: dict[str, SimVariant] = {}
    workers: list[SimWorker] = []
    seen: set[str] = set()
    for i, cluster in enumerate(scenario.clusters):
        where = f"clusters[{i}]"
        if cluster.name in seen:
            raise ScenarioError(f"{where}.name: duplicate cluster {cluster.name!r}")
        seen.add(cluster.name)
        if cluster.rtt_ms < 0 or cluster.jitter_ms < 0:
            raise ScenarioError(f"{where}: rtt_ms and jitter_ms must be >= 0")
        n = 0
        for j, group in enumerate(cluster.workers):
            gwhere = f"{where}.workers[{j}]"
            if not group.variants:
                raise ScenarioError(f"{gwhere}.variants: at least one variant is needed")
            group_variants = []
            for name in group.variants:
                if name not in variants:
                    variants[name] = resolve_variant(name, scenario, manifest, calibration, gwhere)
                group_variants.append(variants[name])
            device = scenario.devices[group.device]
            kind = _kind(cluster.kind, group_variants, device)
            for _ in range(group.count):
                n += 1
                workers.append(
                    SimWorker(
                        worker_id=f"{cluster.name}-{n}",
                        cluster=cluster.name,
                        kind=kind,
                        device=device,
                        variants=tuple(group_variants),
                        rtt_ms=cluster.rtt_ms,
                        jitter_ms=cluster.jitter_ms,
                        max_batch_size=max(1, device.max_batch_size) if kind == CLOUD else 1,
                        max_wait_ms=max(0.0, device.max_wait_ms) if kind == CLOUD else 0.0,
                    )
                )
    if not workers:
        raise ScenarioError("clusters: the scenario has no workers")
    tasks = {v.task for v in variants.values()}
    for i, app in enumerate(scenario.apps):
        if app.task not in tasks:
            raise ScenarioError(
                f"apps[{i}].task: no worker serves task {app.task!r} (served: {', '.join(sorted(tasks))})"
            )
    return SimModel(
        scenario=scenario,
        variants=variants,
        workers=tuple(workers),
        calibration=calibration,
        latencies=profile.name,
    )


def load_model(
    scenario: Scenario,
    models: Path | None,
    calibration: Calibration = MANIFEST,
    latencies: LatencyProfile | None = None,
) -> SimModel:
    """The scenario's system; the manifest in ``models`` fills in variants (when it is there)."""
    manifest = None
    if models is not None and (models / MANIFEST_NAME).is_file():
        manifest = load_manifest(models)
    return build_model(scenario, manifest, calibration, latencies)
