"""What a load run measured: per-outcome tallies kept as replies come in, and the report.

:class:`Tally` counts every query sent and its one outcome (by app and by
second of the run), latencies, who served and how accurately; :func:`build_report`
turns a finished run's tally into a :class:`LoadReport`, whose ``to_dict()`` is
``apdispatch load --json``'s document and ``summary()`` its table.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, NamedTuple, Protocol

import numpy as np

from apdispatch.client import Result
from apdispatch.common.binomial import lower_bound
from apdispatch.common.outcomes import OUTCOMES, SERVED
from apdispatch.scenario import Scenario
from apdispatch.scenario.plan import LoadPlan

_OUTCOME_INDEX: Final[Mapping[str, int]] = MappingProxyType({name: i for i, name in enumerate(OUTCOMES)})
_FAILED: Final = _OUTCOME_INDEX["failed"]
_REJECTED: Final = _OUTCOME_INDEX["rejected"]
# Distinct error messages kept in the report; the rest are counted as "other".
_MAX_ERROR_KINDS: Final = 50
_NUMBER: Final = re.compile(r"\d+(?:\.\d+)?")


def _percentiles(values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    a = np.asarray(values_s) * 1000.0
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "max": round(float(a.max()), 3),
    }


def _counts_block(sent: int, counts: list[int], latencies_s: list[float]) -> dict[str, Any]:
    total = sum(counts)
    block: dict[str, Any] = {"sent": sent, "total": total}
    block.update({name: counts[i] for i, name in enumerate(OUTCOMES)})

    def ratio(k: int) -> float:
        return round(k / total, 6) if total else 0.0

    block["success_ratio"] = ratio(counts[0])
    block["violation_ratio"] = ratio(counts[1] + counts[2])
    block["rejection_ratio"] = ratio(counts[3])
    block["failure_ratio"] = ratio(counts[4])
    block["latency_ms"] = _percentiles(latencies_s)
    return block


def _measured(right: int, n: int) -> dict[str, Any]:
    """Top-1 accuracy of ``n`` answers checked against their labels, and its 95 % lower bound."""
    if n == 0:
        return {"n": 0, "top1": None, "lower95": None}
    return {"n": n, "top1": round(right / n, 6), "lower95": round(lower_bound(right, n), 6)}


def _compute_stats(values_ms: list[float]) -> dict[str, float]:
    a = np.asarray(values_ms)
    p50, p90 = np.percentile(a, [50, 90])
    return {
        "n": len(values_ms),
        "mean": round(float(a.mean()), 4),
        "p50": round(float(p50), 4),
        "p90": round(float(p90), 4),
    }


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a run measured; ``to_dict()`` is the ``--json`` document."""

    scenario: str
    ap: str
    duration_s: float
    seed: int
    query_process: str
    grace_s: float
    streams: int
    sent: int
    counts: dict[str, int]
    latency_ms: dict[str, float | None]
    reject_latency_ms: dict[str, float | None]
    send_lag_ms: dict[str, float | None]
    per_app: dict[str, dict[str, Any]]
    timeline: list[dict[str, int]]
    served_by: dict[str, int]
    observed_accuracy: dict[str, dict[str, float]]
    errors: dict[str, int]
    unmatched_replies: int
    wall_s: float
    # Sent and never answered at all, after the deadline and grace (counted as
    # ``failed`` too); a client-side error such as a broken stream is an answer.
    lost: int = 0
    stopped_at_s: float | None = None  # when sending was stopped early (Ctrl-C), else None
    # What the workers reported holding a slot for, per target (n, mean, p50,
    # p90 over served replies): the live service times a simulator calibration
    # is fitted to (apdispatch.tools.fidelity).
    compute_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    # Per variant, the answers checked against their labels: n, top1, lower95 and
    # the manifest's held-out accuracy.
    variant_accuracy: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def counts_add_up(self) -> bool:
        return self.total == self.sent

    def ratio(self, outcome: str) -> float:
        return self.counts[outcome] / self.total if self.total else 0.0

    @property
    def success_ratio(self) -> float:
        return self.ratio("ok")

    @property
    def violation_ratio(self) -> float:
        return self.ratio("late") + self.ratio("inaccurate")

    @property
    def rejection_ratio(self) -> float:
        return self.ratio("rejected")

    def to_dict(self) -> dict[str, Any]:
        total = self.total
        return {
            "scenario": self.scenario,
            "ap": self.ap,
            "duration_s": self.duration_s,
            "seed": self.seed,
            "query_process": self.query_process,
            "streams": self.streams,
            "sent": self.sent,
            "total": total,
            **self.counts,
            "counts_add_up": self.counts_add_up,
            "success_ratio": round(self.success_ratio, 6),
            "violation_ratio": round(self.violation_ratio, 6),
            "rejection_ratio": round(self.rejection_ratio, 6),
            "failure_ratio": round(self.ratio("failed"), 6),
            "latency_ms": self.latency_ms,
            "reject_latency_ms": self.reject_latency_ms,
            "send_lag_ms": self.send_lag_ms,
            "per_app": self.per_app,
            "timeline": self.timeline,
            "served_by": self.served_by,
            "observed_accuracy": self.observed_accuracy,
            "variant_accuracy": self.variant_accuracy,
            "compute_ms": self.compute_ms,
            "errors": self.errors,
            "unmatched_replies": self.unmatched_replies,
            "lost": self.lost,
            "grace_s": self.grace_s,
            "wall_s": round(self.wall_s, 3),
            "stopped_at_s": None if self.stopped_at_s is None else round(self.stopped_at_s, 3),
        }

    def summary(self) -> str:
        """A plain-text table for people."""
        lines = [
            f"scenario {self.scenario} against {self.ap}: {self.duration_s:g} s, seed {self.seed}, "
            f"{self.streams} streams ({self.query_process} queries), {self.sent} queries sent",
            f"{'app':<20} {'sent':>8} {'ok':>7} {'late':>7} {'inacc':>7} {'rej':>7} "
            f"{'failed':>7} {'p50 ms':>8} {'p99 ms':>8} {'acc %':>7} {'floor %':>7}",
        ]

        def row(name: str, block: Mapping[str, Any]) -> str:
            total = block["total"]

            def pct(k: str) -> str:
                return f"{100.0 * block[k] / total:6.1f}%" if total else "      -"

            lat = block["latency_ms"]
            p50 = "-" if lat["p50"] is None else f"{lat['p50']:.1f}"
            p99 = "-" if lat["p99"] is None else f"{lat['p99']:.1f}"
            # Measured from the labels of the answers received, beside the app's floor.
            acc = block.get("accuracy", {})
            top1 = "-" if acc.get("top1") is None else f"{100.0 * acc['top1']:.1f}"
            floor = "-" if acc.get("min_accuracy") is None else f"{100.0 * acc['min_accuracy']:.1f}"
            return (
                f"{name:<20} {total:>8} {pct('ok')} {pct('late')} {pct('inaccurate')} "
                f"{pct('rejected')} {pct('failed')} {p50:>8} {p99:>8} {top1:>7} {floor:>7}"
            )

        for name, block in self.per_app.items():
            lines.append(row(name, block))
        everything = _counts_block(self.sent, [self.counts[o] for o in OUTCOMES], [])
        everything["latency_ms"] = self.latency_ms
        lines.append(row("all", everything))
        lag = self.send_lag_ms
        if lag["p50"] is not None:
            lines.append(
                f"send lag (load generator behind schedule): p50 {lag['p50']:.2f} ms, "
                f"p99 {lag['p99']:.2f} ms, max {lag['max']:.2f} ms"
            )
        if self.served_by:
            top = sorted(self.served_by.items(), key=lambda kv: -kv[1])
            lines.append("served by: " + ", ".join(f"{k} {v}" for k, v in top))
        if self.variant_accuracy:
            lines.append(
                "accuracy by variant, measured (manifest): "
                + ", ".join(
                    f"{name} {100.0 * v['top1']:.1f} %"
                    + ("" if v.get("manifest") is None else f" ({100.0 * v['manifest']:.1f} %)")
                    + f" of {v['n']}"
                    for name, v in self.variant_accuracy.items()
                )
            )
        if self.errors:
            top = sorted(self.errors.items(), key=lambda kv: -kv[1])[:5]
            lines.append("errors: " + "; ".join(f"{v}x {k}" for k, v in top))
        if self.stopped_at_s is not None:
            lines.append(
                f"stopped early: sending ended at {self.stopped_at_s:.1f} s of {self.duration_s:g} s"
            )
        if self.lost:
            lines.append(f"lost (no reply at all by deadline + grace): {self.lost}")
        if not self.counts_add_up:
            lines.append(f"ERROR: outcomes add up to {self.total}, not to {self.sent} sent")
        return "\n".join(lines)


class Pending(NamedTuple):
    sent_at: float  # loop time (monotonic) when handed to gRPC
    app: int
    bucket: int
    label: int  # expected class, -1 when unknown


class Observer(Protocol):
    """Sees every query sent and its outcome as they happen (``apdispatch chaos`` bins them
    by fault window); ``sent_at`` is the event loop's time of the send."""

    def sent(self, sent_at: float) -> None: ...

    def outcome(self, sent_at: float, outcome: str, lost: bool) -> None: ...


class Tally:
    """Outcome counters, updated as replies come in."""

    def __init__(self, n_apps: int, n_buckets: int, observer: Observer | None = None) -> None:
        self.observer = observer
        self.lost = 0
        self.sent = 0
        self.sent_per_app = [0] * n_apps
        self.done = 0
        self.ok = 0
        self.counts = [[0] * len(OUTCOMES) for _ in range(n_apps)]
        # per bucket: sent, then one count per outcome
        self.buckets = [[0] * (1 + len(OUTCOMES)) for _ in range(n_buckets)]
        self.latency: list[list[float]] = [[] for _ in range(n_apps)]
        self.reject_latency: list[float] = []
        self.served_by: Counter[str] = Counter()
        self.compute: dict[str, list[float]] = {}
        # Answers checked against their sample's label: by target key, and by app.
        self.judged: Counter[str] = Counter()
        self.correct: Counter[str] = Counter()
        self.judged_per_app = [0] * n_apps
        self.correct_per_app = [0] * n_apps
        self.errors: Counter[str] = Counter()
        self.unmatched = 0
        self.send_lag: list[float] = []

    def on_sent(self, p: Pending) -> None:
        self.sent += 1
        self.sent_per_app[p.app] += 1
        self.buckets[p.bucket][0] += 1
        if self.observer is not None:
            self.observer.sent(p.sent_at)

    def _count(self, p: Pending, outcome: int, lost: bool = False) -> None:
        self.done += 1
        self.counts[p.app][outcome] += 1
        self.buckets[p.bucket][1 + outcome] += 1
        if self.observer is not None:
            self.observer.outcome(p.sent_at, OUTCOMES[outcome], lost)

    def on_result(self, p: Pending, result: Result, now: float) -> None:
        outcome = _OUTCOME_INDEX[result.outcome]
        self._count(p, outcome)
        if outcome == 0:
            self.ok += 1
        if result.outcome in SERVED:
            self.latency[p.app].append(now - p.sent_at)
            if result.served_by is not None:
                key = result.served_by.key
                self.served_by[key] += 1
                # A reply the AP cut off at the deadline carries no worker timings.
                if result.timings.compute_ms > 0.0:
                    self.compute.setdefault(key, []).append(result.timings.compute_ms)
                if p.label >= 0 and len(result.outputs) == 1:
                    out = result.output
                    if out.size > 1:
                        right = int(np.argmax(out)) == p.label
                        self.judged[key] += 1
                        self.correct[key] += right
                        self.judged_per_app[p.app] += 1
                        self.correct_per_app[p.app] += right
        else:
            if outcome == _REJECTED:
                self.reject_latency.append(now - p.sent_at)
            self._error(f"{result.outcome}: {result.error or '(no message)'}")

    def on_failed(self, p: Pending, error: str, lost: bool = False) -> None:
        """``lost``: no reply came at all (as opposed to an error the client was told of)."""
        self.lost += lost
        self._count(p, _FAILED, lost)
        self._error(f"failed: {error}")

    def _error(self, message: str) -> None:
        # Numbers (times, counts) out of the key: one kind per reason, not per request.
        message = _NUMBER.sub("N", message[:200])
        if message in self.errors or len(self.errors) < _MAX_ERROR_KINDS:
            self.errors[message] += 1
        else:
            self.errors["other"] += 1


def build_report(
    tally: Tally,
    plan: LoadPlan,
    scenario: Scenario,
    *,
    ap: str,
    seed: int,
    grace_s: float,
    streams: int,
    wall_s: float,
    stopped_at_s: float | None,
    manifest_accuracy: Mapping[str, float] | None = None,
) -> LoadReport:
    """The report of a finished run: ``streams`` started, sending stopped at ``stopped_at_s`` (or not).

    ``manifest_accuracy``: variant -> the held-out accuracy its manifest states, reported
    beside what the run measured.
    """
    manifest_accuracy = manifest_accuracy or {}
    totals = [sum(c[i] for c in tally.counts) for i in range(len(OUTCOMES))]
    all_latency = [v for lat in tally.latency for v in lat]
    per_app: dict[str, dict[str, Any]] = {}
    for i, app in enumerate(scenario.apps):
        block = _counts_block(tally.sent_per_app[i], tally.counts[i], tally.latency[i])
        per_app[app.name] = block
    timeline = []
    active = plan.active_per_second()
    for b, row in enumerate(tally.buckets):
        entry = {"t_s": b, "sent": row[0]}
        entry.update({name: row[1 + i] for i, name in enumerate(OUTCOMES)})
        entry["streams"] = active[b]  # alive at some time in this second
        timeline.append(entry)
    accuracy = {
        key: {"n": n, "top1": round(tally.correct[key] / n, 6)} for key, n in sorted(tally.judged.items())
    }
    for i, app in enumerate(scenario.apps):
        per_app[app.name]["accuracy"] = {
            **_measured(tally.correct_per_app[i], tally.judged_per_app[i]),
            "min_accuracy": app.min_accuracy,
        }
    by_variant: dict[str, list[int]] = {}
    for key, n in tally.judged.items():
        counts = by_variant.setdefault(key.rsplit("/", 1)[-1], [0, 0])
        counts[0] += tally.correct[key]
        counts[1] += n
    variants = {
        name: {**_measured(right, n), "manifest": manifest_accuracy.get(name)}
        for name, (right, n) in sorted(by_variant.items())
    }
    return LoadReport(
        scenario=scenario.name,
        ap=ap,
        duration_s=scenario.duration_s,
        seed=seed,
        query_process=plan.query_process,
        grace_s=grace_s,
        streams=streams,
        sent=tally.sent,
        counts={name: totals[i] for i, name in enumerate(OUTCOMES)},
        latency_ms=_percentiles(all_latency),
        reject_latency_ms=_percentiles(tally.reject_latency),
        send_lag_ms=_percentiles(tally.send_lag),
        per_app=per_app,
        timeline=timeline,
        served_by=dict(sorted(tally.served_by.items())),
        observed_accuracy=accuracy,
        variant_accuracy=variants,
        compute_ms={key: _compute_stats(v) for key, v in sorted(tally.compute.items())},
        errors=dict(tally.errors.most_common()),
        unmatched_replies=tally.unmatched,
        wall_s=wall_s,
        lost=tally.lost,
        stopped_at_s=stopped_at_s,
    )
