"""ASET: every time window, an RL agent picks which fixed policy dispatches the next one.

The agent observes the window that just ended and picks one of the static
policies or rules (``slack``, ``slack-guarded``) for the coming window; its
reward is that window's success ratio.
A window is ``window_s`` seconds of the driver's clock (``RequestView.now_s``:
the AP's monotonic clock, the simulator's simulated time), so that it means
the same span in both. A window opens with the first request that comes
after the previous one ended (none opens while nothing comes) and ends
``window_s`` later; a clock that goes back before its start (the next
simulated run of the same policy) ends it too.

Observations are fixed-size summaries, so one network fits any scenario:
how tight deadlines are against the best prediction, load (in flight per
slot) over all targets and on the busiest cluster, how many candidates
requests have, the outcome mix and latency/deadline of the replies seen,
on average and on the slowest cluster, and the policy that ran.

The reward is the share of the window's requests that came back ok:
ok / (decisions + rejections). Admission rejects before any policy runs, and
the router tells ASET of each rejection (``rejected``): a policy that
crowds the fast targets until admission turns requests away must not look
good for the requests it did route.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

from apdispatch.learned import RULE_POLICIES
from apdispatch.learned.actor_critic import compute_gae, init_linear
from apdispatch.learned.checkpoint import CheckpointedPolicy
from apdispatch.learned.learner import Learner, RewardMean
from apdispatch.routing.policy import Candidate, Feedback, Policy, RequestView
from apdispatch.routing.static import STATIC_POLICIES

# The agent's actions, in the order its output layer scores them: a
# checkpoint records them ("actions") and loads only where they are the same.
ACTIONS: tuple[str, ...] = STATIC_POLICIES + RULE_POLICIES
OBSERVATIONS: tuple[str, ...] = (
    "tightness",  # mean over decisions of the fastest prediction / deadline
    "load_mean",  # in_flight / slots over candidates seen
    "load_max_cluster",  # the busiest cluster's mean load
    "candidates",  # mean candidate count / 16
    "single_candidate",  # share of decisions with one candidate only
    "ok",  # outcome mix of replies seen in the window
    "late",
    "inaccurate",
    "failed",
    "latency",  # mean latency / deadline of replies
    "latency_max_cluster",  # the slowest cluster's mean latency / deadline
    *(f"ran:{a}" for a in ACTIONS),
)
N_OBS = len(OBSERVATIONS)
# Every this many decisions, the candidate set is sampled for the load
# observations: keeps the per-decision cost to a counter and a call.
SAMPLE_EVERY = 4


def _mlp(n_in: int, hidden: Sequence[int], n_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    size = n_in
    for h in hidden:
        layers += [nn.Linear(size, h), nn.Tanh()]
        size = h
    layers.append(nn.Linear(size, n_out))
    return nn.Sequential(*layers)


class AsetActor(nn.Module):
    """pi(static policy | window observation)."""

    def __init__(self, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        self.net = _mlp(N_OBS, hidden, len(ACTIONS))

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)

    def get_action(
        self, obs: torch.Tensor, action: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dist = Categorical(logits=self.logits(obs))
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy()


class AsetCritic(nn.Module):
    """V(window observation): the discounted success ratio to come."""

    def __init__(self, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        self.net = _mlp(N_OBS, hidden, 1)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.value(obs)


class AsetModel(nn.Module):
    def __init__(self, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        self.actor = AsetActor(hidden)
        self.critic = AsetCritic(hidden)


@dataclass(frozen=True, slots=True)
class AsetSnapshot:
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    version: int

    def logits(self, obs: np.ndarray) -> np.ndarray:
        h = obs
        last = len(self.layers) - 1
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < last:
                h = np.tanh(h)
        return h

    @classmethod
    def of(cls, actor: AsetActor, version: int) -> AsetSnapshot:
        def frozen(t: torch.Tensor) -> np.ndarray:
            a = t.detach().to(torch.float64).numpy().copy()
            a.flags.writeable = False
            return a

        layers = tuple((frozen(m.weight.T), frozen(m.bias)) for m in actor.net if isinstance(m, nn.Linear))
        return cls(layers, version)


class WindowTransition(NamedTuple):
    seq: int
    obs: np.ndarray
    action: int
    logits: np.ndarray
    reward: float


@dataclass
class AsetHyper:
    lr: float = 1e-3
    gamma: float = 0.9
    gae_lambda: float = 0.9
    clip_coef: float = 0.2
    update_epochs: int = 4
    batch_size: int = 16  # windows per update
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    max_grad_norm: float = 0.5


# Seconds per window: the simulator's report window, long enough for every
# reply to a window's decisions to be back before the next one ends.
WINDOW_S = 10.0


@dataclass
class AsetConfig:
    hidden: tuple[int, ...] = (64, 64)
    window_s: float = WINDOW_S
    explore: bool = True
    hyper: AsetHyper = field(default_factory=AsetHyper)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AsetConfig:
        known = {k: v for k, v in d.get("hyper", {}).items() if k in AsetHyper.__dataclass_fields__}
        # Checkpoints from before windows were timed have ``window`` (a
        # count of decisions): it has no meaning in seconds and is ignored.
        window_s = float(d.get("window_s", WINDOW_S))
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        return cls(
            hidden=tuple(d.get("hidden", (64, 64))),
            window_s=window_s,
            explore=bool(d.get("explore", True)),
            hyper=AsetHyper(**known),
        )


class AsetAlgo:
    def __init__(self, config: AsetConfig, seed: int = 0) -> None:
        self.config = config
        self.hyper = config.hyper
        self.batch_size = self.hyper.batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.model = AsetModel(config.hidden)
        init_linear(self.model, self.generator)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.hyper.lr, eps=1e-5)
        self.version = 0
        self.updates = 0
        self.samples = 0
        self.loss = math.nan  # the last update's loss

    def snapshot(self) -> AsetSnapshot:
        return AsetSnapshot.of(self.model.actor, self.version)

    def update(self, batch: list[WindowTransition]) -> AsetSnapshot:
        h = self.hyper
        batch = sorted(batch, key=lambda t: t.seq)
        obs = torch.from_numpy(np.stack([t.obs for t in batch])).float()
        actions = torch.tensor([t.action for t in batch])
        old_logp = torch.tensor([float(t.logits[t.action] - np.logaddexp.reduce(t.logits)) for t in batch])
        rewards = np.array([t.reward for t in batch]) * (1.0 - h.gamma)
        with torch.no_grad():
            values = self.model.critic.value(obs).double().numpy()
        adv, ret = compute_gae(rewards, values, float(values[-1]), h.gamma, h.gae_lambda)
        advantages = torch.from_numpy(adv).float()
        if len(batch) > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        returns = torch.from_numpy(ret).float()
        for _ in range(h.update_epochs):
            _, logp, entropy = self.model.actor.get_action(obs, actions)
            ratio = (logp - old_logp.float()).exp()
            pg = torch.max(
                -advantages * ratio, -advantages * ratio.clamp(1 - h.clip_coef, 1 + h.clip_coef)
            ).mean()
            v_loss = 0.5 * (self.model.critic.value(obs) - returns).pow(2).mean()
            loss = pg - h.ent_coef * entropy.mean() + h.vf_coef * v_loss
            self.optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), h.max_grad_norm)
            self.optimizer.step()
        self.loss = float(loss.item())
        self.updates += 1
        self.samples += len(batch)
        self.version += 1
        return self.snapshot()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
        self.version += 1


@dataclass(slots=True)
class _Window:
    """What one window saw: its decisions and the replies to them."""

    index: int
    action: int
    obs: np.ndarray
    logits: np.ndarray
    decisions: int = 0
    tightness: float = 0.0
    candidates: int = 0
    single: int = 0
    sampled: int = 0
    load: float = 0.0
    cluster_load: dict[str, list[float]] = field(default_factory=dict)
    # Replies that came back during this window (to any window's decisions).
    replies: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    latency: float = 0.0
    cluster_latency: dict[str, list[float]] = field(default_factory=dict)
    # Requests admission rejected during this window (the policy chose none of them).
    rejected: int = 0
    # Replies to this window's own decisions: with ``decisions`` and ``rejected``, its reward.
    answered: int = 0
    ok: int = 0

    def reward(self) -> float:
        """Success over every request of the window: ok / (decisions + rejections)."""
        total = self.decisions + self.rejected
        return self.ok / total if total else 0.0


class AsetPolicy(CheckpointedPolicy):
    """Dispatches with the static policy its agent picked for the current window."""

    def __init__(
        self,
        name: str,
        algo: AsetAlgo,
        statics: Sequence[Policy],
        *,
        seed: int = 0,
        background: bool | str = True,
        learn: bool = True,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if [p.name for p in statics] != list(ACTIONS):
            raise ValueError(f"ASET's actions are {ACTIONS}")
        self.name = name
        self.algo = algo
        self.meta = dict(meta or {})
        self._statics = list(statics)
        self._rng = np.random.default_rng(seed)
        self._snapshot: AsetSnapshot = algo.snapshot()
        self._window_s = algo.config.window_s
        # The current window's span on the driver's clock; the first request
        # (decided or rejected) starts it.
        self._start_s = math.inf
        self._end_s = -math.inf
        self._explore = algo.config.explore
        self._decided: dict[int, tuple[RequestView, _Window]] = {}
        self._previous: _Window | None = None
        # One small update per 16 windows: a thread is enough ("process" runs as one).
        self.learner: Learner[WindowTransition, AsetSnapshot] | None = (
            Learner(algo, self._publish, background=background is not False, name=f"{name}-learner")
            if learn
            else None
        )
        self.history: list[int] = []  # action per window, for reports
        self.rewards = RewardMean()  # the windows' rewards
        self._window = self._open(0, np.zeros(N_OBS))

    def _publish(self, snapshot: AsetSnapshot) -> None:
        self._snapshot = snapshot

    @property
    def active(self) -> str:
        return ACTIONS[self._window.action]

    def _open(self, index: int, obs: np.ndarray, action: int | None = None) -> _Window:
        logits = self._snapshot.logits(obs)
        if action is None:
            if self._explore:
                p = np.exp(logits - logits.max())
                p /= p.sum()
                action = int(self._rng.choice(len(p), p=p))
            else:
                action = int(logits.argmax())
        self.history.append(action)
        return _Window(index, action, obs, logits)

    def choose(self, request: RequestView, candidates: Sequence[Candidate]) -> Candidate:
        w = self._window
        if not self._start_s <= request.now_s < self._end_s:
            w = self._roll(request.now_s)
        w.decisions += 1
        n = len(candidates)
        w.candidates += n
        if n == 1:
            w.single += 1
        if w.decisions % SAMPLE_EVERY == 0:
            self._sample(w, request, candidates)
        if self.learner is not None:
            if len(self._decided) >= 100_000:
                del self._decided[next(iter(self._decided))]
            self._decided[id(request)] = (request, w)
        return self._statics[w.action].choose(request, candidates)

    def rejected(self, request: RequestView) -> None:
        """Admission rejected ``request`` (the router tells): it counts against the window."""
        for p in self._statics:
            p.rejected(request)  # the rules' guards count it in its app's demand
        w = self._window
        if not self._start_s <= request.now_s < self._end_s:
            w = self._roll(request.now_s)
        w.rejected += 1

    @staticmethod
    def _sample(w: _Window, request: RequestView, candidates: Sequence[Candidate]) -> None:
        w.sampled += 1
        w.tightness += min(c.predicted_ms for c in candidates) / max(request.deadline_ms, 1e-3)
        for c in candidates:
            load = c.in_flight / c.slots
            w.load += load
            acc = w.cluster_load.get(c.cluster)
            if acc is None:
                acc = w.cluster_load[c.cluster] = [0.0, 0.0]
            acc[0] += load
            acc[1] += 1.0

    def observe(self, feedback: Feedback) -> None:
        for p in self._statics:
            p.observe(feedback)
        w = self._window
        ratio = feedback.latency_ms / max(feedback.request.deadline_ms, 1e-3)
        w.replies += 1
        w.outcomes[feedback.outcome] = w.outcomes.get(feedback.outcome, 0) + 1
        w.latency += ratio
        acc = w.cluster_latency.get(feedback.chosen.cluster)
        if acc is None:
            acc = w.cluster_latency[feedback.chosen.cluster] = [0.0, 0.0]
        acc[0] += ratio
        acc[1] += 1.0
        record = self._decided.pop(id(feedback.request), None)
        if record is not None and record[0] is feedback.request:
            owner = record[1]
            owner.answered += 1
            owner.ok += feedback.outcome == "ok"

    def observation(self, w: _Window) -> np.ndarray:
        sampled = max(1, w.sampled)
        replies = max(1, w.replies)
        cluster_load = max((s / max(1.0, k) for s, k in w.cluster_load.values()), default=0.0)
        cluster_lat = max((s / max(1.0, k) for s, k in w.cluster_latency.values()), default=0.0)
        n_cand = sum(k for _, k in w.cluster_load.values())
        obs = np.zeros(N_OBS)
        obs[:11] = (
            min(2.0, w.tightness / sampled),
            min(4.0, w.load / max(1.0, n_cand)),
            min(4.0, cluster_load),
            min(1.0, w.candidates / max(1, w.decisions) / 16.0),
            w.single / max(1, w.decisions),
            w.outcomes.get("ok", 0) / replies,
            w.outcomes.get("late", 0) / replies,
            w.outcomes.get("inaccurate", 0) / replies,
            w.outcomes.get("failed", 0) / replies,
            min(2.0, w.latency / replies),
            min(2.0, cluster_lat),
        )
        obs[11 + w.action] = 1.0
        return obs

    def _roll(self, now_s: float) -> _Window:
        """A window starts at ``now_s``: close the current one, pick the next one's policy.

        The window before the one closed is handed to learning. A window that
        saw no request yet (the first) is not closed: it starts now.
        """
        self._start_s = now_s
        self._end_s = now_s + self._window_s
        done = self._window
        if not done.decisions and not done.rejected:
            return done
        obs = self.observation(done)
        # The window before the one just closed has had a whole window's time
        # for its replies to come back: its reward is known now.
        if self._previous is not None and self.learner is not None:
            p = self._previous
            reward = p.reward()
            self.rewards.add(reward)
            self.learner.put(WindowTransition(p.index, p.obs, p.action, p.logits, reward))
        self._previous = done
        self._window = self._open(done.index + 1, obs)
        return self._window

    def config(self) -> dict[str, Any]:
        # An old checkpoint's window in decisions (``window``) is not carried over.
        meta = {k: v for k, v in self.meta.items() if k != "window"}
        return {
            **meta,
            "kind": "aset",
            "actions": list(ACTIONS),
            "observations": list(OBSERVATIONS),
            **self.algo.config.to_json(),
            "updates": self.algo.updates,
            "samples": self.algo.samples,
        }

    def telemetry(self) -> dict[str, float]:
        learner = self.learner
        return {
            "reward": self.rewards.mean,
            "rewards": self.rewards.count,
            "updates": learner.updates if learner is not None else 0,
            "dropped": learner.dropped if learner is not None else 0,
            "loss": self.algo.loss,
        }

    def parameters(self) -> dict[str, torch.Tensor]:
        # The learner's copy is taken under its lock: never half an update.
        return self.learner.state_dict() if self.learner is not None else self.algo.state_dict()
