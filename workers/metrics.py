"""A worker's Prometheus endpoint: requests, compute and queue times, slots; one registry per worker.

:class:`WorkerMetrics` is told of each request by the servicer (``started``,
then ``served`` or ``failed``) and reads the slots at scrape time. Model labels
are the worker's own variants; a request for any other name counts under
``(unknown)``, so that callers cannot grow the label set. Every metric is
listed in docs/operations.md ("Metrics").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from apdispatch.common.errors import ApdispatchError
from workers.runtime import InferResult, Slots

PREFIX = "apdispatch_worker"
UNKNOWN_MODEL = "(unknown)"
# Seconds: fine where models run (sub-millisecond to tens of ms), coarse beyond.
TIME_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


def status_of(exc: BaseException) -> str:
    """The gRPC status name a failed request is answered with."""
    if isinstance(exc, ApdispatchError):
        return exc.code.name
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    return grpc.StatusCode.INTERNAL.name


class _SlotsCollector(Collector):
    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        slots = m.slots
        values = (
            (
                "slots",
                "Requests (batches, on a cloud worker) the worker runs at once.",
                slots.count if slots else 0,
            ),
            ("busy_slots", "Slots running a request or batch now.", slots.busy if slots else 0),
            ("queued_requests", "Requests waiting for a free slot now.", slots.waiting if slots else 0),
            ("in_flight_requests", "Requests received and not yet answered.", m.in_flight),
            (
                "ready",
                "1 while the worker serves (not loading, not draining), else 0.",
                1 if m.ready() else 0,
            ),
        )
        for name, doc, value in values:
            gauge = GaugeMetricFamily(f"{PREFIX}_{name}", doc)
            gauge.add_metric([], value)
            yield gauge


class WorkerMetrics:
    """The worker's counters and histograms, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # What watch() names: the slots, the served models (filled in once loaded), readiness.
        self.slots: Slots | None = None
        self.models: Mapping[str, object] = {}
        self.ready: Callable[[], bool] = lambda: False
        self.in_flight = 0
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Inference requests by model and the gRPC status they were answered with.",
            ["model", "code"],
            registry=self.registry,
        )
        self.compute = Histogram(
            f"{PREFIX}_compute_seconds",
            "Served requests: time their execution held a slot (emulated slowdown included), by model.",
            ["model"],
            buckets=TIME_BUCKETS,
            registry=self.registry,
        )
        self.queue = Histogram(
            f"{PREFIX}_queue_seconds",
            "Served requests: time waiting for a slot (and, batching, for the batch), by model.",
            ["model"],
            buckets=TIME_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_SlotsCollector(self))

    def watch(self, slots: Slots, models: Mapping[str, object], ready: Callable[[], bool]) -> None:
        """What to read: the slots, the served models, and whether the worker serves."""
        self.slots = slots
        self.models = models
        self.ready = ready

    def _model(self, name: str) -> str:
        return name if name in self.models else UNKNOWN_MODEL

    def started(self) -> None:
        self.in_flight += 1

    def served(self, model: str, result: InferResult) -> None:
        self.in_flight -= 1
        model = self._model(model)
        self.requests.labels(model, grpc.StatusCode.OK.name).inc()
        self.compute.labels(model).observe(result.compute_ms / 1e3)
        self.queue.labels(model).observe(result.queue_ms / 1e3)

    def failed(self, model: str, exc: BaseException) -> None:
        self.in_flight -= 1
        self.requests.labels(self._model(model), status_of(exc)).inc()
