"""Predicted completion time per target, learned from the replies the AP observes.

completion = network + queue + compute, where

- network is the round trip between AP and worker (everything that is neither
  queue nor compute), an exponentially weighted mean per worker, seeded from
  the link delay the worker announced;
- compute grows linearly with the number of requests running at once on the
  worker (ECSRL's measurement): compute(n) = base * (1 + interference * (n - 1)),
  with base and interference fitted per (worker, variant) by exponentially
  weighted least squares on (n, compute) pairs from replies, seeded from the
  latency the worker announced;
- queue is the wait for a slot when every slot is busy: the requests ahead,
  served ``slots`` at a time, each taking compute(slots) ("count"); or, with
  ``queue_model="work"``, until the first slot is predicted free, by a plan of
  the worker's slots kept from the requests dispatched since it was last idle.

Everything is O(1) per prediction and per observation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from apdispatch.routing.registry import Target, Worker

# Weight of a new observation in the running means. 0.05 tracks a change of
# load within a few dozen replies, yet smooths single outliers.
ALPHA = 0.05
# How the wait for a slot is predicted: "count", the requests ahead each at a full
# compute; "work", until the first slot is predicted free (an execution half done
# counts half), and no longer than "count" says.
QUEUE_MODELS = ("count", "work")
DEFAULT_QUEUE_MODEL = "work"
# Base round trip of a loopback gRPC hop before anything was measured.
DEFAULT_NETWORK_MS = 0.3


@dataclass(slots=True)
class ComputeModel:
    """Exponentially weighted least squares of compute_ms on concurrency n."""

    mean_n: float
    mean_y: float
    var_n: float
    cov_ny: float

    @classmethod
    def prior(cls, latency_ms: float) -> ComputeModel:
        # A prior at n=1 with no spread: the fit starts flat at the announced
        # latency and tilts as observations at other concurrencies arrive.
        return cls(mean_n=1.0, mean_y=latency_ms, var_n=0.0, cov_ny=0.0)

    def observe(self, n: float, y: float, alpha: float = ALPHA) -> None:
        dn = n - self.mean_n
        self.mean_n += alpha * dn
        dy = y - self.mean_y
        self.mean_y += alpha * dy
        self.var_n = (1 - alpha) * (self.var_n + alpha * dn * dn)
        self.cov_ny = (1 - alpha) * (self.cov_ny + alpha * dn * dy)

    def slope(self) -> float:
        # Below this spread in n the slope is noise; assume no interference.
        if self.var_n < 1e-3:
            return 0.0
        return max(0.0, self.cov_ny / self.var_n)

    def predict(self, n: float) -> float:
        return max(0.0, self.mean_y + self.slope() * (n - self.mean_n))


class LatencyEstimator:
    def __init__(self, alpha: float = ALPHA, queue_model: str = DEFAULT_QUEUE_MODEL) -> None:
        if queue_model not in QUEUE_MODELS:
            raise ValueError(f"queue_model: must be one of {', '.join(QUEUE_MODELS)}")
        self._alpha = alpha
        self._network: dict[str, float] = {}
        self._compute: dict[str, ComputeModel] = {}
        self.queue_model = queue_model
        # "work": per worker, when each of its slots is predicted to be free (the driver's
        # clock, s), from the requests dispatched to it while it had any in flight.
        self._free_at: dict[str, list[float]] = {}

    def _slots_free_at(self, worker: Worker) -> list[float]:
        free_at = self._free_at.get(worker.worker_id)
        if free_at is None or worker.in_flight == 0 or len(free_at) != worker.slots:
            free_at = [-math.inf] * worker.slots
            self._free_at[worker.worker_id] = free_at
        return free_at

    def dispatched(self, target: Target, now_s: float) -> None:
        """``target`` was given one more request at ``now_s`` (its worker's in_flight not yet counting it)."""
        if self.queue_model != "work":
            return
        worker = target.worker
        free_at = self._slots_free_at(worker)
        compute = self.compute_ms(target, min(worker.in_flight + 1, worker.slots))
        first = min(range(len(free_at)), key=free_at.__getitem__)
        there = now_s + self.network_ms(worker) / 2000.0
        free_at[first] = max(there, free_at[first]) + compute / 1000.0

    def network_ms(self, worker: Worker) -> float:
        value = self._network.get(worker.worker_id)
        if value is None:
            value = worker.link_delay_ms + DEFAULT_NETWORK_MS
            self._network[worker.worker_id] = value
        return value

    def _model(self, target: Target) -> ComputeModel:
        model = self._compute.get(target.key)
        if model is None:
            model = ComputeModel.prior(target.variant.latency_ms)
            self._compute[target.key] = model
        return model

    def compute_ms(self, target: Target, running: int) -> float:
        return self._model(target).predict(max(1, running))

    def predict(self, target: Target, in_flight: int | None = None, now_s: float | None = None) -> float:
        """Predicted ms from dispatch to reply if ``target`` got one more request now."""
        # Runs for every candidate of every request: the lookups of
        # network_ms() and compute_ms() are inlined, and compute(slots) is
        # evaluated once when it serves for both the queue and the compute.
        worker = target.worker
        n = (worker.in_flight if in_flight is None else in_flight) + 1
        slots = worker.slots
        model = self._compute.get(target.key) or self._model(target)
        network = self._network.get(worker.worker_id)
        if network is None:
            network = self.network_ms(worker)
        if n <= slots:
            return network + model.predict(n if n > 1 else 1)
        compute = model.predict(slots)
        if self.queue_model == "work" and now_s is not None and in_flight is None:
            # The wait for a slot: until the first is predicted free, from the request's arrival there.
            # No longer than "count" says: the plan drifts late when batches serve several at once.
            soonest = min(self._slots_free_at(worker))
            wait = min(max(0.0, (soonest - now_s) * 1000.0 - network / 2.0), (n - slots) * compute / slots)
            return network + wait + compute
        return network + (n - slots) * compute / slots + compute

    def observe(
        self,
        target: Target,
        in_flight_at_dispatch: int,
        network_ms: float,
        compute_ms: float,
    ) -> None:
        """Learn from one reply: the request found ``in_flight_at_dispatch`` others."""
        worker = target.worker
        running = min(in_flight_at_dispatch + 1, worker.slots)
        self._model(target).observe(running, compute_ms, self._alpha)
        prev = self.network_ms(worker)
        self._network[worker.worker_id] = prev + self._alpha * (network_ms - prev)

    def forget(self, worker: Worker) -> None:
        self._network.pop(worker.worker_id, None)
        prefix = f"{worker.cluster}/{worker.worker_id}/"
        for key in [k for k in self._compute if k.startswith(prefix)]:
            del self._compute[key]
