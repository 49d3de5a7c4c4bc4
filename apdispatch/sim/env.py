"""Window-level control of a simulated AP, Gymnasium style (ASET's setting).

Every ``window_s`` seconds an agent picks which static policy dispatches the
next window; the simulation runs that window and reports what the AP saw::

    env = DispatchEnv.from_scenario("scenarios/sim/mixed-fast.toml", window_s=5.0)
    obs = env.reset(seed=1)
    done = False
    while not done:
        obs, reward, terminated, truncated, info = env.step(agent(obs))
        done = terminated or truncated

Episodes: one run of the scenario (``duration_s`` / ``window_s`` steps, the
last one may be shorter). ``reset(seed)`` plans new arrivals for ``seed``
(the live load generator's plan for that seed) and starts a fresh AP: new
registry, estimator and static policies. ``reset()`` without a seed takes
the scenario's seed the first time, then the next seed each episode.

Actions: an index into ``action_names`` (default: every static policy, in
``apdispatch.policies.STATIC_POLICIES`` order). The chosen policy object
persists across windows within an episode (round-robin keeps its place).

Observation: a float32 vector, named by ``observation_names``; everything in
it is something the live AP observes too, so an agent trained here could run
there:

- ``rate:<app>``: queries of the app that arrived in the last window, per second;
- ``load:<cluster>``: the AP's in-flight requests per slot on the cluster's
  workers at the end of the window;
- ``latency:<cluster>``: mean end-to-end latency (seconds) of the cluster's
  queries settled in the window (served, or late at their deadline), 0 if none;
- ``outcome:<name>``: share of the queries settled in the window with each
  outcome (``ok``, ``late``, ``inaccurate``, ``rejected``, ``failed``).

Reward: the success ratio of the queries settled during the window (ok /
settled; 0 for a window in which nothing was settled). The final step also
settles every query still in flight, so an episode's rewards cover every
query. ``terminated`` is True on the last window; ``truncated`` is never.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apdispatch.policies import STATIC_POLICIES, Policy, make_policy
from apdispatch.scenario import load_scenario
from apdispatch.sim.arrivals import Queries, plan_arrivals
from apdispatch.sim.calibration import MANIFEST, Calibration
from apdispatch.sim.engine import N_OUTCOMES, OK, OUTCOMES, Simulation
from apdispatch.sim.model import SimModel
from apdispatch.sim.profile import LatencyProfile
from apdispatch.sim.results import PolicyResult, result_of

DEFAULT_WINDOW_S = 5.0


class DispatchEnv:
    """ASET's environment: pick a static policy per time window of a simulated scenario."""

    def __init__(
        self,
        model: SimModel,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        actions: Sequence[str] = STATIC_POLICIES,
    ) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        if not actions:
            raise ValueError("at least one action is needed")
        self.model = model
        self.window_s = window_s
        self.action_names: tuple[str, ...] = tuple(actions)
        scenario = model.scenario
        self._apps = tuple(a.name for a in scenario.apps)
        self._clusters = model.clusters
        self.observation_names: tuple[str, ...] = (
            *(f"rate:{a}" for a in self._apps),
            *(f"load:{c}" for c in self._clusters),
            *(f"latency:{c}" for c in self._clusters),
            *(f"outcome:{o}" for o in OUTCOMES),
        )
        self.steps_per_episode = max(1, math.ceil(scenario.duration_s / window_s))
        self._next_seed = scenario.seed
        self._sim: Simulation | None = None
        self._arrivals: Queries | None = None
        self._policies: list[Policy] = []
        self._per_window = np.zeros((0, 0), dtype=np.int64)
        self._step = 0
        self._resolved = [0] * N_OUTCOMES
        self._latency = [0.0] * len(self._clusters)
        self._replies = [0] * len(self._clusters)

    @classmethod
    def from_scenario(
        cls,
        path: Path | str,
        *,
        models: Path | str | None = "build/models",
        calibration: Calibration = MANIFEST,
        latencies: LatencyProfile | None = None,
        duration_s: float | None = None,
        window_s: float = DEFAULT_WINDOW_S,
        actions: Sequence[str] = STATIC_POLICIES,
    ) -> DispatchEnv:
        """An environment for a scenario file (``duration_s`` compresses it, as ``--duration``;
        ``latencies``: the zoo's latency profile, default the reference)."""
        from apdispatch.sim.model import load_model

        scenario = load_scenario(path)
        if duration_s is not None:
            scenario = scenario.scaled(duration_s)
        model = load_model(scenario, None if models is None else Path(models), calibration, latencies)
        return cls(model, window_s=window_s, actions=actions)

    @property
    def n_actions(self) -> int:
        return len(self.action_names)

    @property
    def observation_size(self) -> int:
        return len(self.observation_names)

    @property
    def simulation(self) -> Simulation:
        """The episode's simulation (after ``reset``)."""
        if self._sim is None:
            raise RuntimeError("call reset() first")
        return self._sim

    def reset(self, seed: int | None = None) -> np.ndarray:
        """A new episode on the arrivals of ``seed``; returns the first observation (all zeros)."""
        if seed is None:
            seed = self._next_seed
        self._next_seed = seed + 1
        self._arrivals = plan_arrivals(self.model.scenario, seed)
        self._per_window = self._arrivals.per_window(self.window_s, len(self._apps))
        self._policies = [make_policy(name, seed) for name in self.action_names]
        self._sim = Simulation(self.model, self._policies[0], self._arrivals, window_s=self.window_s)
        self._step = 0
        self._resolved = [0] * N_OUTCOMES
        self._latency = [0.0] * len(self._clusters)
        self._replies = [0] * len(self._clusters)
        return np.zeros(self.observation_size, dtype=np.float32)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        sim = self.simulation
        if self._step >= self.steps_per_episode:
            raise RuntimeError("the episode is over: call reset()")
        if not 0 <= action < self.n_actions:
            raise ValueError(f"action {action} out of range (0..{self.n_actions - 1})")
        sim.router.policy = self._policies[action]
        k = self._step
        self._step += 1
        terminated = self._step >= self.steps_per_episode
        if terminated:
            sim.finish()
        else:
            sim.run_until(self._step * self.window_s * 1000.0)
        settled = [now - before for now, before in zip(sim.resolved, self._resolved, strict=True)]
        latency = [now - before for now, before in zip(sim.cluster_latency_ms, self._latency, strict=True)]
        replies = [now - before for now, before in zip(sim.cluster_replies, self._replies, strict=True)]
        self._resolved = list(sim.resolved)
        self._latency = list(sim.cluster_latency_ms)
        self._replies = list(sim.cluster_replies)
        total = sum(settled)
        reward = settled[OK] / total if total else 0.0
        obs = self._observe(k, settled, latency, replies)
        info = {
            "window": k,
            "time_s": min(self._step * self.window_s, self.model.scenario.duration_s),
            "policy": self.action_names[action],
            "settled": dict(zip(OUTCOMES, settled, strict=True)),
        }
        return obs, reward, terminated, False, info

    def _observe(self, k: int, settled: list[int], latency: list[float], replies: list[int]) -> np.ndarray:
        sim = self.simulation
        duration = self.model.scenario.duration_s
        width = min(self.window_s, duration - k * self.window_s) or self.window_s
        rates = self._per_window[k] / width if k < len(self._per_window) else np.zeros(len(self._apps))
        load = np.zeros(len(self._clusters))
        slots = np.zeros(len(self._clusters))
        for w in sim.registry.workers():
            c = self._clusters.index(w.cluster)
            load[c] += w.in_flight
            slots[c] += w.slots
        mean_latency_s = [(lat / n / 1000.0 if n else 0.0) for lat, n in zip(latency, replies, strict=True)]
        total = sum(settled)
        mix = [n / total if total else 0.0 for n in settled]
        return np.concatenate([rates, load / np.maximum(slots, 1), mean_latency_s, mix], dtype=np.float32)

    def result(self, name: str = "window-control") -> PolicyResult:
        """The episode's counts, as for a policy run (after the last step)."""
        return result_of(self.simulation, name)
