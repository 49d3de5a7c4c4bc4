"""The queries a simulated run offers: the live load generator's plan, flattened.

Client streams come from ``apdispatch.tools.loadgen.plan_load`` with the same seed,
so the simulator and ``apdispatch load`` offer the same queries: streams arrive
as a Poisson process at ``clients_per_min_at(t) / 60`` per second, pick an app
by ``share``, live an exponential time of mean ``stream_mean_s`` (cut at the
end of the run) and send their app's queries periodically at ``rate_qps`` from
a random phase.

On top of the plan, every query gets one standard normal draw for its network
jitter, from its own stream of the seed. Each policy's run reads the same
draws for the same query: policies are compared on identical arrivals and
identical network noise (common random numbers), whatever they decide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from apdispatch.scenario import Scenario
from apdispatch.scenario.plan import plan_load

# Which of the seed's child streams the jitter draws come from (the plan uses
# the seed itself, as the live load generator does).
_JITTER_STREAM = 1
# And the cascades' draws: whether a first answer is escalated, and the escalation's jitter.
_CASCADE_STREAM = 2


@dataclass(frozen=True, slots=True)
class Queries:
    """Every query of a run, in order of arrival at the AP."""

    times_ms: np.ndarray  # float64, non-decreasing, in [0, duration)
    apps: np.ndarray  # int64 index into Scenario.apps
    jitter_z: np.ndarray  # float64 standard normal, one per query
    streams: int
    duration_s: float
    # Per query, for a cascade: a uniform draw (its first answer is escalated when below the
    # escalation rate) and the escalation's jitter (standard normal). None: drawn from the count.
    cascade_u: np.ndarray | None = None
    escalation_z: np.ndarray | None = None

    def cascade_draws(self) -> tuple[np.ndarray, np.ndarray]:
        """``cascade_u`` and ``escalation_z``, drawn from the number of queries when the plan has none."""
        if self.cascade_u is not None and self.escalation_z is not None:
            return self.cascade_u, self.escalation_z
        rng = np.random.default_rng(np.random.SeedSequence([len(self), _CASCADE_STREAM]))
        return rng.random(len(self)), rng.standard_normal(len(self))

    def __len__(self) -> int:
        return len(self.times_ms)

    def per_window(self, window_s: float, n_apps: int) -> np.ndarray:
        """Queries arriving per time window and app: shape (windows, apps)."""
        windows = max(1, math.ceil(self.duration_s / window_s))
        w = np.minimum((self.times_ms / (window_s * 1000.0)).astype(np.int64), windows - 1)
        counts = np.zeros((windows, n_apps), dtype=np.int64)
        np.add.at(counts, (w, self.apps), 1)
        return counts


def plan_arrivals(scenario: Scenario, seed: int) -> Queries:
    """The queries of a run of ``scenario`` for ``seed`` (what ``apdispatch load`` would send)."""
    plan = plan_load(scenario, seed=seed)
    if plan.streams:
        times = np.concatenate([s.send_times for s in plan.streams])
        apps = np.concatenate([np.full(len(s.send_times), s.app, dtype=np.int64) for s in plan.streams])
    else:
        times = np.zeros(0, dtype=np.float64)
        apps = np.zeros(0, dtype=np.int64)
    order = np.argsort(times, kind="stable")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _JITTER_STREAM]))
    cascade = np.random.default_rng(np.random.SeedSequence([seed, _CASCADE_STREAM]))
    return Queries(
        times_ms=times[order] * 1000.0,
        apps=apps[order],
        jitter_z=rng.standard_normal(len(times)),
        streams=len(plan.streams),
        duration_s=scenario.duration_s,
        cascade_u=cascade.random(len(times)),
        escalation_z=cascade.standard_normal(len(times)),
    )
