"""``apdispatch bench --decisions``: what one routing decision costs, learned vs fastest.

Candidate sets of 4, 8 and 16 targets, and of 4 to 16 drawn per decision,
with realistic values (round trips of 1-60 ms, predictions of 2-120 ms,
deadlines of 25-250 ms, queues of 0-8 on 1-4 slots), drawn once from a
seeded generator and replayed identically to every policy. Each decision is
timed alone (``perf_counter_ns`` around ``choose``), and so is the
``observe`` of its feedback, which the AP also calls on its event loop. The
learned policy runs as in the AP: its background learner trains on the
feedback while the decisions are timed, at the pace of a busy AP (2,000
decisions/s, ``--rate``; 0 for back to back). The AP's learner takes at most
``max_learn_per_s`` samples a second, so a batch takes it many seconds to
fill: the timing goes on, a pass over the sets at a time, until
``MIN_UPDATES`` updates have been published while decisions were timed (or
``MAX_WAIT_S`` has passed, which the report shows as fewer updates).

A decision of the learned policy takes one of two paths: the masks alone
(one candidate left open, or every app meets its SLA or presses too little
to need room: the soonest open candidate), or the masks and the network's
scores. The second is the dearer, and its share depends on the load, so it
is also reported alone (``network``: its share of the decisions, and its
percentiles).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from apdispatch.common.outcomes import Outcome
from apdispatch.learned import NATIVE
from apdispatch.policies import Candidate, Feedback, Policy, RequestView, make_policy, resolve_policies
from apdispatch.tools.bench import percentiles

# Decisions per second: the AP's measured capacity (README, Benchmark). The
# learner's work per decision is fixed, so an unpaced loop (tens of thousands
# per second) would have it train many times more, alongside, than in an AP.
RATE = 2000.0
SIZES: tuple[int | str, ...] = (4, 8, 16, "4-16")  # "4-16": sizes drawn uniformly per decision
# Learner updates published while decisions are timed, at the least: a
# window without one would time the decisions beside an idle learner.
MIN_UPDATES = 1
MAX_WAIT_S = 120.0
FEEDBACK_MIX = (
    Outcome.OK,
    Outcome.OK,
    Outcome.OK,
    Outcome.LATE,
)  # feedback mix: the learner gets something to learn


def parse_sizes(text: str) -> tuple[int | str, ...]:
    """``--sizes``: a comma list of N (N candidates) and A-B (drawn per decision, A to B), all >= 1."""
    sizes: list[int | str] = []
    for raw in text.split(","):
        item = raw.strip()
        low, dash, high = item.partition("-")
        if not (low.isdigit() and (high.isdigit() if dash else True)):
            raise ValueError(f"--sizes: {item!r} is neither N nor A-B (numbers of candidates)")
        if int(low) < 1 or (dash and int(high) < int(low)):
            raise ValueError(f"--sizes: {item!r}: sizes are >= 1, and A <= B in A-B")
        sizes.append(f"{int(low)}-{int(high)}" if dash else int(low))
    return tuple(sizes)


def candidate_sets(n: int | str, count: int, seed: int) -> list[tuple[RequestView, list[Candidate]]]:
    """``count`` requests with ``n`` candidates each, or with A to B drawn per request for ``n`` = "A-B"."""
    rng = np.random.default_rng(seed)
    low, _, high = str(n).partition("-")
    out = []
    for i in range(count):
        size = int(rng.integers(int(low), int(high) + 1)) if high else int(low)
        deadline = float(rng.choice([25.0, 60.0, 100.0, 250.0]))
        floor = float(rng.choice([0.75, 0.88, 0.94]))
        request = RequestView("digits", f"app-{i % 4}", deadline, floor)
        cands = []
        for k in range(size):
            rtt = float(rng.uniform(1.0, 60.0))
            slots = int(rng.integers(1, 5))
            in_flight = int(rng.integers(0, 9))
            cands.append(
                Candidate(
                    key=f"c{k}/w{k}/v",
                    worker=f"w{k}",
                    cluster=f"c{k % 4}",
                    variant="v",
                    accuracy=float(rng.uniform(floor, 0.99)),
                    rtt_ms=rtt,
                    in_flight=in_flight,
                    slots=slots,
                    predicted_ms=rtt + float(rng.uniform(1.0, 60.0)) * (1 + in_flight / slots),
                )
            )
        # Admission has passed: the fastest candidate is predicted in time.
        fastest = min(c.predicted_ms for c in cands)
        if fastest > deadline:
            request = RequestView("digits", request.app, fastest * float(rng.uniform(1.05, 3.0)), floor)
        out.append((request, cands))
    return out


def measure(
    policy: Policy,
    sets: list[tuple[RequestView, list[Candidate]]],
    repeats: int,
    rate: float = 0.0,
    more: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Time ``choose`` and ``observe`` per decision; ``rate`` > 0 paces decisions (per second).

    After ``repeats`` passes over ``sets``, further passes while ``more()`` says so.
    """
    choose_ns: list[int] = []
    observe_ns: list[int] = []
    scored_ns: list[int] = []  # the decisions the network scored (``ActorCriticPolicy.scored``)
    tells_path = hasattr(policy, "scored")
    clock = time.perf_counter_ns
    gap = int(1e9 / rate) if rate > 0 else 0
    due = clock()
    # A fresh RequestView per decision, as the AP makes one per request.
    r = -1
    while True:
        r += 1
        if r >= repeats and (more is None or not more()):
            break
        for i, (req, cands) in enumerate(sets):
            if gap:
                # The AP's own work between decisions, as a busy wait: the
                # core stays as busy as a serving AP keeps it.
                due += gap
                while clock() < due:
                    pass
            # Stamped with the clock as the AP stamps its views (ASET's windows are timed).
            view = RequestView(req.task, req.app, req.deadline_ms, req.min_accuracy, time.monotonic())
            t0 = clock()
            chosen = policy.choose(view, cands)
            t1 = clock()
            feedback = Feedback(view, chosen, FEEDBACK_MIX[(i + r) % len(FEEDBACK_MIX)], chosen.predicted_ms)
            t2 = clock()
            policy.observe(feedback)
            t3 = clock()
            choose_ns.append(t1 - t0)
            observe_ns.append(t3 - t2)
            if tells_path and policy.scored > 1:  # type: ignore[attr-defined]
                scored_ns.append(t1 - t0)
    result: dict[str, Any] = {
        "decisions": len(choose_ns),
        "choose_us": _percentiles(choose_ns),
        "observe_us": _percentiles(observe_ns),
    }
    if tells_path:
        share = round(len(scored_ns) / len(choose_ns), 4)
        result["network"] = {"share": share, "choose_us": _percentiles(scored_ns)}
    return result


def _too_few_updates(learner: Any) -> Callable[[], bool]:
    """Whether ``learner`` has published fewer than ``MIN_UPDATES`` updates since now (for ``MAX_WAIT_S``)."""
    before = learner.updates
    give_up = time.monotonic() + MAX_WAIT_S
    return lambda: learner.updates - before < MIN_UPDATES and time.monotonic() < give_up


def _percentiles(ns: list[int]) -> dict[str, float]:
    if not ns:
        return {"p50": float("nan"), "p99": float("nan")}
    p50, p99 = percentiles([n / 1000.0 for n in ns])
    return {"p50": p50, "p99": p99}


def run(
    policies: list[str],
    decisions: int,
    seed: int,
    checkpoint: Path | None,
    rate: float = RATE,
    sizes: tuple[int | str, ...] = SIZES,
) -> dict[str, Any]:
    print(f"hot path: {NATIVE.reason}", flush=True)
    report: dict[str, Any] = {
        "seed": seed,
        "rate_per_s": rate,
        "hot_path": {"compiled": NATIVE.compiled, "reason": NATIVE.reason},
        "results": {},
    }
    per_set = 2000
    repeats = max(1, decisions // per_set)
    for n in sizes:
        sets = candidate_sets(n, per_set, seed + (n if isinstance(n, int) else 0))
        for name in policies:
            policy = make_policy(name, seed, checkpoint) if checkpoint else make_policy(name, seed)
            learner = getattr(policy, "learner", None)
            wait_ready = getattr(learner, "wait_ready", None)
            if callable(wait_ready):
                wait_ready()  # the learner process has imported torch and loaded the weights
            measure(policy, sets[:200], 1)  # warm-up: caches, first allocations
            gc.collect()
            before = getattr(learner, "updates", 0)
            more = None if learner is None else _too_few_updates(learner)
            result = measure(policy, sets, repeats, rate, more)
            if learner is not None:
                result["learner_updates"] = learner.updates - before  # while decisions were timed
            policy.close()
            report["results"].setdefault(name, {})[str(n)] = result
            c, o = result["choose_us"], result["observe_us"]
            net = result.get("network")
            print(
                f"{name:>8} | {n:>4} candidates | choose p50 {c['p50']:6.2f} us  p99 {c['p99']:6.2f} us | "
                f"observe p50 {o['p50']:5.2f} us  p99 {o['p99']:5.2f} us"
                + (f" | {result['learner_updates']} updates" if "learner_updates" in result else "")
                + (
                    f" | network {net['share']:.0%}: p50 {net['choose_us']['p50']:6.2f} us  "
                    f"p99 {net['choose_us']['p99']:6.2f} us"
                    if net
                    else ""
                ),
                flush=True,
            )
    return report


def main(args: argparse.Namespace) -> int:
    try:
        policies = resolve_policies(args.policies)
        sizes = parse_sizes(args.sizes)
        if not (math.isfinite(args.rate) and args.rate >= 0.0):
            raise ValueError(f"--rate: decisions per second, >= 0 (0: unpaced), got {args.rate}")
    except ValueError as exc:
        print(f"apdispatch bench: {exc}", file=sys.stderr)
        return 2
    report = run(
        policies,
        # At least 10,000 decisions per set size: p99 needs the samples.
        max(args.requests, 10_000),
        seed=0,
        checkpoint=None,
        rate=args.rate,
        sizes=sizes,
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {args.json}")
    return 0
