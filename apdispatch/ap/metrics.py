"""Outcome counters and latency samples, owned by one AP instance (no globals).

Besides the summary window, :class:`Stats` keeps what the Prometheus endpoint
(:mod:`apdispatch.ap.prom`) reads at scrape time: per app, a latency histogram
and the deadlines asked for; rejections by reason; per target, the decisions;
per worker, ejections; the estimator's error. Each is a counter or a bucket
increment on the request path: the exposition work happens at scrape time.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from apdispatch.ap.validate import valid_app
from apdispatch.common.outcomes import OUTCOMES, SERVED, Outcome

# Apps counted by name; the rest, and names that are not valid app names, are
# counted together under OTHER_APPS, so that clients cannot grow the table.
MAX_APPS = 1000
OTHER_APPS = "(other)"
# Targets and workers are counted by name up to the same bound (workers come and go).
MAX_TARGETS = MAX_APPS

# Upper bounds (ms) of the latency buckets: fine around the deadlines of
# inference SLAs (tens of ms), coarse beyond a second.
LATENCY_BOUNDS_MS: tuple[float, ...] = (
    0.5, 1, 2, 5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2500, 5000, 10000,
)  # fmt: skip
# The estimator's error (reply time minus prediction, ms): signed, symmetric.
ERROR_BOUNDS_MS: tuple[float, ...] = (
    -100, -50, -20, -10, -5, -2, -1, -0.5, 0, 0.5, 1, 2, 5, 10, 20, 50, 100,
)  # fmt: skip

# Why a request was rejected, told apart by the start of its error message
# (written in apdispatch.routing.router, apdispatch.ap.dispatcher and apdispatch.ap.auth).
REJECTION_REASONS: tuple[tuple[str, str], ...] = (
    ("sla.deadline_ms", "deadline"),  # no target predicted to meet the deadline
    ("sla.min_accuracy", "accuracy"),  # no variant accurate enough
    ("AP overloaded", "overload"),  # over the in-flight limit
    ("rate limit", "rate_limit"),  # the app's token bucket is empty
)


def rejection_reason(error: str) -> str:
    for start, reason in REJECTION_REASONS:
        if error.startswith(start):
            return reason
    return "other"


class Histogram:
    """Counts per bucket (not cumulative; the last one is +Inf) and the sum of what was observed."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound falls in that bound's bucket (Prometheus' "le").
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


@dataclass(slots=True)
class AppLatency:
    """One app's served requests: their latency, and the deadlines they asked for (ms)."""

    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BOUNDS_MS))
    deadline_sum: float = 0.0


@dataclass(slots=True)
class Window:
    started: float
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)


class Stats:
    """Totals since start plus the current summary window."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        max_apps: int = MAX_APPS,
        max_targets: int = MAX_TARGETS,
    ) -> None:
        self._clock = clock
        self._max_apps = max_apps
        self._max_targets = max_targets
        self.totals: Counter[str] = Counter()
        self.by_app: dict[str, Counter[str]] = {}
        # Replies read from streams and not yet handed to gRPC, over all streams.
        self.stream_pending = 0
        self.stream_pending_peak = 0
        # Requests answered, by the target that answered (the policy's decision).
        self.by_target: Counter[str] = Counter()
        # Per app (the same names as by_app), its served requests' latency and deadlines.
        self.latency_by_app: dict[str, AppLatency] = {}
        self.rejections: Counter[str] = Counter()
        self.ejections: Counter[str] = Counter()  # by worker id
        # Per cluster, a served reply's time from decision to reply minus the prediction.
        self.estimate_error: dict[str, Histogram] = {}
        self._window = Window(started=clock())

    def record(
        self,
        outcome: Outcome,
        app: str,
        latency_ms: float,
        target: str | None = None,
        deadline_ms: float = 0.0,
        error: str = "",
    ) -> None:
        self.totals[outcome] += 1
        app_counts = self.by_app.get(app)
        if app_counts is None:
            if len(self.by_app) >= self._max_apps or not valid_app(app):
                app = OTHER_APPS
            app_counts = self.by_app.get(app)
            if app_counts is None:
                app_counts = self.by_app[app] = Counter()
        app_counts[outcome] += 1
        if outcome in SERVED:
            served = self.latency_by_app.get(app)
            if served is None:
                served = self.latency_by_app[app] = AppLatency()
            served.latency.observe(latency_ms)
            served.deadline_sum += deadline_ms
        elif outcome == Outcome.REJECTED:
            self.rejections[rejection_reason(error)] += 1
        if target is not None:
            if target not in self.by_target and len(self.by_target) >= self._max_targets:
                target = OTHER_APPS
            self.by_target[target] += 1
        self._window.outcomes[outcome] += 1
        self._window.latencies_ms.append(latency_ms)

    def estimated(self, cluster: str, predicted_ms: float, actual_ms: float) -> None:
        """A served reply came ``actual_ms`` after its decision, which predicted ``predicted_ms``."""
        histogram = self.estimate_error.get(cluster)
        if histogram is None:
            if len(self.estimate_error) >= self._max_targets:
                cluster = OTHER_APPS
            histogram = self.estimate_error.get(cluster)
            if histogram is None:
                histogram = self.estimate_error[cluster] = Histogram(ERROR_BOUNDS_MS)
        histogram.observe(actual_ms - predicted_ms)

    def ejected(self, worker_id: str) -> None:
        if worker_id not in self.ejections and len(self.ejections) >= self._max_targets:
            worker_id = OTHER_APPS
        self.ejections[worker_id] += 1

    def stream_pending_add(self, n: int) -> None:
        self.stream_pending += n
        if self.stream_pending > self.stream_pending_peak:
            self.stream_pending_peak = self.stream_pending

    @property
    def total(self) -> int:
        return sum(self.totals.values())

    def roll(self) -> dict[str, float | int]:
        """Close the current window and return its summary."""
        window, self._window = self._window, Window(started=self._clock())
        elapsed = max(1e-9, self._window.started - window.started)
        n = sum(window.outcomes.values())
        summary: dict[str, float | int] = {"interval_s": round(elapsed, 3), "requests": n}
        summary.update({o: window.outcomes[o] for o in OUTCOMES})
        summary["qps"] = round(n / elapsed, 1)
        summary["success_ratio"] = round(window.outcomes["ok"] / n, 4) if n else 0.0
        if window.latencies_ms:
            p50, p99 = np.percentile(window.latencies_ms, [50, 99])
            summary["p50_ms"] = round(float(p50), 3)
            summary["p99_ms"] = round(float(p99), 3)
        return summary
