"""Scenario files (TOML): apps, variants, devices, clusters and arrivals.

The live demo, the load generator and the simulator all read scenarios
through this module. The format is the one in DESIGN.md; extra keys:

- ``[[clusters]] kind = "edge" | "cloud"``: default is cloud when every
  variant its workers serve is a torch variant, edge otherwise.
- ``[devices.X] max_batch_size``, ``max_wait_ms``: batching (cloud devices).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


class ScenarioError(ValueError):
    """A scenario file that does not say what it must; the message names the key."""


@dataclass(frozen=True, slots=True)
class App:
    name: str
    task: str
    deadline_ms: float
    min_accuracy: float
    rate_qps: float  # queries per second sent by one client stream
    share: float  # share of new client streams of this app


@dataclass(frozen=True, slots=True)
class VariantSpec:
    """A variant defined (or overridden) by the scenario instead of the model manifest."""

    name: str
    task: str
    accuracy: float
    latency_ms: float  # one request alone on a speed-1.0 device
    latency_ms_batch8: float | None = None


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    speed: float = 1.0  # relative to the profiling machine
    slots: int = 1
    interference: float = 0.0  # each extra concurrent request adds this fraction
    idle_w: float = 0.0
    busy_w: float = 0.0
    max_batch_size: int = 1
    max_wait_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class WorkerGroup:
    device: str
    count: int
    variants: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    rtt_ms: float
    jitter_ms: float
    workers: tuple[WorkerGroup, ...]
    kind: str | None = None  # "edge" / "cloud"; None: decided from the variants' runtime


@dataclass(frozen=True, slots=True)
class ArrivalStep:
    at_s: float
    clients_per_min: float


@dataclass(frozen=True, slots=True)
class Arrivals:
    schedule: tuple[ArrivalStep, ...]
    stream_mean_s: float

    def clients_per_min_at(self, t: float) -> float:
        rate = 0.0
        for step in self.schedule:
            if step.at_s <= t:
                rate = step.clients_per_min
        return rate


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    duration_s: float
    seed: int
    apps: tuple[App, ...]
    clusters: tuple[Cluster, ...]
    arrivals: Arrivals
    devices: dict[str, Device] = field(default_factory=dict)
    variants: dict[str, VariantSpec] = field(default_factory=dict)
    path: Path | None = None

    def app(self, name: str) -> App:
        for app in self.apps:
            if app.name == name:
                return app
        raise KeyError(name)

    def scaled(self, duration_s: float) -> Scenario:
        """The same scenario compressed in time to ``duration_s``.

        Arrival steps and stream lifetimes shrink with the duration; rates per
        stream stay, so the load level of each phase is kept.
        """
        if not (math.isfinite(duration_s) and duration_s > 0):
            raise ScenarioError(f"duration: must be a finite number > 0, got {duration_s}")
        k = duration_s / self.duration_s
        arrivals = Arrivals(
            schedule=tuple(
                ArrivalStep(at_s=s.at_s * k, clients_per_min=s.clients_per_min / k)
                for s in self.arrivals.schedule
            ),
            stream_mean_s=self.arrivals.stream_mean_s * k,
        )
        return replace(self, duration_s=duration_s, arrivals=arrivals)


def _require(table: dict[str, Any], key: str, where: str) -> Any:
    if key not in table:
        raise ScenarioError(f"{where}: missing key {key!r}")
    return table[key]


def _number(
    table: dict[str, Any],
    key: str,
    where: str,
    default: float | None = None,
    *,
    at_least: float | None = None,
    above: float | None = None,
) -> float:
    """``table[key]`` (or ``default``): a finite number, >= ``at_least`` and > ``above`` when given."""
    value = table.get(key, default)
    if value is None:
        raise ScenarioError(f"{where}: missing key {key!r}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(f"{where}.{key}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ScenarioError(f"{where}.{key}: expected a finite number, got {value!r}")
    if at_least is not None and value < at_least:
        raise ScenarioError(f"{where}.{key}: must be >= {at_least:g}, got {value!r}")
    if above is not None and not value > above:
        raise ScenarioError(f"{where}.{key}: must be > {above:g}, got {value!r}")
    return float(value)


def _count(table: dict[str, Any], key: str, where: str, default: int) -> int:
    """``table[key]`` (or ``default``): an integer >= 1."""
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(f"{where}.{key}: expected an integer, got {value!r}")
    if value < 1:
        raise ScenarioError(f"{where}.{key}: must be >= 1, got {value!r}")
    return value


def _seed(doc: dict[str, Any]) -> int:
    """The scenario's seed: an integer >= 0 (numpy's generators take no other)."""
    value = doc.get("seed", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ScenarioError(f"scenario.seed: expected an integer >= 0, got {value!r}")
    return value


def parse_scenario(doc: dict[str, Any], path: Path | None = None) -> Scenario:
    apps = []
    for i, raw in enumerate(_require(doc, "apps", "scenario")):
        where = f"apps[{i}]"
        app = App(
            name=str(_require(raw, "name", where)),
            task=str(_require(raw, "task", where)),
            deadline_ms=_number(raw, "deadline_ms", where, above=0.0),
            min_accuracy=_number(raw, "min_accuracy", where),
            rate_qps=_number(raw, "rate_qps", where, above=0.0),
            share=_number(raw, "share", where, 1.0, at_least=0.0),
        )
        if not 0.0 <= app.min_accuracy <= 1.0:
            raise ScenarioError(f"{where}.min_accuracy: must be in [0, 1]")
        apps.append(app)
    if not apps:
        raise ScenarioError("scenario: at least one [[apps]] entry is needed")

    variants = {}
    for name, raw in doc.get("variants", {}).items():
        where = f"variants.{name}"
        b8 = raw.get("latency_ms_batch8")
        variants[name] = VariantSpec(
            name=name,
            task=str(_require(raw, "task", where)),
            accuracy=_number(raw, "accuracy", where, at_least=0.0),
            latency_ms=_number(raw, "latency_ms", where, above=0.0),
            latency_ms_batch8=None if b8 is None else _number(raw, "latency_ms_batch8", where, above=0.0),
        )

    devices = {}
    for name, raw in doc.get("devices", {}).items():
        where = f"devices.{name}"
        devices[name] = Device(
            name=name,
            speed=_number(raw, "speed", where, 1.0, above=0.0),
            slots=_count(raw, "slots", where, 1),
            interference=_number(raw, "interference", where, 0.0, at_least=0.0),
            idle_w=_number(raw, "idle_w", where, 0.0, at_least=0.0),
            busy_w=_number(raw, "busy_w", where, 0.0, at_least=0.0),
            max_batch_size=_count(raw, "max_batch_size", where, 1),
            max_wait_ms=_number(raw, "max_wait_ms", where, 0.0, at_least=0.0),
        )

    clusters = []
    for i, raw in enumerate(_require(doc, "clusters", "scenario")):
        where = f"clusters[{i}]"
        groups = []
        for j, w in enumerate(_require(raw, "workers", where)):
            gwhere = f"{where}.workers[{j}]"
            device = str(_require(w, "device", gwhere))
            if device not in devices:
                raise ScenarioError(f"{gwhere}.device: unknown device {device!r}")
            groups.append(
                WorkerGroup(
                    device=device,
                    count=_count(w, "count", gwhere, 1),
                    variants=tuple(str(v) for v in _require(w, "variants", gwhere)),
                )
            )
        kind = raw.get("kind")
        if kind not in (None, "edge", "cloud"):
            raise ScenarioError(f"{where}.kind: must be 'edge' or 'cloud'")
        clusters.append(
            Cluster(
                name=str(_require(raw, "name", where)),
                rtt_ms=_number(raw, "rtt_ms", where, at_least=0.0),
                jitter_ms=_number(raw, "jitter_ms", where, 0.0, at_least=0.0),
                workers=tuple(groups),
                kind=kind,
            )
        )

    raw_arrivals = _require(doc, "arrivals", "scenario")
    schedule = tuple(
        sorted(
            (
                ArrivalStep(
                    at_s=_number(s, "at_s", f"arrivals.schedule[{i}]", at_least=0.0),
                    clients_per_min=_number(s, "clients_per_min", f"arrivals.schedule[{i}]", at_least=0.0),
                )
                for i, s in enumerate(_require(raw_arrivals, "schedule", "arrivals"))
            ),
            key=lambda s: s.at_s,
        )
    )
    if not schedule:
        raise ScenarioError("arrivals.schedule: at least one step is needed")
    arrivals = Arrivals(
        schedule=schedule,
        stream_mean_s=_number(raw_arrivals, "stream_mean_s", "arrivals", 30.0, above=0.0),
    )
    return Scenario(
        name=str(doc.get("name", path.stem if path else "scenario")),
        duration_s=_number(doc, "duration_s", "scenario", above=0.0),
        seed=_seed(doc),
        apps=tuple(apps),
        clusters=tuple(clusters),
        arrivals=arrivals,
        devices=devices,
        variants=variants,
        path=path,
    )


def load_scenario(path: Path | str) -> Scenario:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: {exc}") from exc
    return parse_scenario(doc, path)
