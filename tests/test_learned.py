"""Learned policies: maths by hand, learning, snapshots, checkpoints, and resume in a real AP."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from apdispatch.ap.config import ConfigError, load_config
from apdispatch.learned.actor_critic import (
    MASKED,
    Actor,
    ActorSnapshot,
    behaviour_log_prob,
    compute_gae,
    pad,
)
from apdispatch.learned.aset import ACTIONS, AsetPolicy
from apdispatch.learned.checkpoint import SHIPPED, CheckpointError, load_checkpoint, paths
from apdispatch.learned.draw import greedy, sample
from apdispatch.learned.factory import make_learned_policy
from apdispatch.learned.features import (
    FEATURES,
    HIGH,
    LOW,
    N_FEATURES,
    Margins,
    candidate_features,
)
from apdispatch.learned.guard_config import GuardConfig
from apdispatch.learned.guards import Risk, SafetyMargin, SlowerVariant
from apdispatch.learned.policy import ActorCriticPolicy
from apdispatch.learned.process import ProcessLearner
from apdispatch.policies import (
    LEARNED_POLICIES,
    STATIC_POLICIES,
    Candidate,
    Feedback,
    RequestView,
    make_policy,
)
from apdispatch.scenario import load_scenario

SPREAD = GuardConfig().spread
RISK_SPREAD = GuardConfig().risk_spread
REQUEST = RequestView(task="digits", app="ar", deadline_ms=50.0, min_accuracy=0.8)
# Generous: a learner process's start (torch's import) on a loaded machine, plus its updates.
LEARNER_WAIT_S = 300.0


def _c(key: str, *, acc: float, rtt: float, busy: int, slots: int, predicted: float) -> Candidate:
    return Candidate(
        key=f"{key}/{key}/v",
        worker=key,
        cluster=key,
        variant="v",
        accuracy=acc,
        rtt_ms=rtt,
        in_flight=busy,
        slots=slots,
        predicted_ms=predicted,
    )


def _margins(margin: dict[str, float] | None = None, risk: dict[str, float] | None = None) -> Margins:
    """Margins that hold exactly these per-key values."""
    m = Margins()
    m.margin.update(margin or {})
    m.risk.update(risk or {})
    return m


def _screened(
    request: RequestView, cands: list[Candidate], margins: dict[str, float] | None = None
) -> list[int]:
    """What the first two guards (slower variant, safety margin) leave open."""
    open_ = SlowerVariant().open(request, cands, list(range(len(cands))))
    return SafetyMargin(_margins(margins)).open(request, cands, open_)


def _masked(
    request: RequestView, cands: list[Candidate], margins: dict[str, float] | None = None
) -> list[int]:
    """The candidates the first two guards close."""
    open_ = _screened(request, cands, margins)
    return [k for k in range(len(cands)) if k not in open_]


A = _c("a", acc=0.90, rtt=5.0, busy=1, slots=2, predicted=20.0)
B = _c("b", acc=0.95, rtt=10.0, busy=3, slots=2, predicted=30.0)
C = _c("c", acc=0.85, rtt=40.0, busy=0, slots=4, predicted=60.0)  # predicted past the deadline


def _pressing(policy: ActorCriticPolicy, request: RequestView, cands: list[Candidate]) -> RequestView:
    """10 s of 30 requests a second of the request's app; returns the request at 10 s.

    a and b serve "ar" 2 / 15 ms + 2 / 20 ms = 233 requests a second; ~19 a
    second (the rate decayed over 10 s) press on them by 0.08, above LOAD
    (0.05): without outcomes, "ar" is then an app that needs room, and the
    policy is not calm.
    """
    for i in range(300):
        view = request._replace(now_s=i / 30.0)
        policy.reserve.arrive(view)
        policy.reserve.note(view, cands)
    return request._replace(now_s=10.0)


# -- maths against hand-computed cases -------------------------------------------------


def test_features_of_known_candidates() -> None:
    # Safety margins: a's replies come 5 ms later than predicted, c's 10 ms; b has none yet.
    margins = {A.key: 5.0, C.key: 10.0}
    x = candidate_features(REQUEST, [A, B, C])
    masked = _masked(REQUEST, [A, B, C], margins)
    assert x.shape == (3, N_FEATURES)
    expected = {
        # slack, behind_fastest, accuracy_margin, most_accurate, load, free_slot, rtt,
        # behind_closest, bias.
        # Deadline 50 ms: fastest 20/50 = 0.4, closest 5/50 = 0.1.
        "a": [0.6, 0.0, 1.0, 0.0, 0.5, 1.0, 0.1, 0.0, 1.0],
        # accuracy margin (0.95 - 0.8) * 10 = 1.5, clipped to 1; 3 in flight on 2 slots.
        "b": [0.4, 0.2, 1.0, 1.0, 1.5, 0.0, 0.2, 0.1, 1.0],
        "c": [-0.2, 0.8, 0.5, 0.0, 0.0, 1.0, 0.8, 0.7, 1.0],
    }
    for row, key in zip(x, "abc", strict=True):
        np.testing.assert_allclose(row, expected[key], atol=1e-12, err_msg=key)
    assert masked == [2]  # c: predicted 60 ms, past the 50 ms deadline
    assert FEATURES[0] == "slack" and FEATURES[-1] == "bias"


def test_unsafe_candidates_are_masked_while_a_safe_one_remains() -> None:
    # a: 20 + 35 = 55 > 50 ms, unsafe; b: 30 + 0, safe; c: late.
    masked = _masked(REQUEST, [A, B, C], {A.key: 35.0})
    assert masked == [0, 2]
    # b unsafe too (30 + 25): nothing is safe, so only the late one is masked.
    masked = _masked(REQUEST, [A, B, C], {A.key: 35.0, B.key: 25.0})
    assert masked == [2]


def test_slower_variants_of_one_worker_are_masked() -> None:
    # a and a2 are two variants on worker "a"; a2 is predicted sooner, so a is masked.
    a2 = A._replace(key="a/a/v2", variant="v2", predicted_ms=12.0)
    masked = _masked(REQUEST, [A, a2, B, C], {})
    assert masked == [0, 3]
    # Between variants of one worker the margins do not count, only the predictions: a2's
    # margin (12 + 10 > 20 + 0) leaves it the one open.
    masked = _masked(REQUEST, [A, a2, B, C], {a2.key: 10.0})
    assert masked == [0, 3]
    # a2 unsafe (12 + 40 > 50) and a safe (20 + 0): the slower variant does not stand in
    # for the worker's soonest. b is safe, so it is the one open.
    masked = _masked(REQUEST, [A, a2, B, C], {a2.key: 40.0})
    assert masked == [0, 1, 3]
    # Deadline 15 ms, nothing safe: only the late (a, b) are masked, a2 stays the one open.
    tight = RequestView("digits", "ar", deadline_ms=15.0, min_accuracy=0.8)
    masked = _masked(tight, [A, a2, B], {a2.key: 10.0})
    assert masked == [0, 2]
    # Equal predictions: the first of them stays open.
    twin = A._replace(key="a/a/v3", variant="v3")
    masked = _masked(REQUEST, [A, twin, B], {})
    assert masked == [1]


def _reference_mask(request: RequestView, cands: list[Candidate], margins: dict[str, float]) -> list[int]:
    """The mask as its docstring states it, written plainly."""
    timely = [k for k, c in enumerate(cands) if c.predicted_ms <= request.deadline_ms]
    soonest = set()
    for worker in {cands[k].worker for k in timely}:
        mine = [k for k in timely if cands[k].worker == worker]
        soonest.add(min(mine, key=lambda k: (cands[k].predicted_ms, k)))
    deadline = request.deadline_ms
    safe = {k for k in soonest if cands[k].predicted_ms + margins.get(cands[k].key, 0.0) <= deadline}
    kept = safe or soonest
    return [k for k in range(len(cands)) if k not in kept]


def test_mask_matches_its_plain_statement_on_random_sets() -> None:
    rng = np.random.default_rng(3)
    for _ in range(2000):
        n = int(rng.integers(2, 12))
        workers = [f"w{int(w)}" for w in rng.integers(0, 4, size=n)]
        cands = [
            Candidate(
                key=f"c/{w}/v{k}",
                worker=w,
                cluster="c",
                variant=f"v{k}",
                accuracy=0.9,
                rtt_ms=float(rng.uniform(0, 20)),
                in_flight=0,
                slots=1,
                predicted_ms=float(rng.choice([10.0, 20.0, 30.0, rng.uniform(1, 70)])),
            )
            for k, w in enumerate(workers)
        ]
        margins = {c.key: float(rng.choice([0.0, 5.0, rng.uniform(0, 30)])) for c in cands}
        if min(c.predicted_ms for c in cands) > REQUEST.deadline_ms:
            continue  # admission rejects these: no candidate is predicted in time
        masked = _masked(REQUEST, cands, margins)
        assert masked == _reference_mask(REQUEST, cands, margins)


def test_features_match_their_plain_statement_on_random_sets() -> None:
    rng = np.random.default_rng(11)
    for _ in range(500):
        n = int(rng.integers(1, 12))
        cands = [
            _c(
                f"w{k}",
                acc=float(rng.uniform(0.5, 1.0)),
                rtt=float(rng.uniform(0.0, 150.0)),
                busy=int(rng.integers(0, 12)),
                slots=int(rng.integers(1, 4)),
                predicted=float(rng.uniform(0.0, 200.0)),
            )
            for k in range(n)
        ]
        req = RequestView("digits", "ar", float(rng.uniform(5.0, 120.0)), float(rng.uniform(0.4, 0.95)))
        left = req.deadline_ms
        p = np.array([c.predicted_ms for c in cands]) / left
        r = np.array([c.rtt_ms for c in cands]) / left
        acc = np.array([c.accuracy for c in cands])
        busy = np.array([c.in_flight for c in cands])
        slots = np.array([c.slots for c in cands])
        raw = np.stack(
            [1 - p, p - p.min(), (acc - req.min_accuracy) * 10, acc == acc.max(), busy / slots,
             busy < slots, r, r - r.min(), np.ones(n)],
            axis=1,
        )  # fmt: skip
        expected = np.clip(raw, LOW, HIGH)
        np.testing.assert_allclose(candidate_features(req, cands), expected, rtol=0, atol=1e-12)


def test_rows_of_a_subset_read_as_in_the_whole_set() -> None:
    # behind_fastest, most_accurate and behind_closest compare with every candidate, even
    # those whose rows are not asked for: here a (fastest, closest) and b (most accurate).
    whole = candidate_features(REQUEST, [A, B, C])
    np.testing.assert_array_equal(candidate_features(REQUEST, [A, B, C], [2]), whole[[2]])
    np.testing.assert_array_equal(candidate_features(REQUEST, [A, B, C], [2, 0]), whole[[2, 0]])
    behind = FEATURES.index("behind_fastest")
    assert candidate_features(REQUEST, [A, B, C], [2])[0, behind] == pytest.approx(0.8)


def test_a_decision_keeps_the_rows_it_could_choose_from() -> None:
    policy = make_learned_policy("actor-critic", seed=0, fresh=True, background=False, temperature=1.0)
    assert isinstance(policy, ActorCriticPolicy)
    # c is late (masked): two rows, and the chosen candidate is the row the action names.
    request = _pressing(policy, REQUEST, [A, B, C])
    chosen = policy.choose(request, [A, B, C])
    _, _, x, action, logits = policy._pending[id(request)]
    np.testing.assert_array_equal(x, candidate_features(request, [A, B, C], [0, 1]))
    assert logits.shape == (2,) and chosen is [A, B][action]
    # One open candidate (a2 is the sooner variant on a's worker, c late): no network, logit 0.
    a2 = A._replace(key="a/a/v2", variant="v2", predicted_ms=12.0)
    alone = RequestView("digits", "ar", 25.0, 0.8)
    assert policy.choose(alone, [A, a2, C]) is a2
    _, _, x, action, logits = policy._pending[id(alone)]
    np.testing.assert_array_equal(x, candidate_features(alone, [A, a2, C], [1]))
    assert action == 0 and logits.tolist() == [0.0]


def test_features_are_clipped() -> None:
    gone = RequestView("digits", "ar", deadline_ms=10.0, min_accuracy=0.0)
    far = _c("far", acc=1.0, rtt=500.0, busy=50, slots=1, predicted=900.0)
    near = _c("near", acc=1.0, rtt=1.0, busy=0, slots=1, predicted=2.0)
    x = candidate_features(gone, [near, far])
    late = _masked(gone, [near, far])
    np.testing.assert_allclose(x[1], [-1.0, 2.0, 1.0, 1.0, 4.0, 0.0, 2.0, 2.0, 1.0])
    assert late == [1]


def test_margins_by_hand() -> None:
    margins = Margins(GuardConfig(margin_alpha=0.5))
    margins.observe("t", predicted_ms=10.0, latency_ms=12.0)
    # The first residual (2) seeds the mean, no spread yet.
    assert margins.margin["t"] == pytest.approx(2.0)
    margins.observe("t", predicted_ms=10.0, latency_ms=14.0)
    # mean 2 + 0.5 * (4 - 2) = 3; second moment 4 + 0.5 * (16 - 4) = 10; sd sqrt(10 - 9) = 1
    assert margins.margin["t"] == pytest.approx(3.0 + SPREAD * 1.0)
    margins.observe("u", predicted_ms=10.0, latency_ms=4.0)  # earlier than predicted
    assert margins.margin["u"] == 0.0
    # The wider margin: mean 3 + RISK_SPREAD (2) sd.
    assert margins.risk["t"] == pytest.approx(3.0 + RISK_SPREAD * 1.0)
    # Late chance, normal fit (mean 3, sd 1): 40 ms predicted, 44 ms deadline is
    # one sd of slack, 1 - Phi(1) = 0.1587; two sd, 0.0228.
    assert margins.late_chance("t", 40.0, 44.0) == pytest.approx(0.158655, abs=1e-5)
    assert margins.late_chance("t", 40.0, 45.0) == pytest.approx(0.022750, abs=1e-5)
    # No spread: late exactly when the corrected prediction is; no replies: the prediction alone.
    # ("u" replies 6 ms before its predictions.)
    assert margins.late_chance("u", 10.0, 3.9) == 1.0
    assert margins.late_chance("u", 10.0, 4.0) == 0.0
    assert margins.late_chance("never", 10.0, 10.0) == 0.0


def test_frozen_margins_stay_as_they_were() -> None:
    margins = Margins(GuardConfig(margin_alpha=0.5))
    margins.observe("t", predicted_ms=10.0, latency_ms=12.0)
    margins.freeze()
    margins.observe("t", predicted_ms=10.0, latency_ms=30.0)
    margins.observe("new", predicted_ms=10.0, latency_ms=30.0)
    assert margins.margin == {"t": pytest.approx(2.0)} and margins.state()["t"]["replies"] == 1


def test_a_policy_that_stops_learning_keeps_what_it_learned() -> None:
    policy = make_learned_policy("learned", seed=0, background=False)
    assert isinstance(policy, ActorCriticPolicy) and policy.learner is not None
    chosen = policy.choose(REQUEST, [A, B, C])
    policy.observe(Feedback(REQUEST, chosen, "ok", chosen.predicted_ms + 3.0))
    learned = dict(policy.margins.margin)
    assert learned == {chosen.key: pytest.approx(3.0)}
    policy.stop_learning()
    assert policy.learner is None
    for _ in range(20):
        chosen = policy.choose(REQUEST, [A, B, C])
        policy.observe(Feedback(REQUEST, chosen, "late", chosen.predicted_ms + 40.0))
    assert policy.margins.margin == learned


def test_learned_stopped_stops_learning_at_its_time_on_the_runs_clock() -> None:
    from apdispatch.sim.seeds import StopsLearning, guarded_maker

    policy = guarded_maker({}, stop_learning_s=5.0)("learned-stopped", 0)
    assert isinstance(policy, StopsLearning) and policy.name == "learned"
    inner = policy.policy
    for now, late_by in ((4.9, 3.0), (5.0, 40.0), (9.0, 40.0)):
        request = REQUEST._replace(now_s=now)
        chosen = policy.choose(request, [A, B, C])
        policy.observe(Feedback(request, chosen, "ok", chosen.predicted_ms + late_by))
        assert policy.stopped == (now >= 5.0)
    # Only the reply to the decision before 5 s was learned from.
    assert list(inner.margins.margin.values()) == [pytest.approx(3.0)]
    assert inner.learner is None
    policy.close()


def test_an_early_outlier_weighs_as_one_reply_among_the_first() -> None:
    margins = Margins(GuardConfig(margin_alpha=0.05))
    for latency in (60.0, 10.0, 10.0, 10.0):  # a cold start's 50 ms, then on time
        margins.observe("t", predicted_ms=10.0, latency_ms=latency)
    # A plain average over the first 1 / alpha = 20 replies: mean 50 / 4 = 12.5,
    # second moment 2500 / 4 = 625, sd sqrt(625 - 156.25) = 21.65.
    # (With alpha from the start the mean would still be 50 * 0.95^3 = 42.9.)
    assert margins.margin["t"] == pytest.approx(12.5 + math.sqrt(468.75))
    for _ in range(16):
        margins.observe("t", predicted_ms=10.0, latency_ms=10.0)
    assert margins.state()["t"]["mean_ms"] == pytest.approx(50.0 / 20)
    # From then on exponential: the 21st reply moves the mean by alpha.
    margins.observe("t", predicted_ms=10.0, latency_ms=30.0)
    assert margins.state()["t"]["mean_ms"] == pytest.approx(2.5 + 0.05 * (20.0 - 2.5))


def test_the_wider_margin_of_a_target_known_from_few_replies_is_wider() -> None:
    margins = Margins(GuardConfig(margin_alpha=0.5))
    for latency in (12.0, 14.0, 14.0):
        margins.observe("t", predicted_ms=10.0, latency_ms=latency)
    # mean 3 + 0.5 * (4 - 3) = 3.5; second moment 10 + 0.5 * (16 - 10) = 13; sd sqrt(0.75).
    # From 3 replies the 2 sd become Student's t with 2 df at the normal's 2 sd
    # quantile p = Phi(2) = 0.97724987: in closed form (2p - 1) / sqrt(2p(1 - p)) = 4.52654 sd.
    p = 1.0 - 0.5 * math.erfc(2.0 / math.sqrt(2.0))
    t2 = (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    assert t2 == pytest.approx(4.526537, abs=1e-6)
    assert margins.risk["t"] == pytest.approx(3.5 + t2 * math.sqrt(0.75), abs=1e-9)
    assert margins.margin["t"] == pytest.approx(3.5 + SPREAD * math.sqrt(0.75))  # the narrow one as it was
    # The factor falls with the replies and is gone from 400 on.
    risk_spread = margins.risk_spread
    assert risk_spread(6) == pytest.approx(2.648649, abs=1e-6)
    assert risk_spread(40) == pytest.approx(2.066165, abs=1e-6)
    assert risk_spread(399) > risk_spread(400) == RISK_SPREAD == risk_spread(10_000)
    # Fewer than 3: as before, so that a new target can be tried at all.
    assert risk_spread(1) == risk_spread(2) == RISK_SPREAD
    # A checkpoint's margins come back with the same factor.
    again = Margins(GuardConfig(margin_alpha=0.5))
    again.load(margins.state())
    assert again.risk == margins.risk


def test_risk_guard_closes_what_the_wider_margin_puts_late_while_one_stays_open() -> None:
    near = _c("near", acc=0.9, rtt=2.0, busy=0, slots=1, predicted=10.0)
    cloud = _c("cloud", acc=0.95, rtt=30.0, busy=0, slots=4, predicted=32.0)
    risk = {cloud.key: 20.0, near.key: 1.0}  # 32 + 20 = 52 > 50: risky; 10 + 1: not
    assert _screened(REQUEST, [near, cloud]) == [0, 1]
    guard = Risk(_margins(risk=risk))
    assert guard.open(REQUEST, [near, cloud], [0, 1]) == [0]
    # With nothing safe left open (near closed before), nothing more is closed.
    assert guard.open(REQUEST, [near, cloud], [1]) == [1]
    both = Risk(_margins(risk={**risk, near.key: 45.0}))
    assert both.open(REQUEST, [near, cloud], [0, 1]) == [0, 1]


def test_gae_of_a_three_step_episode_by_hand() -> None:
    rewards = np.array([1.0, 0.0, 1.0])
    values = np.array([0.5, 0.4, 0.6])
    adv, ret = compute_gae(rewards, values, last_value=0.3, gamma=0.9, lam=0.8)
    # delta_2 = 1 + 0.9*0.3 - 0.6 = 0.67;  delta_1 = 0 + 0.9*0.6 - 0.4 = 0.14;
    # delta_0 = 1 + 0.9*0.4 - 0.5 = 0.86;  gamma*lam = 0.72
    # A_2 = 0.67;  A_1 = 0.14 + 0.72*0.67 = 0.6224;  A_0 = 0.86 + 0.72*0.6224 = 1.308128
    np.testing.assert_allclose(adv, [1.308128, 0.6224, 0.67], atol=1e-12)
    np.testing.assert_allclose(ret, [1.808128, 1.0224, 1.27], atol=1e-12)


def test_softmax_log_prob_by_hand_and_masked() -> None:
    logits = np.array([1.0, 2.0, MASKED])
    # log softmax over the two unmasked: 1 - log(e + e^2)
    assert behaviour_log_prob(logits, 0) == pytest.approx(1.0 - math.log(math.e + math.e**2))
    assert behaviour_log_prob(logits, 1) == pytest.approx(2.0 - math.log(math.e + math.e**2))
    # Every candidate masked: all equally likely, not a crash.
    assert behaviour_log_prob(np.array([MASKED, MASKED]), 1) == pytest.approx(math.log(0.5))


def test_the_draw_walks_the_softmax_by_hand() -> None:
    # logits ln 1, ln 2, ln 1: weights 1/2, 1, 1/2 of the top, total 2; u * 2 walks them in order.
    logits = [0.0, math.log(2.0), 0.0]
    assert sample(logits, 0.0) == 0
    assert sample(logits, 0.24) == 0  # 0.48 < 0.5
    assert sample(logits, 0.26) == 1  # 0.52 - 0.5 = 0.02 < 1
    assert sample(logits, 0.74) == 1  # 1.48 - 0.5 - 1 < 0
    assert sample(logits, 0.76) == 2  # 1.52 - 1.5 >= 0: the last takes the rest
    assert sample(logits, 0.999999) == 2
    assert sample([5.0], 0.7) == 0
    # Far below the top, a weight underflows to 0 and is never drawn.
    assert {sample([0.0, -1e4, 0.0], u / 100) for u in range(100)} == {0, 2}


def test_greedy_takes_the_highest_logit_and_the_first_of_equals() -> None:
    assert greedy([0.1, 0.7, -2.0]) == 1
    assert greedy([0.3, 0.9, 0.9]) == 1
    assert greedy([-1.0]) == 0


def test_numpy_snapshot_scores_like_the_torch_actor() -> None:
    g = torch.Generator().manual_seed(1)
    actor = Actor(N_FEATURES, (32, 32))  # two layers: the snapshot's loop over hidden layers
    for p in actor.parameters():
        with torch.no_grad():
            p.uniform_(-0.5, 0.5, generator=g)
    rng = np.random.default_rng(2)
    xs = [rng.uniform(0, 1, size=(n, N_FEATURES)) for n in (2, 5, 9)]
    x, mask = pad(xs)
    with torch.no_grad():
        ref = actor.logits(x, mask).double().numpy()
    snap = ActorSnapshot.of(actor, version=0)
    for i, xi in enumerate(xs):
        np.testing.assert_allclose(snap.logits(xi), ref[i, : len(xi)], rtol=1e-5, atol=1e-5)
    # The temperature divides the logits, folded into the output layer.
    hot = ActorSnapshot.of(actor, version=0, temperature=0.5)
    np.testing.assert_allclose(hot.logits(xs[0]), 2.0 * snap.logits(xs[0]), rtol=1e-9)


def test_decisions_sample_the_softmax() -> None:
    policy = make_learned_policy(
        "actor-critic", seed=5, fresh=True, learn=False, temperature=1.0, mask_late=False
    )
    assert isinstance(policy, ActorCriticPolicy)
    cands = [A, B, C]
    x = candidate_features(REQUEST, cands)
    z = policy.snapshot.logits(x)
    expected = np.exp(z - z.max())
    expected /= expected.sum()
    picks = [policy.choose(REQUEST, cands).key for _ in range(20_000)]
    freq = np.array([picks.count(c.key) for c in cands]) / len(picks)
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_late_candidates_are_never_chosen_by_learned() -> None:
    policy = make_policy("learned", seed=0, learn=False)
    picks = {policy.choose(REQUEST, [A, B, C]).key for _ in range(2000)}
    assert C.key not in picks


def test_while_no_app_needs_room_the_soonest_open_candidate_is_chosen() -> None:
    policy = make_learned_policy("actor-critic", seed=3, fresh=True, learn=False, temperature=1.0)
    assert isinstance(policy, ActorCriticPolicy)
    # a (20 ms) and b (30 ms, queued) are open, c is late. "ar" presses on a
    # and b and has no outcome yet: the network's softmax picks between them.
    request = _pressing(policy, REQUEST, [A, B, C])

    def picks(start_s: float) -> set[str]:
        at = [start_s + i / 1000.0 for i in range(200)]
        return {policy.choose(request._replace(now_s=t), [A, B, C]).key for t in at}

    assert picks(10.0) == {A.key, B.key}
    assert policy.scored == 2  # the network scored both
    # Once the app meets its SLA (its misses below 1 %), there is nobody to
    # make room for: always the soonest predicted of the open candidates.
    policy.reserve.outcome("ar", True)
    assert picks(11.0) == {A.key}
    assert policy.scored == 0  # and the network was not consulted
    # Back to the network when it misses again (seen at the next 0.2 s refresh).
    for _ in range(10):
        policy.reserve.outcome("ar", False)
    assert picks(12.0) == {A.key, B.key}
    # Still missing, but its rate has decayed (30 s on, 3.5 a second, 0.015
    # of a and b): room would not help it, and the soonest it is again.
    assert picks(42.0) == {A.key}


# -- snapshots --------------------------------------------------------------------------


# Over a floor of 0.5: margins of 0.2, 0.5, 0.8 and 1.0 (unclipped, all distinct).
ACCURACIES = (0.52, 0.55, 0.58, 0.6)


def _synthetic(rng: np.random.Generator, count: int) -> list[tuple[RequestView, list[Candidate]]]:
    """Four candidates per request, always in time, told apart by their accuracy margins."""
    out = []
    for _ in range(count):
        accs = rng.permutation(ACCURACIES)
        cands = [
            _c(
                f"c{k}",
                acc=float(accs[k]),
                rtt=float(rng.uniform(1, 20)),
                busy=int(rng.integers(0, 3)),
                slots=2,
                predicted=float(rng.uniform(20, 60)),
            )
            for k in range(4)
        ]
        out.append((RequestView("t", "a", 100.0, 0.5), cands))
    return out


FAST_LEARNING = {
    "actor_lr": 1e-2,
    "lr": 1e-2,
    "critic_warmup": 0,
    "anchor_coef": 0.0,
    "gamma": 0.0,
    "gae_lambda": 0.0,
    "batch_size": 50,
    "minibatch_size": 50,
    "update_epochs": 4,
    "ent_coef": 0.0,
    "max_learn_per_s": 0.0,  # learn from every decision, also in a learner process
}


def _fresh(background: bool | str = False, **kw: object) -> ActorCriticPolicy:
    policy = make_learned_policy(
        "actor-critic",
        seed=0,
        fresh=True,
        background=background,
        hyper=FAST_LEARNING,
        temperature=1.0,
        mask_late=False,
        **kw,
    )
    assert isinstance(policy, ActorCriticPolicy)
    return policy


def test_snapshot_is_immutable_and_swapped_whole() -> None:
    policy = _fresh()
    before = policy.snapshot
    first = before.first.copy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.version = 7  # type: ignore[misc]
    for array in (before.first, before.out_w, *(a for layer in before.hidden for a in layer)):
        assert not array.flags.writeable
        assert isinstance(array, np.ndarray)
    with pytest.raises(ValueError, match="read-only"):
        before.first[0, 0] = 1.0
    for req, cands in _synthetic(np.random.default_rng(0), 120):
        chosen = policy.choose(req, cands)
        policy.observe(Feedback(req, chosen, "ok", 10.0))
    after = policy.snapshot
    assert policy.algo.updates >= 2
    assert after is not before and after.version > before.version
    # The old snapshot (a decision in progress may hold it) was not touched.
    np.testing.assert_array_equal(before.first, first)
    assert not np.array_equal(after.first, first)


def test_hot_path_never_touches_torch() -> None:
    policy = make_policy("learned", seed=0)  # background learner, as in the AP
    snap = policy.snapshot  # type: ignore[attr-defined]
    for f in dataclasses.fields(snap):
        value = getattr(snap, f.name)
        leaves = [a for pair in value for a in pair] if f.name == "hidden" else [value]
        assert all(isinstance(v, np.ndarray | float | int) for v in leaves), f.name
    calls: list[str] = []

    def profiler(frame, event, arg):  # type: ignore[no-untyped-def]
        if event in ("call", "c_call"):
            module = (
                frame.f_globals.get("__name__", "") if event == "call" else getattr(arg, "__module__", "")
            )
            if (module or "").startswith("torch"):
                calls.append(f"{module}")

    saved = {k: v for k, v in sys.modules.items() if k == "torch" or k.startswith("torch.")}
    try:
        # With torch's modules gone, any import of them on the hot path would fail.
        for k in saved:
            sys.modules[k] = None  # type: ignore[assignment]
        sys.setprofile(profiler)
        for req, cands in _synthetic(np.random.default_rng(1), 200):
            chosen = policy.choose(req, cands)
            policy.observe(Feedback(req, chosen, "ok", 5.0))
    finally:
        sys.setprofile(None)
        sys.modules.update(saved)
        policy.close()  # type: ignore[attr-defined]
    assert calls == []


# -- learning ---------------------------------------------------------------------------


def test_converges_when_one_candidate_is_always_right() -> None:
    policy = _fresh()
    evaluation = _synthetic(np.random.default_rng(99), 200)

    def share(accuracy: float) -> float:
        hits = 0
        for req, cands in evaluation:
            x = candidate_features(req, cands)
            hits += cands[int(np.argmax(policy.snapshot.logits(x)))].accuracy == accuracy
        return hits / len(evaluation)

    # The right candidate: the accuracy the fresh network likes least, so
    # that there is something to learn whatever the initial weights.
    right = min(ACCURACIES, key=share)
    start = share(right)
    for req, cands in _synthetic(np.random.default_rng(0), 400):
        chosen = policy.choose(req, cands)
        policy.observe(Feedback(req, chosen, "ok" if chosen.accuracy == right else "late", 10.0))
    assert start <= 0.25
    assert share(right) > 0.95
    assert policy.algo.updates == 8


def _wait_for(condition: Callable[[], bool], timeout_s: float = LEARNER_WAIT_S) -> bool:
    """Poll until ``condition`` holds; False only when it never did within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("background", [True, "thread"], ids=["process", "thread"])
def test_background_learner_updates_off_the_caller(background: bool | str, tmp_path: Path) -> None:
    policy = _fresh(background=background)
    try:
        first = policy.snapshot
        for req, cands in _synthetic(np.random.default_rng(0), 200):
            chosen = policy.choose(req, cands)
            policy.observe(Feedback(req, chosen, "ok", 10.0))
        learner = policy.learner
        assert learner is not None
        # A learner process first imports torch: tens of seconds on a loaded machine.
        assert _wait_for(lambda: learner.updates >= 4), learner.updates
        assert learner.updates == 4 and learner.error is None
        assert policy.snapshot is not first
        assert policy.algo.updates == 4
        # The checkpoint holds what the decisions now use (written by the learner process).
        policy.save(tmp_path / "bg")
        again = make_learned_policy("actor-critic", checkpoint=tmp_path / "bg", learn=False)
        x = candidate_features(REQUEST, [A, B, C])
        np.testing.assert_allclose(again.snapshot.logits(x), policy.snapshot.logits(x), rtol=1e-6)  # type: ignore[attr-defined]
        assert json.loads(paths(tmp_path / "bg")[1].read_text())["updates"] == 4
    finally:
        policy.close()


def test_learner_process_outlives_a_signal_to_the_group_while_it_starts(tmp_path: Path) -> None:
    # The AP's process group gets Ctrl-C or SIGTERM as a whole; the learner
    # process, still importing torch, must not die of it: the AP's last
    # checkpoint needs it.
    policy = make_learned_policy("learned", seed=0)
    try:
        learner = policy.learner  # type: ignore[attr-defined]
        assert isinstance(learner, ProcessLearner)
        pid = learner._proc.pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        written = policy.save(tmp_path / "ck")
        assert written.is_file() and learner._proc.is_alive()
        assert learner.wait_ready(0)
    finally:
        policy.close()


# -- checkpoints ------------------------------------------------------------------------


def test_checkpoint_round_trip_gives_identical_decisions(tmp_path: Path) -> None:
    policy = _fresh()
    for req, cands in _synthetic(np.random.default_rng(3), 100):
        policy.observe(Feedback(req, policy.choose(req, cands), "ok", 1.0))
    written = policy.save(tmp_path / "ck")
    weights, meta = paths(tmp_path / "ck")
    assert written == weights and meta.is_file()
    state = torch.load(weights, weights_only=True)  # tensors only, nothing pickled
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    config = json.loads(meta.read_text())
    assert config["kind"] == "actor-critic" and config["updates"] == 2
    again = make_learned_policy("actor-critic", seed=0, checkpoint=tmp_path / "ck.pt", background=False)
    assert isinstance(again, ActorCriticPolicy)
    assert again.algo.updates == 2
    probe = _synthetic(np.random.default_rng(4), 300)
    for (req, cands), (_, _) in zip(probe, probe, strict=True):
        x = candidate_features(req, cands)
        np.testing.assert_array_equal(again.snapshot.logits(x), policy.snapshot.logits(x))
    # Same seed, same parameters: the same sampled decisions.
    a = make_learned_policy("actor-critic", seed=9, checkpoint=tmp_path / "ck", learn=False)
    b = make_learned_policy("actor-critic", seed=9, checkpoint=tmp_path / "ck", learn=False)
    assert [a.choose(r, c).key for r, c in probe] == [b.choose(r, c).key for r, c in probe]


def test_shipped_checkpoint_is_small_and_says_how_it_was_made() -> None:
    weights, _ = paths(SHIPPED)
    assert weights.stat().st_size < 100_000
    state, config = load_checkpoint(SHIPPED)
    assert config["kind"] == "actor-critic"
    assert config["command"].startswith("apdispatch train ")
    assert config["trained_on"] and all(Path(p).name.endswith(".toml") for p in config["trained_on"])
    assert set(state) == set(make_learned_policy("learned", learn=False).algo.state_dict())  # type: ignore[attr-defined]


def _timed(
    sets: list[tuple[RequestView, list[Candidate]]], start_s: float, step_s: float
) -> list[tuple[RequestView, list[Candidate]]]:
    """The requests stamped with the driver's clock: one every ``step_s`` from ``start_s``."""
    return [(req._replace(now_s=start_s + i * step_s), cands) for i, (req, cands) in enumerate(sets)]


def test_aset_switches_static_policies_per_window_and_round_trips(tmp_path: Path) -> None:
    policy = make_learned_policy("aset", seed=0, fresh=True, background=False, window_s=1.0)
    assert isinstance(policy, AsetPolicy)
    rng = np.random.default_rng(0)
    # 16 requests a second for 40 s: 40 windows of 1 s.
    for req, cands in _timed(_synthetic(rng, 16 * 40), 100.0, 1 / 16):
        chosen = policy.choose(req, cands)
        assert chosen in cands
        policy.observe(Feedback(req, chosen, "ok" if chosen.accuracy >= 0.58 else "late", 10.0))
    assert len(policy.history) == 40
    assert len(set(policy.history)) > 1  # it explores the static policies
    assert policy.algo.updates >= 2  # batches of 16 windows
    assert policy.active in ACTIONS
    policy.save(tmp_path / "aset")
    saved = json.loads(paths(tmp_path / "aset")[1].read_text())
    assert saved["window_s"] == 1.0 and saved["actions"] == [*STATIC_POLICIES, "slack", "slack-guarded"]
    again = make_learned_policy("aset", checkpoint=tmp_path / "aset", learn=False)
    assert isinstance(again, AsetPolicy)
    obs = np.linspace(0, 1, len(again.observation(again._window)))
    np.testing.assert_allclose(again._snapshot.logits(obs), policy._snapshot.logits(obs))
    with pytest.raises(ValueError, match="aset"):
        make_learned_policy("actor-critic", checkpoint=tmp_path / "aset")


def test_aset_windows_are_seconds_whatever_the_load() -> None:
    def windows(timed: list[tuple[RequestView, list[Candidate]]]) -> int:
        policy = make_learned_policy("aset", seed=0, fresh=True, learn=False, window_s=2.0)
        assert isinstance(policy, AsetPolicy)
        for req, cands in timed:
            policy.choose(req, cands)
        return len(policy.history)

    rng = np.random.default_rng(1)
    # 10 s at 5 and at 200 requests a second: 5 windows of 2 s either way.
    assert windows(_timed(_synthetic(rng, 50), 0.0, 0.2)) == 5
    assert windows(_timed(_synthetic(rng, 2000), 0.0, 0.005)) == 5
    # Nothing for 30 s opens no windows: the next request opens one.
    quiet = _timed(_synthetic(rng, 10), 0.0, 0.1) + _timed(_synthetic(rng, 10), 31.0, 0.1)
    assert windows(quiet) == 2
    # A clock that goes back before the window's start (the next simulated run) ends the window.
    rerun = _timed(_synthetic(rng, 10), 1.0, 0.1) + _timed(_synthetic(rng, 10), 0.0, 0.1)
    assert windows(rerun) == 2


def test_aset_reward_counts_rejections() -> None:
    # Batches larger than the run: every window's transition stays in the learner's queue.
    policy = make_learned_policy(
        "aset", seed=0, fresh=True, background=False, window_s=1.0, hyper={"batch_size": 1000}
    )
    assert isinstance(policy, AsetPolicy) and policy.learner is not None
    rng = np.random.default_rng(2)
    # Per 1 s window k: 4 decisions, all served ok, and k rejections.
    for k in range(4):
        for i, (req, cands) in enumerate(_timed(_synthetic(rng, 4 + k), k + 0.0, 0.1)):
            if i < k:
                policy.rejected(req)
            else:
                policy.observe(Feedback(req, policy.choose(req, cands), "ok", 10.0))
    # Window k's reward is known once window k + 2 opens: windows 0 and 1 here.
    rewards = [t.reward for t in policy.learner._queue]
    assert rewards == pytest.approx([4 / 4, 4 / 5])
    # Window 4 has rejections only: it counts (a reward of 0), it is not skipped as empty.
    for req, _ in _timed(_synthetic(rng, 3), 4.0, 0.1):
        policy.rejected(req)
    for req, cands in _timed(_synthetic(rng, 2), 5.0, 1.0):
        policy.choose(req, cands)
    rewards = [t.reward for t in policy.learner._queue]
    assert rewards == pytest.approx([4 / 4, 4 / 5, 4 / 6, 4 / 7, 0.0])
    assert len(policy.history) == 7
    policy.close()


def test_aset_in_the_simulator_times_windows_and_hears_rejections(models_dir: Path) -> None:
    from apdispatch.common.manifest import load_manifest
    from apdispatch.sim.arrivals import plan_arrivals
    from apdispatch.sim.engine import REJECTED, Simulation
    from apdispatch.sim.model import build_model

    root = Path(__file__).resolve().parent.parent
    scenario = load_scenario(root / "scenarios/sim/mixed-fast.toml").scaled(40.0)
    model = build_model(scenario, load_manifest(models_dir))
    policy = make_learned_policy("aset", seed=0, background=False, window_s=5.0)
    assert isinstance(policy, AsetPolicy)
    sim = Simulation(model, policy, plan_arrivals(scenario, seed=4))
    sim.finish()
    # 40 simulated seconds, windows of 5: 8 of them, however many queries came.
    assert len(policy.history) == 8
    # The last two windows are still held (their rewards wait for later windows):
    # the rejections of their 10 s reached them through the router.
    assert policy._previous is not None
    held = policy._previous.rejected + policy._window.rejected
    assert 0 < held < sim.resolved[REJECTED]
    policy.close()


def test_aset_reads_checkpoints_whose_windows_were_decisions(tmp_path: Path) -> None:
    policy = make_learned_policy("aset", seed=0, fresh=True, learn=False)
    policy.save(tmp_path / "old")
    _, meta = paths(tmp_path / "old")
    config = json.loads(meta.read_text())
    del config["window_s"]
    config["window"] = 256  # what checkpoints said before windows were timed
    meta.write_text(json.dumps(config))
    old = make_learned_policy("aset", checkpoint=tmp_path / "old", learn=False)
    assert isinstance(old, AsetPolicy) and old.algo.config.window_s == 10.0
    assert "window" not in old.config() and old.config()["window_s"] == 10.0
    # A checkpoint whose actions are not these static policies, in this order, is refused.
    config["actions"] = list(reversed(STATIC_POLICIES))
    meta.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="actions"):
        make_learned_policy("aset", checkpoint=tmp_path / "old", learn=False)


def test_margins_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    margins = Margins(GuardConfig(margin_alpha=0.5))
    for latency in (12.0, 14.0, 11.0):
        margins.observe("e/w1/v", predicted_ms=10.0, latency_ms=latency)
    margins.observe("c/w2/v", predicted_ms=10.0, latency_ms=4.0)
    state = margins.state()
    assert state["e/w1/v"]["replies"] == 3 and state["c/w2/v"]["replies"] == 1
    again = Margins(GuardConfig(margin_alpha=0.5))
    again.load(json.loads(json.dumps(state)))
    assert again.margin == margins.margin and again.state() == state
    # It goes on learning from where it was, exactly as the original does.
    for m in (margins, again):
        m.observe("e/w1/v", predicted_ms=10.0, latency_ms=20.0)
    assert again.margin == margins.margin and again.replies("e/w1/v") == 4

    # In a policy's checkpoint, restored when it loads.
    policy = _fresh()
    for req, cands in _synthetic(np.random.default_rng(5), 60):
        chosen = policy.choose(req, cands)
        policy.observe(Feedback(req, chosen, "ok", chosen.predicted_ms + 3.0))
    keys = set(policy.margins.margin)
    assert keys == {f"c{k}/c{k}/v" for k in range(4)}
    policy.save(tmp_path / "ck")
    saved = json.loads(paths(tmp_path / "ck")[1].read_text())["margins"]
    assert set(saved) == keys and sum(s["replies"] for s in saved.values()) == 60
    resumed = make_learned_policy("actor-critic", checkpoint=tmp_path / "ck", learn=False)
    assert isinstance(resumed, ActorCriticPolicy)
    assert resumed.margins.margin == pytest.approx(policy.margins.margin)
    assert resumed.margins.state() == saved
    # Every decision uses them: the same masks as the policy that learned them.
    assert min(resumed.margins.margin.values()) > 0
    for req, cands in _synthetic(np.random.default_rng(6), 50):
        mask_before = _screened(req, cands, policy.margins.margin)
        assert _screened(req, cands, resumed.margins.margin) == mask_before
    # A checkpoint from before margins were saved has none; a broken entry is refused.
    assert make_learned_policy("learned", learn=False).margins.margin == {}  # type: ignore[attr-defined]
    meta = paths(tmp_path / "ck")[1]
    config = json.loads(meta.read_text())
    config["margins"]["c0/c0/v"] = {"mean_ms": 1.0}
    meta.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mean_sq_ms2"):
        make_learned_policy("actor-critic", checkpoint=tmp_path / "ck", learn=False)


def test_registry_and_config() -> None:
    assert LEARNED_POLICIES == ("aset", "actor-critic", "learned")
    assert len(STATIC_POLICIES) == 7
    policy = make_policy("learned", seed=1, background=False)
    assert policy.name == "learned"
    assert policy.choose(REQUEST, [A]) is A
    with pytest.raises(KeyError, match="learned"):
        make_policy("nope")
    with pytest.raises(ConfigError, match="checkpoint_interval_s"):
        load_config(None, checkpoint_interval_s=0)


# -- resume in a real AP ------------------------------------------------------------------


def test_ap_checkpoints_on_shutdown_and_resumes(models_dir: Path, tmp_path: Path) -> None:
    from apdispatch import Client
    from apdispatch.client import StreamRequest
    from apdispatch.tools.processes import Children, free_port, wait_for_workers

    # Start from the shipped checkpoint, with small batches so that a few
    # hundred requests make updates.
    ck = tmp_path / "ck"
    weights, meta = paths(ck)
    shutil.copy(paths(SHIPPED)[0], weights)
    config = json.loads(paths(SHIPPED)[1].read_text())
    config["hyper"].update(batch_size=64, minibatch_size=64, critic_warmup=0, max_learn_per_s=0)
    meta.write_text(json.dumps(config))
    updates_before = config["updates"]
    before = torch.load(weights, weights_only=True)

    ap = f"127.0.0.1:{free_port()}"
    children = Children(tmp_path / "logs")
    x = np.load(models_dir / "samples" / "digits.npz")["x"][:1]
    try:
        ap_child = children.start(
            "ap",
            [
                "serve",
                "--listen",
                ap,
                "--policy",
                "learned",
                "--checkpoint",
                str(ck),
                "--log-format",
                "console",
            ],
        )
        worker = children.start(
            "w1",
            [
                "worker",
                "edge",
                "--listen",
                f"127.0.0.1:{free_port()}",
                "--models",
                str(models_dir),
                "--variants",
                "digits-tiny,digits-small",
                "--ap",
                ap,
                "--worker-id",
                "w1",
                "--slots",
                "2",
            ],
        )
        wait_for_workers(ap, ap_child, {"w1": worker}, timeout_s=LEARNER_WAIT_S)
        with Client(ap) as client:
            # Two candidates per request (both variants reach 0.5): the policy decides.
            # A deadline no loaded machine misses: every request is served and fed back.
            requests = [
                StreamRequest("digits", x, deadline_ms=30_000.0, min_accuracy=0.5) for _ in range(400)
            ]
            outcomes = [r.outcome for r in client.stream(requests)]
        assert outcomes.count("ok") == 400
        # The shutdown's checkpoint learns what the learner has not yet (it may
        # still be importing torch): however long that takes, no SIGKILL.
        assert children.stop(ap_child, timeout_s=LEARNER_WAIT_S) == 0
    finally:
        children.close()
    saved = json.loads(meta.read_text())
    after = torch.load(weights, weights_only=True)
    assert saved["updates"] > updates_before
    assert any(not torch.equal(before[k], after[k]) for k in before)
    resumed = make_learned_policy("learned", checkpoint=ck, learn=False)
    assert isinstance(resumed, ActorCriticPolicy)
    assert resumed.algo.updates == saved["updates"]
    # The safety margins of w1's targets, learned in the AP's process (the
    # learner process writes the file), are saved: one per target used, from
    # every one of the 400 replies.
    margins = saved["margins"]
    targets = {"w1/digits-tiny", "w1/digits-small"}
    assert margins and all(k.split("/", 1)[1] in targets and k.count("/") == 2 for k in margins)
    assert sum(m["replies"] for m in margins.values()) == 400
    # ... and a restarted AP's policy starts from them.
    assert resumed.margins.state() == margins
    assert all(resumed.margins.replies(k) > 0 and k in resumed.margins.margin for k in margins)


def test_train_writes_a_checkpoint_that_loads(models_dir: Path, tmp_path: Path) -> None:
    from apdispatch.cli import main

    out = tmp_path / "trained"
    scenario = Path(__file__).parent.parent / "scenarios" / "small-edge-cloud.toml"
    argv = ["train", str(scenario), "--out", str(out), "--episodes", "1", "--duration", "6"]
    assert main([*argv, "--models", str(models_dir), "--seed", "3"]) == 0
    _, config = load_checkpoint(out)
    assert config["kind"] == "actor-critic" and config["seed"] == 3 and config["teacher"] == "slack"
    assert config["imitation_samples"] > 0 and len(config["history"]) == 1
    assert config["command"] == (
        f"apdispatch train {scenario} --out {out} --policy learned --teacher slack --episodes 1 "
        "--seed 3 --duration 6"
    )
    policy = make_policy("learned", checkpoint=out, learn=False)
    assert policy.choose(REQUEST, [A, B, C]) in (A, B)


def test_sim_resumes_from_and_writes_its_checkpoint(models_dir: Path, tmp_path: Path) -> None:
    from apdispatch.cli import main

    ck = tmp_path / "sim-ck"
    scenario = Path(__file__).parent.parent / "scenarios" / "small-edge-cloud.toml"
    argv = ["sim", str(scenario), "--policies", "learned,fastest", "--checkpoint", str(ck)]
    argv += ["--duration", "60", "--no-bound", "--models", str(models_dir)]
    shipped = load_checkpoint(SHIPPED)[1]
    assert main(argv) == 0  # no checkpoint yet: starts from the shipped one and creates it
    first = json.loads(paths(ck)[1].read_text())
    assert first["kind"] == "actor-critic" and first["samples"] > shipped["samples"]
    assert main(argv) == 0  # resumes from it
    second = json.loads(paths(ck)[1].read_text())
    assert second["samples"] > first["samples"] and second["command"] == shipped["command"]


def test_a_checkpoint_of_other_features_is_refused(tmp_path: Path) -> None:
    ck = tmp_path / "old"
    weights, meta = paths(ck)
    shutil.copy(paths(SHIPPED)[0], weights)
    config = json.loads(paths(SHIPPED)[1].read_text())
    config["features"] = [*config["features"][:-1], "risk", "bias"]
    meta.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="features"):
        make_learned_policy("learned", checkpoint=ck, learn=False)
