"""Overload protection for the AP's own event loop.

The AP is one asyncio loop. When requests arrive faster than it can handle
them, they wait before their handler runs (in gRPC's queues and the loop's
ready queue), and that wait is invisible to a clock started in the handler.
Two measures, in the spirit of CoDel and of Envoy's adaptive concurrency:

- :class:`LoopLag` samples how late the loop runs a timer. The latest sample
  is the estimate of how long a request waited before its handler ran; the
  servicers date a request's arrival back by it, so admission counts the wait
  against the request's budget.
- :class:`ConcurrencyLimit` bounds the requests admitted and not yet answered.
  Its limit shrinks multiplicatively while the loop's lag stays above a
  target for a whole interval (CoDel's test: the *minimum* over the interval,
  so a single slow turn does not count), and grows additively while the lag
  is below target and the limit is what held requests back. A request over
  the limit is rejected at once (RESOURCE_EXHAUSTED): cheap work, so that the
  loop keeps time for the requests it admitted.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OverloadConfig:
    """The knobs; each is an ``APConfig`` key of the same name."""

    max_in_flight: int = 1024  # the limit's ceiling, and its start
    min_in_flight: int = 16  # the limit's floor
    lag_target_ms: float = 5.0  # loop lag the AP tolerates
    lag_interval_ms: float = 100.0  # how long the lag must stay above target to count
    lag_probe_ms: float = 5.0  # how often the lag is sampled
    decrease_factor: float = 0.75  # the limit's cut per interval over target
    increase_step: int = 8  # the limit's rise per interval under target in which it was reached

    def validate(self) -> OverloadConfig:
        if not 1 <= self.min_in_flight <= self.max_in_flight:
            raise ValueError("min_in_flight, max_in_flight: need 1 <= min_in_flight <= max_in_flight")
        for name in ("lag_target_ms", "lag_interval_ms", "lag_probe_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a finite number > 0")
        if not 0 < self.decrease_factor < 1:
            raise ValueError("decrease_factor: must be in (0, 1)")
        if self.increase_step < 1:
            raise ValueError("increase_step: must be >= 1")
        return self


class LoopLag:
    """How late the event loop runs a timer, sampled every ``probe_s``."""

    def __init__(self, probe_s: float, clock: Callable[[], float]) -> None:
        self.probe_s = probe_s
        self._clock = clock
        self.lag_s = 0.0  # the latest sample
        self.min_lag_s = math.inf  # the smallest since the last ``take_min``

    def record(self, lag_s: float) -> None:
        self.lag_s = max(0.0, lag_s)
        self.min_lag_s = min(self.min_lag_s, self.lag_s)

    def take_min(self) -> float:
        """The smallest lag since the last call (0 if none was sampled), and start a new window."""
        value, self.min_lag_s = self.min_lag_s, math.inf
        return 0.0 if value == math.inf else value

    async def run(self) -> None:
        while True:
            due = self._clock() + self.probe_s
            await asyncio.sleep(self.probe_s)
            self.record(self._clock() - due)


class ConcurrencyLimit:
    """Requests admitted and not answered, under a limit that follows the loop's lag (AIMD)."""

    def __init__(self, config: OverloadConfig) -> None:
        self.config = config
        self.limit = config.max_in_flight
        self.in_flight = 0
        self.shed = 0  # requests refused, in all
        self._held_back = False  # the limit refused a request in this interval

    def try_acquire(self) -> bool:
        if self.in_flight >= self.limit:
            self._held_back = True
            self.shed += 1
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1

    def adjust(self, min_lag_s: float) -> None:
        """Once per interval, from the smallest lag seen in it."""
        config = self.config
        if min_lag_s * 1000.0 > config.lag_target_ms:
            # Under the current load the limit can only come down to what is in flight:
            # start from there, or a limit far above it would take many intervals to bite.
            base = min(self.limit, max(self.in_flight, config.min_in_flight))
            self.limit = max(config.min_in_flight, int(base * config.decrease_factor))
        elif self._held_back:
            self.limit = min(config.max_in_flight, self.limit + config.increase_step)
        self._held_back = False


class Overload:
    """The AP's overload state: the loop's lag and the concurrency limit, with their tasks."""

    def __init__(self, config: OverloadConfig, clock: Callable[[], float]) -> None:
        self.config = config.validate()
        self.clock = clock
        self.lag = LoopLag(config.lag_probe_ms / 1000.0, clock)
        self.limit = ConcurrencyLimit(config)

    def arrival(self, now: float) -> float:
        """When a request whose handler runs at ``now`` most likely arrived: the loop's lag earlier."""
        return now - self.lag.lag_s

    async def run(self) -> None:
        """Sample the lag and adjust the limit, until cancelled."""
        interval_s = self.config.lag_interval_ms / 1000.0
        sampler = asyncio.ensure_future(self.lag.run())
        try:
            while True:
                await asyncio.sleep(interval_s)
                self.limit.adjust(self.lag.take_min())
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
