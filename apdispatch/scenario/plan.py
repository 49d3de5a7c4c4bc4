"""The load a scenario offers: client streams, their apps, lifetimes and send times.

Client streams (cameras, say) arrive as a Poisson process whose rate follows the
scenario's piecewise-constant ``clients_per_min`` schedule. Each stream picks an
app by ``share``, lives an exponential time with mean ``stream_mean_s`` (cut at
the end of the run) and sends its app's queries. Queries within a stream are
periodic by default (``rate_qps`` frames per second with a random phase, like a
camera); ``query_process="poisson"`` sends them as a Poisson process of the same
rate instead.

The whole plan is drawn up front from one seeded ``numpy.random.Generator``: the
same seed offers the same load to the live load generator and to the simulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from apdispatch.scenario import Arrivals, Scenario, ScenarioError

__all__ = ["LoadPlan", "QueryProcess", "StreamPlan", "plan_load", "stream_starts"]

QueryProcess = Literal["periodic", "poisson"]


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """One client stream: when it lives, which app it is and when it sends."""

    index: int
    app: int  # index into Scenario.apps
    start_s: float
    end_s: float  # start + lifetime, cut at the end of the run
    send_times: np.ndarray  # seconds from the start of the run, increasing, in [start, end)
    sample_offset: int  # first sample row it sends (then cycles)


@dataclass(frozen=True, slots=True)
class LoadPlan:
    duration_s: float
    query_process: QueryProcess
    streams: tuple[StreamPlan, ...]

    @property
    def queries(self) -> int:
        return sum(len(s.send_times) for s in self.streams)

    def active_during(self, lo: float, hi: float) -> int:
        """Streams alive at some time in [lo, hi)."""
        return sum(1 for s in self.streams if s.start_s < hi and s.end_s > lo)

    def active_per_second(self) -> list[int]:
        """``active_during(t, t + 1)`` for every whole second of the run."""
        t = np.arange(max(1, math.ceil(self.duration_s)), dtype=np.float64)
        starts = np.sort([s.start_s for s in self.streams])
        ends = np.sort([s.end_s for s in self.streams])
        # A stream that ended by t started before t + 1, so: started - ended.
        started = np.searchsorted(starts, t + 1.0, side="left")
        ended = np.searchsorted(ends, t, side="right")
        return [int(v) for v in started - ended]


def stream_starts(arrivals: Arrivals, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times in [0, duration_s) of a Poisson process with a piecewise-constant rate.

    Exact: a gap that would cross a step boundary is redrawn from the boundary
    with the new rate (the exponential distribution is memoryless).
    """
    boundaries = sorted({s.at_s for s in arrivals.schedule if 0.0 < s.at_s < duration_s})
    starts: list[float] = []
    t = 0.0
    while t < duration_s:
        nxt = next((b for b in boundaries if b > t), math.inf)
        rate = arrivals.clients_per_min_at(t) / 60.0
        horizon = min(nxt, duration_s)
        if rate <= 0.0:
            t = horizon
            continue
        t_next = t + float(rng.exponential(1.0 / rate))
        if t_next >= horizon:
            t = horizon
            continue
        t = t_next
        starts.append(t)
    return np.asarray(starts, dtype=np.float64)


def plan_load(
    scenario: Scenario,
    *,
    seed: int,
    query_process: QueryProcess = "periodic",
) -> LoadPlan:
    """Draw every stream of a run of ``scenario`` (over its ``duration_s``)."""
    if query_process not in ("periodic", "poisson"):
        raise ValueError(f"query_process must be 'periodic' or 'poisson', not {query_process!r}")
    duration = scenario.duration_s
    rng = np.random.default_rng(seed)
    shares = np.array([a.share for a in scenario.apps], dtype=np.float64)
    if shares.sum() <= 0:
        raise ScenarioError("apps: at least one app needs share > 0")
    starts = stream_starts(scenario.arrivals, duration, rng)
    n = len(starts)
    apps = rng.choice(len(scenario.apps), size=n, p=shares / shares.sum())
    ends = np.minimum(starts + rng.exponential(scenario.arrivals.stream_mean_s, size=n), duration)
    phases = rng.random(size=n)
    offsets = rng.integers(0, 2**31 - 1, size=n)
    streams = []
    for i in range(n):
        app = scenario.apps[int(apps[i])]
        start, end = float(starts[i]), float(ends[i])
        if query_process == "periodic":
            period = 1.0 / app.rate_qps
            first = start + float(phases[i]) * period
            count = max(0, math.ceil((end - first) * app.rate_qps))
            times = first + np.arange(count, dtype=np.float64) * period
            times = times[times < end]
        else:
            count = int(rng.poisson(app.rate_qps * (end - start)))
            times = np.sort(rng.uniform(start, end, size=count))
        streams.append(
            StreamPlan(
                index=i,
                app=int(apps[i]),
                start_s=start,
                end_s=end,
                send_times=times,
                sample_offset=int(offsets[i]),
            )
        )
    return LoadPlan(duration_s=duration, query_process=query_process, streams=tuple(streams))
