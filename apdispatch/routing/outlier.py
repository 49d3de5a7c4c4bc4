"""Outlier detection: workers that fail or stall are taken out of routing, then probed back.

Envoy's passive health checking, per worker:

- A broken link (the worker's stream broke, or a connection to it was
  refused) ejects the worker at once: a dead worker answers nothing more.
- ``consecutive_errors`` error replies in a row eject it, and so do
  ``consecutive_slow`` deadline misses in a row that are the worker's doing
  (requests its prediction said would make it). Any served reply resets both.
- An ejection lasts ``base_ejection_ms`` times the worker's ejection count,
  at most ``max_ejection_ms``; the count falls by one for every
  ``base_ejection_ms`` the worker then stays in, so that a worker that fails
  again soon stays out longer, and one that recovered for good starts afresh.
- When an ejection ends, the worker is probed (the caller's probe: OIP
  ``ServerReady``); ready, it is readmitted; not, it is ejected again, for longer.
- Of the workers serving a task, at most ``max_ejection_percent`` are ejected
  at once, but one may always be (Envoy's rule): a worker over the limit stays
  in routing however it fails.

The ejected flag lives on :class:`~apdispatch.routing.registry.Worker`; the
registry leaves ejected workers out of the targets it hands out. A worker that
registers again (a restart) is a new worker, in routing, with a clean record.
The clock is injected, so that tests and the simulator can drive it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from apdispatch.routing.registry import Registry, Worker


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """The outlier detector's knobs; each is also an AP config key, prefixed ``outlier_``."""

    # Error replies in a row that eject a worker (a broken link ejects at once).
    consecutive_errors: int = 5
    # Deadline misses in a row, of requests predicted to make their deadline, that eject a worker.
    consecutive_slow: int = 3
    # The first ejection's length; the k-th in a row lasts k times as long.
    base_ejection_ms: float = 1_000.0
    # The longest an ejection lasts.
    max_ejection_ms: float = 30_000.0
    # At most this share of the workers serving a task is out at once (one always may be).
    max_ejection_percent: float = 50.0
    # How long the probe that ends an ejection (OIP ServerReady) may take before it counts as failed.
    probe_timeout_ms: float = 500.0

    def validate(self) -> OutlierConfig:
        """Self, or ValueError naming the bad knob."""
        if self.consecutive_errors < 1:
            raise ValueError("consecutive_errors: must be >= 1")
        if self.consecutive_slow < 1:
            raise ValueError("consecutive_slow: must be >= 1")
        if not self.base_ejection_ms > 0:
            raise ValueError("base_ejection_ms: must be > 0")
        if not self.max_ejection_ms >= self.base_ejection_ms:
            raise ValueError("max_ejection_ms: must be >= base_ejection_ms")
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError("max_ejection_percent: must be in [0, 100]")
        if not self.probe_timeout_ms > 0:
            raise ValueError("probe_timeout_ms: must be > 0")
        return self


@dataclass(slots=True, eq=False)
class _Record:
    worker: Worker  # the registration this record is about
    errors: int = 0  # error replies in a row
    slow: int = 0  # attributable deadline misses in a row
    ejections: int = 0  # the back-off multiplier
    until: float = 0.0  # while ejected: when the probe is due
    since: float = 0.0  # when it was last readmitted (the multiplier decays from there)
    probing: bool = False


class OutlierDetector:
    """Counts what becomes of each worker's requests and ejects the outliers."""

    def __init__(
        self,
        registry: Registry,
        config: OutlierConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[Worker, str, float], None] | None = None,
    ) -> None:
        self.registry = registry
        self.config = (config or OutlierConfig()).validate()
        self._clock = clock
        self._records: dict[str, _Record] = {}
        # Told (worker, "ejected" | "readmitted" | "kept", ejection seconds) of every change.
        self.on_change = on_change
        self.ejections = 0  # since start, over all workers

    # -- what became of a request --------------------------------------------

    def success(self, worker: Worker) -> None:
        record = self._record(worker)
        if record is not None:
            record.errors = 0
            record.slow = 0

    def error(self, worker: Worker) -> bool:
        """An error reply; True when it ejected the worker."""
        record = self._record(worker)
        if record is None:
            return False
        record.errors += 1
        return record.errors >= self.config.consecutive_errors and self._eject(record)

    def slow(self, worker: Worker) -> bool:
        """A deadline missed that the worker's prediction said it would meet; True when it ejected."""
        record = self._record(worker)
        if record is None:
            return False
        record.slow += 1
        return record.slow >= self.config.consecutive_slow and self._eject(record)

    def link_failed(self, worker: Worker) -> bool:
        """The worker's link broke or could not be opened; True when it ejected the worker."""
        record = self._record(worker)
        return record is not None and self._eject(record)

    # -- probing back -----------------------------------------------------------

    def due(self) -> list[Worker]:
        """Ejected workers whose ejection is over and whose probe is not under way; marked probing."""
        now = self._clock()
        ready = []
        for record in self._records.values():
            worker = record.worker
            if worker.ejected and not record.probing and record.until <= now and self._current(worker):
                record.probing = True
                ready.append(worker)
        return ready

    def next_due(self) -> float | None:
        """Seconds until the next probe is due (0 when one is); None when no worker is ejected."""
        waits = [
            r.until - self._clock() for r in self._records.values() if r.worker.ejected and not r.probing
        ]
        return max(0.0, min(waits)) if waits else None

    def probed(self, worker: Worker, ready: bool) -> None:
        """A probe's answer: readmit the worker, or eject it again, for longer."""
        record = self._record(worker)
        if record is None:
            return
        record.probing = False
        if not worker.ejected:
            return
        now = self._clock()
        if ready:
            record.errors = record.slow = 0
            record.since = now
            self.registry.set_ejected(worker, False)
            self._tell(worker, "readmitted", 0.0)
        else:
            record.ejections += 1
            self._start_ejection(record, now)

    def ejected(self) -> list[str]:
        return sorted(w.worker_id for w in self.registry.workers() if w.ejected)

    # -- inside -------------------------------------------------------------------

    def _current(self, worker: Worker) -> bool:
        return self.registry.get(worker.worker_id) is worker

    def _record(self, worker: Worker) -> _Record | None:
        """The worker's record; None for a registration that is gone or replaced (its news is stale)."""
        if not self._current(worker):
            return None
        record = self._records.get(worker.worker_id)
        if record is None or record.worker is not worker:
            # A new registration of this id: a clean record. Forgotten ids go too.
            self._records = {k: r for k, r in self._records.items() if self._current(r.worker)}
            record = self._records[worker.worker_id] = _Record(worker, since=self._clock())
        return record

    def _eject(self, record: _Record) -> bool:
        worker = record.worker
        if worker.ejected:
            return False
        if not self._may_eject(worker):
            self._tell(worker, "kept", 0.0)
            return False
        now = self._clock()
        base_s = self.config.base_ejection_ms / 1000.0
        # The multiplier falls by one for every base ejection time spent in routing.
        healthy = int((now - record.since) / base_s) if record.ejections else 0
        record.ejections = max(0, record.ejections - healthy) + 1
        self.registry.set_ejected(worker, True)
        self.ejections += 1
        self._start_ejection(record, now)
        return True

    def _start_ejection(self, record: _Record, now: float) -> None:
        length_s = min(record.ejections * self.config.base_ejection_ms, self.config.max_ejection_ms) / 1000.0
        record.until = now + length_s
        record.errors = record.slow = 0
        self._tell(record.worker, "ejected", length_s)

    def _may_eject(self, worker: Worker) -> bool:
        """Envoy's rule, per task the worker serves: none out yet, or still within the share once out."""
        tasks = {v.task for v in worker.variants.values()}
        for task in tasks:
            serving = {t.worker.worker_id: t.worker for t in self.registry.all_targets(task)}
            out = sum(1 for w in serving.values() if w.ejected)
            if out and 100.0 * (out + 1) > self.config.max_ejection_percent * len(serving):
                return False
        return True

    def _tell(self, worker: Worker, what: str, length_s: float) -> None:
        if self.on_change is not None:
            self.on_change(worker, what, length_s)
