"""``apdispatch train``: pre-train a learned policy in the simulator, write a checkpoint.

Two phases, on the given scenarios in turn:

1. Imitation (actor-critic): the simulator runs a teacher while every
   decision's candidate features and the teacher's choice are recorded; the
   actor is fitted to those choices (behaviour cloning), so that learning
   starts from a good policy instead of a random one. The default teacher is
   ``slack`` (``apdispatch.learned.slack``): among the targets predicted to
   answer well within the deadline, the farthest, which leaves the near, fast
   targets to the requests that cannot go anywhere else. (ASET: its agent is
   fitted to pick the teacher's action.)
2. Reinforcement: episodes of the simulator with the policy learning online,
   exactly as it does in the AP (updates inline, so a seeded run is
   reproducible), each episode on fresh arrivals (seed + episode).

The checkpoint's JSON records the command that made it, the scenarios, the
seed and what each episode scored against ``fastest`` on the same arrivals.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from apdispatch.learned.features import Margins, candidate_features
from apdispatch.routing.policy import Candidate, Feedback, Policy, RequestView
from apdispatch.sim.profile import REFERENCE, LatencyProfile, parse_latencies

if TYPE_CHECKING:
    from apdispatch.scenario import Scenario
    from apdispatch.sim.model import SimModel

# Imitation samples kept per scenario (20,000: plenty for a 9-feature
# scorer), and in all: with many scenarios each gives a share.
IMITATION_SAMPLES = 20_000
IMITATION_TOTAL = 160_000


TEACHERS = ("slack", "slack-guarded", "fastest")


class Recorder(Policy):
    """Runs a teacher policy and records (features, teacher's choice) of each decision."""

    def __init__(self, teacher: Policy, limit: int, seed: int) -> None:
        self.name = f"record-{teacher.name}"
        self.teacher = teacher
        self.xs: list[np.ndarray] = []
        self.ys: list[int] = []
        self._seen = 0
        self._limit = limit
        self._rng = np.random.default_rng(seed)

    def choose(self, request: RequestView, candidates: Sequence[Candidate]) -> Candidate:
        chosen = self.teacher.choose(request, candidates)
        if len(candidates) > 1:
            # Reservoir sampling: a uniform sample over the whole run, not its start.
            self._seen += 1
            slot = len(self.xs) if len(self.xs) < self._limit else int(self._rng.integers(self._seen))
            if slot < self._limit:
                x = candidate_features(request, candidates)
                i = next(k for k, c in enumerate(candidates) if c is chosen)
                if slot == len(self.xs):
                    self.xs.append(x)
                    self.ys.append(i)
                else:
                    self.xs[slot], self.ys[slot] = x, i
        return chosen

    def observe(self, feedback: Feedback) -> None:
        self.teacher.observe(feedback)


@dataclass
class Episode:
    scenario: str
    seed: int
    success: float
    fastest: float
    updates: int
    seconds: float


def _success(counts: dict[str, int]) -> float:
    total = sum(counts.values())
    return counts.get("ok", 0) / total if total else 0.0


def train(
    scenario_paths: Sequence[Path],
    out: Path,
    *,
    generated: Sequence[int] = (),
    policy: str = "learned",
    teacher: str = "slack",
    episodes: int = 6,
    energy_weight: float = 0.0,
    seed: int = 0,
    duration_s: float | None = None,
    models: Path | None = Path("build/models"),
    latencies: LatencyProfile | None = None,
    command: str = "",
    log: Any = print,
) -> dict[str, Any]:
    from apdispatch.common.manifest import load_manifest
    from apdispatch.learned.aset import ACTIONS, AsetPolicy
    from apdispatch.learned.checkpoint import paths
    from apdispatch.learned.factory import make_learned_policy
    from apdispatch.learned.policy import ActorCriticPolicy
    from apdispatch.policies import make_policy
    from apdispatch.routing.estimator import DEFAULT_QUEUE_MODEL
    from apdispatch.scenario import load_scenario
    from apdispatch.sim.arrivals import plan_arrivals
    from apdispatch.sim.generate import DURATION_S, generated_scenario
    from apdispatch.sim.model import load_model
    from apdispatch.sim.results import simulate

    torch.set_num_threads(1)
    started = time.perf_counter()
    loaded: list[tuple[str, Scenario, SimModel]] = []
    for path in scenario_paths:
        scenario = load_scenario(path)
        if duration_s is not None:
            scenario = scenario.scaled(duration_s)
        loaded.append((str(path), scenario, load_model(scenario, models, latencies=latencies)))
    if generated:
        if models is None:
            raise ValueError("generated scenarios need the model zoo's manifest (--models)")
        manifest = load_manifest(models)
        for g in generated:
            scenario = generated_scenario(g, manifest, duration_s or DURATION_S, latencies)
            loaded.append((f"generated:{g}", scenario, load_model(scenario, models, latencies=latencies)))
    per_scenario = min(IMITATION_SAMPLES, IMITATION_TOTAL // max(1, len(loaded)))

    kind = "aset" if policy == "aset" else "actor-critic"
    # A fresh policy of the kind asked for: the shipped checkpoint is what we
    # are making, not where we start.
    fresh = make_learned_policy(kind, seed, background=False, fresh=True)
    assert isinstance(fresh, ActorCriticPolicy | AsetPolicy)
    learner: ActorCriticPolicy | AsetPolicy = fresh
    if isinstance(learner, ActorCriticPolicy):
        # Kept in the checkpoint's hyperparameters: online learning goes on with it.
        learner.algo.hyper.energy_weight = energy_weight

    # Phase 1: imitation of the teacher.
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for i, (_, scenario, model) in enumerate(loaded):
        arrivals = plan_arrivals(scenario, seed + 1000 + i)
        if kind == "actor-critic":
            teach: Policy = make_policy(teacher)
            recorder = Recorder(teach, per_scenario, seed + i)
            simulate(model, recorder, arrivals)
            xs += recorder.xs
            ys += recorder.ys
    imitation_loss = None
    if kind == "actor-critic" and xs:
        assert isinstance(learner, ActorCriticPolicy)
        imitation_loss = learner.algo.imitate(xs, ys, epochs=8)
        learner._publish(learner.algo.snapshot())
        log(f"imitation of {teacher}: {len(xs)} decisions, loss {imitation_loss:.4f}")
    elif kind == "aset":
        assert isinstance(learner, AsetPolicy)
        _imitate_aset(learner, ACTIONS.index(teacher))
        log(f"imitation: ASET agent starts on {teacher}")

    # Phase 2: reinforcement, online as in the AP.
    history: list[Episode] = []
    baseline: dict[tuple[int, int], float] = {}
    for e in range(episodes):
        k = e % len(loaded)
        _, scenario, model = loaded[k]
        ep_seed = seed + e
        arrivals = plan_arrivals(scenario, ep_seed)
        if (k, ep_seed) not in baseline:
            baseline[(k, ep_seed)] = _success(simulate(model, make_policy("fastest"), arrivals).counts)
        t0 = time.perf_counter()
        before = learner.algo.updates
        result = simulate(model, learner, arrivals)
        ep = Episode(
            scenario=scenario.name,
            seed=ep_seed,
            success=round(_success(result.counts), 5),
            fastest=round(baseline[(k, ep_seed)], 5),
            updates=learner.algo.updates - before,
            seconds=round(time.perf_counter() - t0, 1),
        )
        history.append(ep)
        log(
            f"episode {e + 1}/{episodes} {ep.scenario} seed {ep.seed}: success {100 * ep.success:.2f} % "
            f"(fastest {100 * ep.fastest:.2f} %), {ep.updates} updates, {ep.seconds} s"
        )

    learner.meta.update(
        {
            "command": command,
            "trained_on": [p for p, _, _ in loaded],
            "episodes": episodes,
            "seed": seed,
            "teacher": teacher if kind == "actor-critic" else "fastest",
            "duration_s": duration_s,
            "latencies": loaded[0][2].latencies if loaded else None,
            "queue_model": DEFAULT_QUEUE_MODEL,
            "imitation_samples": len(xs),
            "imitation_loss": imitation_loss,
            "history": [vars(h) for h in history],
            "train_seconds": round(time.perf_counter() - started, 1),
            "torch": torch.__version__,
        }
    )
    if isinstance(learner, ActorCriticPolicy):
        # The margins describe the training scenarios' targets, not a
        # deployment's: a pre-trained checkpoint ships none.
        learner.margins = Margins(learner.guards.config)
    learner.save(out)
    learner.close()
    log(f"checkpoint: {paths(out)[0]} + {paths(out)[1].name} ({time.perf_counter() - started:.0f} s)")
    return learner.config()


def _imitate_aset(policy: Any, action: int, steps: int = 300) -> None:
    """Bias a fresh ASET agent towards one of its actions (the teacher: its safest start)."""
    from apdispatch.learned.aset import N_OBS

    algo = policy.algo
    rng = np.random.default_rng(0)
    obs = torch.from_numpy(rng.uniform(0.0, 1.0, size=(512, N_OBS))).float()
    target = torch.full((512,), action)
    for _ in range(steps):
        logits = algo.model.actor.logits(obs)
        # Stop at 80 %: ASET must keep some chance of trying the others.
        if logits.softmax(-1)[:, action].mean() >= 0.8:
            break
        loss = torch.nn.functional.cross_entropy(logits, target)
        algo.optimizer.zero_grad()
        loss.backward()
        algo.optimizer.step()
    policy._publish(algo.snapshot())


def main(args: argparse.Namespace) -> int:
    # The command as it would be typed again, from the parsed arguments.
    parts = ["apdispatch", "train", *(str(p) for p in args.scenarios), "--out", str(args.out)]
    if args.generated:
        parts += ["--generated", args.generated]
    parts += ["--policy", args.policy, "--teacher", args.teacher, "--episodes", str(args.episodes)]
    parts += ["--seed", str(args.seed)]
    if args.duration is not None:
        parts += ["--duration", f"{args.duration:g}"]
    if args.energy_weight:
        parts += ["--energy-weight", f"{args.energy_weight:g}"]
    latencies_arg: str | None = getattr(args, "latencies", None)
    if latencies_arg not in (None, REFERENCE):
        parts += ["--latencies", str(latencies_arg)]
    command = " ".join(shlex.quote(p) for p in parts)
    from apdispatch.scenario import ScenarioError
    from apdispatch.sim.seeds import parse_seeds

    try:
        latencies = parse_latencies(latencies_arg)
    except ScenarioError as exc:
        print(f"apdispatch train: {exc}", file=sys.stderr)
        return 2

    missing = [str(p) for p in args.scenarios if not Path(p).is_file()]
    if missing:
        print(f"apdispatch train: no such scenario: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        generated = parse_seeds(args.generated, 0) if args.generated else []
    except ValueError as exc:
        print(f"apdispatch train: {str(exc).replace('--seeds', '--generated')}", file=sys.stderr)
        return 2
    if not args.scenarios and not generated:
        print("apdispatch train: give scenario files, --generated SEEDS, or both", file=sys.stderr)
        return 2
    train(
        args.scenarios,
        args.out,
        generated=generated,
        policy=args.policy,
        teacher=args.teacher,
        episodes=args.episodes,
        energy_weight=args.energy_weight,
        seed=args.seed,
        duration_s=args.duration,
        models=args.models,
        latencies=latencies,
        command=command,
    )
    return 0
