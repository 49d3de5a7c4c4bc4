"""The AP's Prometheus endpoint: one registry per AccessPoint, read at scrape time.

Nothing here runs on the request path. :class:`APCollector` reads what the
AP keeps anyway (:class:`apdispatch.ap.metrics.Stats`, the registry of workers,
the overload state, the outlier detector, the policy's ``telemetry``) when
Prometheus scrapes, from the HTTP server's thread. It copies each table in one
C-level call (``list(d.items())``), so that the event loop, which may add an
entry meanwhile, never changes a table under an iteration.

Label values are bounded: apps, targets, workers and clusters beyond
:data:`apdispatch.ap.metrics.MAX_APPS` are counted under ``(other)``.
Every metric is listed in docs/operations.md ("Metrics").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from apdispatch.ap.config import APConfig
from apdispatch.ap.dispatcher import Dispatcher
from apdispatch.ap.metrics import MAX_TARGETS, REJECTION_REASONS, Histogram, Stats
from apdispatch.ap.overload import Overload
from apdispatch.common.outcomes import OUTCOMES
from apdispatch.routing.policy import Policy
from apdispatch.routing.registry import Registry


class AccessPointState(Protocol):
    """What the collector reads of an :class:`apdispatch.ap.server.AccessPoint`."""

    @property
    def config(self) -> APConfig: ...
    @property
    def stats(self) -> Stats: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def overload(self) -> Overload: ...
    @property
    def dispatcher(self) -> Dispatcher: ...
    @property
    def policy(self) -> Policy: ...


PREFIX = "apdispatch_ap"


def histogram_buckets(histogram: Histogram, scale: float) -> tuple[list[tuple[str, float]], float]:
    """Cumulative ``(le, count)`` pairs and the sum, the bounds and sum multiplied by ``scale``."""
    counts = list(histogram.counts)  # one copy: the loop may add to it meanwhile
    buckets = []
    total = 0
    for bound, count in zip((*histogram.bounds, math.inf), counts, strict=True):
        total += count
        le = "+Inf" if bound == math.inf else repr(float(bound) * scale)
        buckets.append((le, float(total)))
    return buckets, histogram.sum * scale


class APCollector(Collector):
    """Every AP metric, built from the AP's state at each scrape."""

    def __init__(self, ap: AccessPointState) -> None:
        self.ap = ap

    def collect(self) -> Iterator[Metric]:
        ap = self.ap
        stats = ap.stats
        policy = ap.config.policy
        yield from self._requests(ap)
        yield from self._workers(ap)

        limit = ap.overload.limit
        in_flight = GaugeMetricFamily(
            f"{PREFIX}_in_flight_requests", "Requests admitted by the AP and not yet answered."
        )
        in_flight.add_metric([], limit.in_flight)
        yield in_flight
        cap = GaugeMetricFamily(
            f"{PREFIX}_in_flight_limit",
            "The overload limit on admitted requests now (falls while the event loop lags).",
        )
        cap.add_metric([], limit.limit)
        yield cap
        lag = GaugeMetricFamily(f"{PREFIX}_loop_lag_seconds", "The event loop's latest lag sample.")
        lag.add_metric([], ap.overload.lag.lag_s)
        yield lag
        pending = GaugeMetricFamily(
            f"{PREFIX}_stream_pending_replies",
            "Requests read from InferStream streams and not yet answered, over all streams.",
        )
        pending.add_metric([], stats.stream_pending)
        yield pending

        decisions = CounterMetricFamily(
            f"{PREFIX}_decisions",
            "Requests answered, by policy and the target (cluster/worker/variant) it chose; "
            "a retried request counts on its last target.",
            labels=["policy", "target"],
        )
        for target, count in list(stats.by_target.items()):
            decisions.add_metric([policy, target], count)
        yield decisions

        retries = CounterMetricFamily(
            f"{PREFIX}_retries",
            "Requests sent again to another worker after failing on this one.",
            labels=["worker"],
        )
        for worker_id, count in list(ap.dispatcher.retried.items())[:MAX_TARGETS]:
            retries.add_metric([worker_id], count)
        yield retries

        error = HistogramMetricFamily(
            f"{PREFIX}_estimate_error_seconds",
            "Served replies: time from decision to reply minus the estimator's prediction, by cluster "
            "(negative buckets, so no _sum or _count: the +Inf bucket counts them all).",
            labels=["cluster"],
        )
        for cluster, histogram in list(stats.estimate_error.items()):
            buckets, total = histogram_buckets(histogram, 1e-3)
            error.add_metric([cluster], buckets, total)
        yield error

        yield from self._learner(ap)

    def _requests(self, ap: AccessPointState) -> Iterable[Metric]:
        stats = ap.stats
        requests = CounterMetricFamily(
            f"{PREFIX}_requests",
            "Requests by app and outcome (ok, late, inaccurate, rejected, failed): one outcome each.",
            labels=["app", "outcome"],
        )
        for app, app_counts in list(stats.by_app.items()):
            counts = dict(app_counts)  # a C-level copy: the loop may add an outcome meanwhile
            for outcome in OUTCOMES:
                requests.add_metric([app, outcome.value], counts.get(outcome, 0))
        yield requests

        duration = HistogramMetricFamily(
            f"{PREFIX}_request_duration_seconds",
            "Served requests (ok, late, inaccurate): time from arrival at the AP to the reply, by app.",
            labels=["app"],
        )
        deadline = CounterMetricFamily(
            f"{PREFIX}_request_deadline_seconds",
            "Served requests: the sum of the deadlines they asked for, by app "
            "(divided by the duration histogram's count: the mean deadline).",
            labels=["app"],
        )
        for app, served in list(stats.latency_by_app.items()):
            buckets, total = histogram_buckets(served.latency, 1e-3)
            duration.add_metric([app], buckets, total)
            deadline.add_metric([app], served.deadline_sum * 1e-3)
        yield duration
        yield deadline

        rejections = CounterMetricFamily(
            f"{PREFIX}_rejections",
            "Rejected requests by reason: deadline (no target predicted in time), accuracy (no "
            "variant accurate enough), overload (over the in-flight limit), rate_limit (the app's "
            "token bucket), other.",
            labels=["reason"],
        )
        by_reason = dict(stats.rejections)
        for reason in (*(r for _, r in REJECTION_REASONS), "other"):
            rejections.add_metric([reason], by_reason.get(reason, 0))
        yield rejections

    def _workers(self, ap: AccessPointState) -> Iterable[Metric]:
        workers = ap.registry.workers()
        count = GaugeMetricFamily(f"{PREFIX}_workers", "Workers registered with the AP.")
        count.add_metric([], len(workers))
        yield count
        labels = ["worker", "cluster"]
        families = {
            "in_flight": GaugeMetricFamily(
                f"{PREFIX}_worker_in_flight_requests",
                "Requests the AP sent to the worker and that are not answered yet.",
                labels=labels,
            ),
            "queued": GaugeMetricFamily(
                f"{PREFIX}_worker_queued_requests",
                "Of those, the ones beyond its slots: waiting for a slot, by the AP's count.",
                labels=labels,
            ),
            "slots": GaugeMetricFamily(
                f"{PREFIX}_worker_slots", "Requests the worker runs at once.", labels=labels
            ),
            "ejected": GaugeMetricFamily(
                f"{PREFIX}_worker_ejected",
                "1 while outlier detection keeps the worker out of routing, else 0.",
                labels=labels,
            ),
        }
        for worker in workers[:MAX_TARGETS]:
            values = [worker.worker_id, worker.cluster]
            in_flight = worker.in_flight
            families["in_flight"].add_metric(values, in_flight)
            families["queued"].add_metric(values, max(0, in_flight - worker.slots))
            families["slots"].add_metric(values, worker.slots)
            families["ejected"].add_metric(values, 1 if worker.ejected else 0)
        yield from families.values()
        ejections = CounterMetricFamily(
            f"{PREFIX}_worker_ejections",
            "Times outlier detection took the worker out of routing.",
            labels=["worker"],
        )
        # Every worker registered now (0 for most), and those ejected before they left.
        counts = dict(ap.stats.ejections)
        for worker in workers[:MAX_TARGETS]:
            counts.setdefault(worker.worker_id, 0)
        for worker_id, n in counts.items():
            ejections.add_metric([worker_id], n)
        yield ejections

    def _learner(self, ap: AccessPointState) -> Iterable[Metric]:
        telemetry = ap.policy.telemetry()
        if not telemetry:
            return
        labels = ["policy"]
        value = [ap.config.policy]
        gauges = (
            ("reward", "learner_reward", "Mean reward of the policy's recent decisions (or ASET windows)."),
            ("loss", "learner_loss", "Loss of the learner's latest update (NaN before the first)."),
        )
        for key, name, doc in gauges:
            gauge = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
            gauge.add_metric(value, float(telemetry.get(key, math.nan)))
            yield gauge
        counters = (
            ("rewards", "learner_rewards", "Rewards the policy has handed to its learner."),
            ("updates", "learner_updates", "Updates of the policy's parameters since the AP started."),
            ("dropped", "learner_dropped", "Transitions dropped because the learner fell behind."),
        )
        for key, name, doc in counters:
            counter = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
            counter.add_metric(value, float(telemetry.get(key, 0)))
            yield counter


def ap_registry(ap: AccessPointState) -> CollectorRegistry:
    """A registry of the AP's own (never prometheus_client's global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(APCollector(ap))
    return registry
