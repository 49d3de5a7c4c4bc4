"""The per-request learned policy (``actor-critic``, and ``learned`` built on it).

Hot path, per decision: the guards (``guards.Guards``), features of the
candidates they leave open (plain floats, one ``np.array``), the actor's
numpy forward pass on the current snapshot when more than one is open, the
draw (``draw.sample`` while exploring, else ``draw.greedy``), and a note of
the decision for when its feedback comes back. No torch, no locks, no waiting.
``observe`` turns a feedback into a reward and hands the transition to the
learner's queue; the guards learn from it too (margins, reservations), off
the decision path.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from apdispatch.learned.actor_critic import (
    ActorCriticAlgo,
    ActorSnapshot,
    Transition,
)
from apdispatch.learned.checkpoint import CheckpointedPolicy
from apdispatch.learned.draw import greedy, sample
from apdispatch.learned.features import FEATURES, candidate_features
from apdispatch.learned.guard_config import GuardConfig
from apdispatch.learned.guards import Guards
from apdispatch.learned.learner import Learner, RewardMean
from apdispatch.learned.process import ProcessLearner
from apdispatch.routing.policy import Candidate, Feedback, RequestView

if TYPE_CHECKING:
    import torch

# Decisions whose feedback never came back (a sim cut short, a lost reply) are
# forgotten, the oldest first, beyond this many.
PENDING_LIMIT = 100_000
# The logits of a decision left with one open candidate.
ONE_LOGIT = np.zeros(1)
ONE_LOGIT.flags.writeable = False


class ActorCriticPolicy(CheckpointedPolicy):
    def __init__(
        self,
        name: str,
        algo: ActorCriticAlgo,
        *,
        seed: int = 0,
        background: bool | str = True,
        learn: bool = True,
        meta: dict[str, Any] | None = None,
        guards: GuardConfig | None = None,
    ) -> None:
        self.name = name
        self.algo = algo
        self.meta = dict(meta or {})
        # Python's generator, seeded per policy (never the global one): one
        # uniform draw per decision costs tens of ns instead of numpy's ~0.3 us.
        self._random = random.Random(seed).random
        self._snapshot: ActorSnapshot = algo.snapshot()
        self._explore = algo.config.explore
        self._mask_late = algo.config.mask_late
        self._pending: dict[int, tuple[RequestView, int, np.ndarray, int, np.ndarray]] = {}
        # Which candidates the network may score. Learned here, in the deciding
        # process, whatever runs the updates; the margins are saved with the
        # checkpoint, the reservations are learned again.
        self.guards = Guards(guards)
        self.margins = self.guards.margins
        self.reserve = self.guards.reserve
        self._seq = 0
        self.rewards = RewardMean()
        # How many candidates the network scored in the last decision (0 when
        # the masks, or calm, left one): what ``apdispatch bench --decisions``
        # tells the two paths apart by.
        self.scored = 0
        # Where updates run: "process" (the AP: off the GIL), "thread", or
        # "inline" (simulator, training, tests: reproducible).
        mode = "process" if background is True else "inline" if background is False else background
        if mode not in ("process", "thread", "inline"):
            raise ValueError(f"background: expected True, False, 'thread' or 'process', got {background!r}")
        self.learner: Learner[Transition, ActorSnapshot] | ProcessLearner | None = None
        if learn and mode == "process":
            self.learner = ProcessLearner(algo, self._publish, name=f"{name}-learner")
        elif learn:
            self.learner = Learner(algo, self._publish, background=mode == "thread", name=f"{name}-learner")

    def _publish(self, snapshot: ActorSnapshot) -> None:
        self._snapshot = snapshot

    @property
    def snapshot(self) -> ActorSnapshot:
        return self._snapshot

    def choose(self, request: RequestView, candidates: Sequence[Candidate]) -> Candidate:
        guards = self.guards
        guards.arrive(request, candidates)
        n = len(candidates)
        if n == 1:
            self.scored = 0
            return candidates[0]
        snapshot = self._snapshot  # one read: the whole decision uses one set of parameters
        open_ = guards.open(request, candidates) if self._mask_late else list(range(n))
        # Features and scores of the open candidates only: the learner never
        # reads a masked one (its logit is MASKED, out of every softmax and
        # of the critic's pooling), so the transition keeps these rows alone
        # and the action is a position among them.
        x = candidate_features(request, candidates, open_)
        if len(open_) == 1:
            i = 0  # nothing to score: one choice, whose log-probability is 0 whatever its logit
            z = ONE_LOGIT
            self.scored = 0
        else:
            z = snapshot.scores(x)
            self.scored = len(open_)
            zs = z.tolist()
            i = sample(zs, self._random()) if self._explore else greedy(zs)
        if self.learner is not None:
            pending = self._pending
            if len(pending) >= PENDING_LIMIT:
                del pending[next(iter(pending))]
            self._seq += 1
            # Keyed by identity: the feedback carries the very RequestView
            # object decided on; holding it keeps its id from being reused.
            pending[id(request)] = (request, self._seq, x, i, z)
        return candidates[open_[i]]

    def stop_learning(self) -> None:
        """Learn nothing more online: the network's updates, the margins and the reservations stop,
        and what they learned until now stays in force (a deployment that stops learning)."""
        self.guards.freeze()
        if self.learner is not None:
            self.learner.close()
            self.learner = None
        self._pending.clear()

    def rejected(self, request: RequestView) -> None:
        """Admission rejected ``request``: it still counts in its app's demand, and as a miss."""
        self.guards.rejected(request)

    def observe(self, feedback: Feedback) -> None:
        self.guards.observe(feedback)
        if self.learner is None:
            return
        record = self._pending.pop(id(feedback.request), None)
        if record is None or record[0] is not feedback.request:
            return
        request, seq, x, action, logits = record
        reward = self.algo.reward(feedback.outcome, feedback.latency_ms, request.deadline_ms)
        self.rewards.add(reward)
        self.learner.put(Transition(seq, x, action, logits, reward))

    def telemetry(self) -> dict[str, float]:
        learner = self.learner
        return {
            "reward": self.rewards.mean,
            "rewards": self.rewards.count,
            "updates": learner.updates if learner is not None else 0,
            "dropped": learner.dropped if learner is not None else 0,
            "loss": self.algo.loss,
        }

    def config(self) -> dict[str, Any]:
        # What the checkpoint was made from (the training command...) is kept;
        # the live counters, the architecture and the margins override it.
        return {
            **self.meta,
            "kind": "actor-critic",
            "features": list(FEATURES),
            **self.algo.config.to_json(),
            "updates": self.algo.updates,
            "samples": self.algo.samples,
            "guards": self.guards.config.to_json(),
            "margins": self.margins.state(),
        }

    def parameters(self) -> dict[str, torch.Tensor]:
        if isinstance(self.learner, Learner):
            return self.learner.state_dict()  # under its lock: never half an update
        return self.algo.state_dict()

    def save(self, path: Path | str) -> Path:
        if isinstance(self.learner, ProcessLearner):
            # The process holds the parameters; the config, margins included,
            # is made here, where decisions and feedback are.
            return self.learner.save(path, self.config())
        return super().save(path)
