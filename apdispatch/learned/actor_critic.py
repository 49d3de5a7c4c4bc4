"""ECSRL's actor-critic, for per-request dispatch (cleanrl style).

The **actor** scores every candidate of a request with one shared network
and takes the softmax over the set; the **critic** values the state a
request meets, pooled over its candidates (mean and max), so both fit any
number of targets. Training is PPO's clipped objective on transitions that
arrive late and out of order (the reward of a decision is known when its
reply comes back); ``compute_gae`` turns them into advantages in decision
order.

Only the learner touches torch. The hot path reads an ``ActorSnapshot``:
read-only numpy copies of the actor's weights and a numpy forward pass.
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

from apdispatch.learned.features import N_FEATURES

# A masked-out candidate's logit: finite, so that entropy and log-softmax stay
# free of NaN, yet far enough below any real logit to have probability 0.
MASKED = -1e9


def _mlp(n_in: int, hidden: Sequence[int], first_bias: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    size = n_in
    for i, h in enumerate(hidden):
        layers += [nn.Linear(size, h, bias=first_bias or i > 0), nn.Tanh()]
        size = h
    layers.append(nn.Linear(size, 1))
    return nn.Sequential(*layers)


def init_linear(module: nn.Module, generator: torch.Generator) -> None:
    """torch's default Linear initialisation, drawn from ``generator`` (not the global RNG)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.in_features)
            with torch.no_grad():
                m.weight.uniform_(-bound, bound, generator=generator)
                if m.bias is not None:
                    m.bias.uniform_(-bound, bound, generator=generator)


class Actor(nn.Module):
    """pi(target | request, candidates): a shared scorer and a softmax over the set."""

    def __init__(self, n_features: int = N_FEATURES, hidden: Sequence[int] = (32, 32)) -> None:
        super().__init__()
        # The features carry a constant column, which is the first layer's bias.
        self.net = _mlp(n_features, hidden, first_bias=False)

    def logits(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, N, F) candidates, padded; mask: (B, N), True where a candidate may be chosen."""
        return self.net(x).squeeze(-1).masked_fill(~mask, MASKED)

    def get_action(
        self, x: torch.Tensor, mask: torch.Tensor, action: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dist = Categorical(logits=self.logits(x, mask))
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy()


class Critic(nn.Module):
    """V(state): the discounted success still to come, from the candidate set a request meets."""

    def __init__(self, n_features: int = N_FEATURES, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        self.net = _mlp(2 * n_features, hidden, first_bias=True)

    @staticmethod
    def pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(x.dtype)
        mean = (x * m).sum(1) / m.sum(1).clamp(min=1.0)
        top = x.masked_fill(~mask.unsqueeze(-1), -4.0).amax(1)
        return torch.cat([mean, top], dim=-1)

    def value(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(self.pool(x, mask)).squeeze(-1)


class ActorCritic(nn.Module):
    """The two networks under one state_dict (what a checkpoint holds)."""

    def __init__(self, actor_hidden: Sequence[int] = (64,), critic_hidden: Sequence[int] = (64, 64)):
        super().__init__()
        self.actor = Actor(N_FEATURES, actor_hidden)
        self.critic = Critic(N_FEATURES, critic_hidden)


@dataclass(frozen=True, slots=True)
class ActorSnapshot:
    """Read-only numpy copy of the actor: what the hot path scores candidates with."""

    first: np.ndarray  # (F, H1), no bias (the features' constant column)
    hidden: tuple[tuple[np.ndarray, np.ndarray], ...]  # (W, b) per further hidden layer
    out_w: np.ndarray  # (H,)
    out_b: float
    version: int

    def logits(self, x: np.ndarray) -> np.ndarray:
        z = self.scores(x)
        z += self.out_b
        return z

    def scores(self, x: np.ndarray) -> np.ndarray:
        """The logits less the output bias, a constant that no softmax over candidates sees."""
        h = x @ self.first
        np.tanh(h, out=h)
        for w, b in self.hidden:
            h = h @ w
            h += b
            np.tanh(h, out=h)
        z: np.ndarray = h @ self.out_w
        return z

    @classmethod
    def of(cls, actor: Actor, version: int, temperature: float = 1.0) -> ActorSnapshot:
        linears = [m for m in actor.net if isinstance(m, nn.Linear)]

        def frozen(t: torch.Tensor) -> np.ndarray:
            a = t.detach().to(torch.float64).numpy().copy()
            a.flags.writeable = False
            return a

        first = frozen(linears[0].weight.T)
        hidden = tuple((frozen(m.weight.T), frozen(m.bias)) for m in linears[1:-1])
        out = linears[-1]
        # The temperature is folded into the output layer: free on the hot path.
        k = 1.0 / temperature
        return cls(first, hidden, frozen(out.weight[0] * k), float(out.bias.item()) * k, version)


def compute_gae(
    rewards: np.ndarray, values: np.ndarray, last_value: float, gamma: float, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimates and returns of one continuing trajectory.

    delta_t = r_t + gamma * V_{t+1} - V_t (V_T = ``last_value``);
    A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V.
    """
    n = len(rewards)
    advantages = np.zeros(n)
    running = 0.0
    for t in range(n - 1, -1, -1):
        next_value = last_value if t == n - 1 else values[t + 1]
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, advantages + values


class Transition(NamedTuple):
    """One decision and what became of it."""

    seq: int  # decision order
    x: np.ndarray  # (n, F) features of the candidates the decision could take
    action: int  # a row of x
    logits: np.ndarray  # (n,) the behaviour policy's logits; MASKED where masked
    reward: float


@dataclass
class ActorCriticHyper:
    lr: float = 1e-3  # the critic's step
    # The actor's step, small: online updates refine a policy that starts
    # good (pre-trained in the simulator) and must stay so while it learns.
    actor_lr: float = 3e-5
    # Updates at start (after loading too) that train the critic only: its
    # values must fit the scenario at hand before they steer the actor.
    critic_warmup: int = 10
    # Weight of KL(start policy || policy): keeps online learning close to
    # where it started, so that noisy advantages cannot drift it far.
    anchor_coef: float = 0.5
    # Discount per later decision: the credit a decision gets for what it did
    # to the requests after it (a slot taken is a slot another cannot have).
    gamma: float = 0.95
    gae_lambda: float = 0.9
    clip_coef: float = 0.2
    update_epochs: int = 2
    batch_size: int = 1024
    minibatch_size: int = 256
    vf_coef: float = 0.5
    ent_coef: float = 0.001
    max_grad_norm: float = 0.5
    # The AP's learner (a process) learns from at most this many decisions per
    # second, the rest are shed: its CPU time stays a small, bounded share
    # whatever the load, so that decisions do not slow down while it trains.
    # The simulator and training (inline) learn from every decision.
    max_learn_per_s: float = 50.0
    # Reward = 1 if ok, minus this times latency / deadline: the interface has
    # no power figures, and ECSRL's energy term grows with the time served.
    energy_weight: float = 0.0


@dataclass
class ActorCriticConfig:
    # One hidden layer: the decision's numpy forward pass is three calls.
    actor_hidden: tuple[int, ...] = (64,)
    critic_hidden: tuple[int, ...] = (64, 64)
    # Never pick a candidate predicted to miss the deadline (admission
    # guarantees one that is predicted in time).
    mask_late: bool = True
    # Sample from the softmax (on-policy learning) or take the argmax.
    explore: bool = True
    # Decisions sample from softmax(logits / temperature): below 1, closer to
    # the argmax, so that exploring online costs little success.
    temperature: float = 0.25
    hyper: ActorCriticHyper = field(default_factory=ActorCriticHyper)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["actor_hidden"] = list(self.actor_hidden)
        d["critic_hidden"] = list(self.critic_hidden)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ActorCriticConfig:
        known = {k: v for k, v in d.get("hyper", {}).items() if k in ActorCriticHyper.__dataclass_fields__}
        return cls(
            actor_hidden=tuple(d.get("actor_hidden", (64,))),
            critic_hidden=tuple(d.get("critic_hidden", (64, 64))),
            mask_late=bool(d.get("mask_late", True)),
            explore=bool(d.get("explore", True)),
            temperature=float(d.get("temperature", 0.25)),
            hyper=ActorCriticHyper(**known),
        )


def pad(xs: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-size candidate sets as one (B, N, F) tensor and its (B, N) mask."""
    n = max(len(x) for x in xs)
    out = np.zeros((len(xs), n, N_FEATURES), dtype=np.float32)
    mask = np.zeros((len(xs), n), dtype=bool)
    for i, x in enumerate(xs):
        out[i, : len(x)] = x
        mask[i, : len(x)] = True
    return torch.from_numpy(out), torch.from_numpy(mask)


def valid_mask(logits: np.ndarray) -> np.ndarray:
    """The candidates a decision could pick: all of them when every one was masked."""
    valid = logits > MASKED / 2
    return valid if valid.any() else np.ones_like(valid)


def behaviour_log_prob(logits: np.ndarray, action: int) -> float:
    """log pi(action) under the logits a decision was made with (masked ones excluded)."""
    valid = logits[valid_mask(logits)]
    top = valid.max()
    return float(logits[action] - top - np.log(np.exp(valid - top).sum()))


class ActorCriticAlgo:
    """The learner's side: torch parameters, PPO updates, snapshots for the hot path."""

    def __init__(self, config: ActorCriticConfig, seed: int = 0) -> None:
        self.config = config
        self.hyper = config.hyper
        self.batch_size = self.hyper.batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.model = ActorCritic(config.actor_hidden, config.critic_hidden)
        init_linear(self.model, self.generator)
        self.optimizer = torch.optim.Adam(
            [
                {"params": self.model.actor.parameters(), "lr": self.hyper.actor_lr},
                {"params": self.model.critic.parameters(), "lr": self.hyper.lr},
            ],
            eps=1e-5,
        )
        self.anchor = Actor(N_FEATURES, config.actor_hidden)
        self.reset_anchor()
        self.version = 0
        self.updates = 0  # over the policy's whole life (kept in checkpoints)
        self.session_updates = 0  # since this process loaded it
        self.samples = 0
        self.loss = math.nan  # the last update's last minibatch loss

    def reset_anchor(self) -> None:
        """The policy online learning stays close to: the actor as it is now."""
        self.anchor.load_state_dict(self.model.actor.state_dict())
        self.anchor.requires_grad_(False)

    def snapshot(self) -> ActorSnapshot:
        return ActorSnapshot.of(self.model.actor, self.version, self.config.temperature)

    def reward(self, outcome: str, latency_ms: float, deadline_ms: float) -> float:
        r = 1.0 if outcome == "ok" else 0.0
        w = self.hyper.energy_weight
        if w:
            r -= w * min(1.0, latency_ms / max(deadline_ms, 1e-3))
        return r

    def update(self, batch: list[Transition]) -> ActorSnapshot:
        h = self.hyper
        batch = sorted(batch, key=lambda t: t.seq)
        x, valid = pad([t.x for t in batch])
        mask = torch.zeros_like(valid)
        for i, t in enumerate(batch):
            mask[i, : len(t.logits)] = torch.from_numpy(valid_mask(t.logits))
        actions = torch.tensor([t.action for t in batch])
        old_logp = torch.tensor([behaviour_log_prob(t.logits, t.action) for t in batch])
        # Rewards scaled by (1 - gamma): values then read as a success ratio.
        rewards = np.array([t.reward for t in batch]) * (1.0 - h.gamma)
        with torch.no_grad():
            values = self.model.critic.value(x, mask).double().numpy()
        adv, ret = compute_gae(rewards, values, float(values[-1]), h.gamma, h.gae_lambda)
        advantages = torch.from_numpy(adv).float()
        returns = torch.from_numpy(ret).float()
        n = len(batch)
        train_actor = self.session_updates >= h.critic_warmup
        inv_t = 1.0 / self.config.temperature
        if train_actor:
            with torch.no_grad():
                anchor_logp = torch.log_softmax(self.anchor.logits(x, mask) * inv_t, -1)
        for _ in range(h.update_epochs):
            order = torch.randperm(n, generator=self.generator)
            for start in range(0, n, h.minibatch_size):
                idx = order[start : start + h.minibatch_size]
                v_loss = 0.5 * (self.model.critic.value(x[idx], mask[idx]) - returns[idx]).pow(2).mean()
                loss = h.vf_coef * v_loss
                if train_actor:
                    logits = self.model.actor.logits(x[idx], mask[idx]) * inv_t
                    dist = Categorical(logits=logits)
                    logp = dist.log_prob(actions[idx])
                    ratio = (logp - old_logp[idx].float()).exp()
                    a = advantages[idx]
                    if len(idx) > 1:
                        a = (a - a.mean()) / (a.std() + 1e-8)
                    pg_loss = torch.max(-a * ratio, -a * ratio.clamp(1 - h.clip_coef, 1 + h.clip_coef)).mean()
                    prior = anchor_logp[idx]
                    kl = (prior.exp() * (prior - torch.log_softmax(logits, -1))).sum(-1).mean()
                    loss = loss + pg_loss - h.ent_coef * dist.entropy().mean() + h.anchor_coef * kl
                self.optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.model.parameters(), h.max_grad_norm)
                self.optimizer.step()
        self.loss = float(loss.item())
        self.updates += 1
        self.session_updates += 1
        self.samples += n
        self.version += 1
        return self.snapshot()

    def imitate(
        self, xs: Sequence[np.ndarray], targets: Sequence[int], epochs: int = 16, lr: float = 3e-3
    ) -> float:
        """Behaviour cloning: cross-entropy towards a teacher's choices. Returns the final loss.

        Its own optimizer, with a larger step than reinforcement's: the
        targets are exact, and the RL optimizer's moments stay untouched.
        """
        x, mask = pad(xs)
        y = torch.tensor(list(targets))
        n = len(y)
        loss = torch.tensor(0.0)
        optimizer = torch.optim.Adam(self.model.actor.parameters(), lr=lr)
        for _ in range(epochs):
            order = torch.randperm(n, generator=self.generator)
            for start in range(0, n, self.hyper.minibatch_size):
                idx = order[start : start + self.hyper.minibatch_size]
                logits = self.model.actor.logits(x[idx], mask[idx])
                loss = nn.functional.cross_entropy(logits, y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        self.reset_anchor()
        self.version += 1
        return float(loss.item())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
        self.reset_anchor()
        self.version += 1
