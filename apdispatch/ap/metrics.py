"""Outcome counters and latency samples, owned by one AP instance (no globals)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from apdispatch.ap.validate import valid_app
from apdispatch.common.outcomes import OUTCOMES, Outcome

# Apps counted by name; the rest, and names that are not valid app names, are
# counted together under OTHER_APPS, so that clients cannot grow the table.
MAX_APPS = 1000
OTHER_APPS = "(other)"


@dataclass(slots=True)
class Window:
    started: float
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)


class Stats:
    """Totals since start plus the current summary window."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_apps: int = MAX_APPS) -> None:
        self._clock = clock
        self._max_apps = max_apps
        self.totals: Counter[str] = Counter()
        self.by_app: dict[str, Counter[str]] = {}
        # Replies read from streams and not yet handed to gRPC, over all streams.
        self.stream_pending = 0
        self.stream_pending_peak = 0
        self.by_target: Counter[str] = Counter()
        self._window = Window(started=clock())

    def record(self, outcome: Outcome, app: str, latency_ms: float, target: str | None = None) -> None:
        self.totals[outcome] += 1
        app_counts = self.by_app.get(app)
        if app_counts is None:
            if len(self.by_app) >= self._max_apps or not valid_app(app):
                app = OTHER_APPS
            app_counts = self.by_app.get(app)
            if app_counts is None:
                app_counts = self.by_app[app] = Counter()
        app_counts[outcome] += 1
        if target is not None:
            self.by_target[target] += 1
        self._window.outcomes[outcome] += 1
        self._window.latencies_ms.append(latency_ms)

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
