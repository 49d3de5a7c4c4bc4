"""From a scenario to worker processes: one launch spec per worker.

The live demo (processes on loopback) and the compose file (one container
per worker) both start their workers from these specs, so the two run the
same topology: same worker ids, clusters, variants and emulation flags.

A scenario describes devices of different speeds and clusters at different
round trips; one machine (or one container host) emulates them. A worker on
a device of ``speed`` s < 1 holds its slot for the variant's latency from the
simulator's latency profile (the shipped reference by default) divided by s
(``--service-ms``), the service time the simulator gives it, whatever the speed
and load of the machine that runs it; a variant the profile does not know runs
``slowdown = 1 / s`` times slower than it really took. A worker in a cluster
with ``rtt_ms`` r adds r ms of round trip to every request
(``--link-delay-ms``). Waiting can only make a device slower: a device of
speed 1 or more runs at this machine's speed. What the live topology does not
emulate, and the simulator does: the cluster's ``jitter_ms`` and the device's
``interference`` (live, requests sharing a worker interfere for real) and
power draw.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from apdispatch.common.manifest import Manifest
from apdispatch.scenario import Scenario, ScenarioError
from apdispatch.sim.profile import LatencyProfile, reference_profile

EDGE = "edge"
CLOUD = "cloud"

# Worker ids double as compose service names and DNS names: keep them to
# what both accept.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")

# Which runtimes each kind of worker can load: an edge device has ONNX Runtime
# and no torch; the cloud worker runs PyTorch variants, and ONNX ones as well.
_RUNTIMES_OF_KIND = {EDGE: ("onnx",), CLOUD: ("torch", "onnx")}
_KNOWN_RUNTIMES = {"onnx", "torch"}


class TopologyError(ScenarioError):
    """A scenario that cannot be turned into worker processes; the message names the key."""


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One worker process, as the scenario asks for it."""

    worker_id: str
    kind: str  # "edge" or "cloud"
    cluster: str
    device: str  # the scenario's device name
    variants: tuple[str, ...]
    slots: int
    slowdown: float  # 1 / device speed: every compute time is multiplied by it (if > 1)
    link_delay_ms: float  # the cluster's RTT, added to every request
    max_batch_size: int = 1  # cloud only
    max_wait_ms: float = 0.0  # cloud only
    # (variant, ms at batch 1, ms at batch 8): fixed slot hold times on this device
    service_ms: tuple[tuple[str, float, float], ...] = ()

    def argv(
        self,
        *,
        listen: str,
        models: str,
        ap: str | None,
        advertise: str | None = None,
        device: str | None = None,
    ) -> list[str]:
        """Arguments of ``apdispatch`` (without the program itself) that start this worker."""
        args = [
            "worker",
            self.kind,
            "--listen",
            listen,
            "--models",
            models,
            "--variants",
            ",".join(self.variants),
        ]
        if ap is not None:
            args += ["--ap", ap]
        args += [
            "--cluster",
            self.cluster,
            "--slots",
            str(self.slots),
            "--slowdown",
            format_number(self.slowdown),
            "--link-delay-ms",
            format_number(self.link_delay_ms),
            "--worker-id",
            self.worker_id,
        ]
        if self.service_ms:
            args += [
                "--service-ms",
                ",".join(f"{v}={format_number(b1)}:{format_number(b8)}" for v, b1, b8 in self.service_ms),
            ]
        if advertise is not None:
            args += ["--advertise", advertise]
        if self.kind == CLOUD:
            args += [
                "--max-batch-size",
                str(self.max_batch_size),
                "--max-wait-ms",
                format_number(self.max_wait_ms),
            ]
            if device is not None:
                args += ["--device", device]
        return args


def format_number(value: float) -> str:
    """A short, stable spelling of a float for command lines (``4`` rather than ``4.0``)."""
    return f"{value:.6g}"


def known_variants(scenario: Scenario, manifest: Manifest | None) -> set[str]:
    names = set(scenario.variants)
    if manifest is not None:
        names.update(v.name for v in manifest.variants)
    return names


def _variant_task(name: str, scenario: Scenario, manifest: Manifest | None) -> str | None:
    if name in scenario.variants:
        return scenario.variants[name].task
    if manifest is not None:
        for v in manifest.variants:
            if v.name == name:
                return v.task
    return None


def _variant_runtime(name: str, manifest: Manifest | None) -> str | None:
    if manifest is None:
        return None
    for v in manifest.variants:
        if v.name == name:
            return v.runtime
    return None


def _group_kind(
    declared: str | None,
    variants: Sequence[str],
    manifest: Manifest | None,
    where: str,
) -> str:
    """The worker kind of one group: the cluster's ``kind``, else its variants' runtime."""
    runtimes = {r for r in (_variant_runtime(v, manifest) for v in variants) if r is not None}
    unsupported = runtimes - _KNOWN_RUNTIMES
    if unsupported:
        raise TopologyError(f"{where}.variants: unknown runtime(s) {sorted(unsupported)}")
    if declared is not None:
        allowed = _RUNTIMES_OF_KIND[declared]
        wrong = [v for v in variants if _variant_runtime(v, manifest) not in (None, *allowed)]
        if wrong:
            raise TopologyError(
                f"{where}.variants: a {declared} worker runs only {'/'.join(allowed)} variants, "
                f"not {', '.join(wrong)}"
            )
        return declared
    if not runtimes:
        # Without a manifest (compose on a machine that has not built the
        # zoo) nothing says which runtime the variants need.
        raise TopologyError(
            f"{where}: cannot tell edge from cloud without the model manifest; "
            'set the cluster\'s kind = "edge" | "cloud"'
        )
    if runtimes == {"torch"}:
        return CLOUD
    if "torch" in runtimes:
        # The scenario format's default would make this an edge worker, which
        # cannot load torch: say so rather than fail at start-up.
        raise TopologyError(
            f"{where}.variants: mixes onnx and torch variants, which only a cloud worker runs; "
            'set the cluster\'s kind = "cloud" or split the group'
        )
    return EDGE


def service_times(
    variants: Sequence[str], speed: float, profile: LatencyProfile | None
) -> tuple[tuple[str, float, float], ...]:
    """Slot hold times on a device of ``speed`` for the variants ``profile`` knows (none at speed >= 1)."""
    if speed >= 1.0 or profile is None or profile.variants is None:
        return ()
    table = profile.variants
    return tuple((v, table[v][0] / speed, table[v][1] / speed) for v in variants if v in table)


def build_topology(
    scenario: Scenario,
    manifest: Manifest | None = None,
    profile: LatencyProfile | None = None,
) -> tuple[WorkerSpec, ...]:
    """One spec per worker process of ``scenario``, in file order.

    ``profile`` gives the emulated devices' service times (default: the
    reference profile; ``measured``: emulate by slowdown alone).

    With a manifest, every variant must be in it or in the scenario's
    ``[variants]``; without one (e.g. writing a compose file on a machine
    that has not built the zoo), only the scenario's own variants can be
    checked, and every cluster must say its ``kind``.
    Worker ids are ``<cluster>-<n>``, n counting the cluster's workers from 1.
    """
    known = known_variants(scenario, manifest)
    if profile is None:
        profile = reference_profile()
    seen_clusters: set[str] = set()
    specs: list[WorkerSpec] = []
    for i, cluster in enumerate(scenario.clusters):
        where = f"clusters[{i}]"
        if not _NAME_RE.match(cluster.name):
            raise TopologyError(
                f"{where}.name: {cluster.name!r} must be lowercase letters, digits and '-' "
                "(it names workers, services and hosts)"
            )
        if cluster.name in seen_clusters:
            raise TopologyError(f"{where}.name: duplicate cluster {cluster.name!r}")
        seen_clusters.add(cluster.name)
        if cluster.rtt_ms < 0:
            raise TopologyError(f"{where}.rtt_ms: must be >= 0")
        n = 0
        for j, group in enumerate(cluster.workers):
            gwhere = f"{where}.workers[{j}]"
            if not group.variants:
                raise TopologyError(f"{gwhere}.variants: at least one variant is needed")
            if group.count < 0:
                raise TopologyError(f"{gwhere}.count: must be >= 0")
            if manifest is not None:
                for name in group.variants:
                    if name not in known:
                        raise TopologyError(
                            f"{gwhere}.variants: unknown variant {name!r} (known: {', '.join(sorted(known))})"
                        )
            kind = _group_kind(cluster.kind, group.variants, manifest, gwhere)
            device = scenario.devices[group.device]
            for _ in range(group.count):
                n += 1
                specs.append(
                    WorkerSpec(
                        worker_id=f"{cluster.name}-{n}",
                        kind=kind,
                        cluster=cluster.name,
                        device=device.name,
                        variants=group.variants,
                        slots=device.slots,
                        slowdown=1.0 / device.speed,
                        link_delay_ms=cluster.rtt_ms,
                        max_batch_size=device.max_batch_size if kind == CLOUD else 1,
                        max_wait_ms=device.max_wait_ms if kind == CLOUD else 0.0,
                        service_ms=service_times(group.variants, device.speed, profile),
                    )
                )
    if not specs:
        raise TopologyError("clusters: the scenario has no workers")
    _check_apps_served(scenario, manifest, specs)
    return tuple(specs)


def _check_apps_served(scenario: Scenario, manifest: Manifest | None, specs: Sequence[WorkerSpec]) -> None:
    """Every app's task must be served somewhere, or all its requests would be rejected."""
    served: set[str] = set()
    for spec in specs:
        for name in spec.variants:
            task = _variant_task(name, scenario, manifest)
            if task is None:
                return  # a variant of unknown task: nothing can be concluded
            served.add(task)
    for i, app in enumerate(scenario.apps):
        if app.task not in served:
            raise TopologyError(
                f"apps[{i}].task: no worker serves task {app.task!r} "
                f"(served: {', '.join(sorted(served)) or 'none'})"
            )
