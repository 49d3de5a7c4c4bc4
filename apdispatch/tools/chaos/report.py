"""The accounting of a chaos run: every query sent, and its outcome, by fault window.

The run is cut into windows by send time: ``before`` (until the first fault),
then one window per fault, from its injection to the next fault's (the last to
the end). A query belongs to the window it was sent in, whenever its outcome
comes; the windows' counts therefore add up to the run's.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from apdispatch.common.outcomes import OUTCOMES
from apdispatch.sim.results import text_table
from apdispatch.tools.chaos.faults import Fault

_INDEX: dict[str, int] = {name: i for i, name in enumerate(OUTCOMES)}


@dataclass
class FaultRecord:
    """What became of one planned fault; times in seconds after the load started."""

    fault: Fault
    injected_s: float | None = None  # None: the load ended before its turn
    down_s: float | None = None  # the process had exited (or was frozen)
    resumed_s: float | None = None  # the new process started, or SIGCONT
    recovered_s: float | None = None  # the replacement answers (AP: every worker registered)
    exit_code: int | None = None  # of the process it stopped
    error: str | None = None  # a recovery that did not complete

    def to_dict(self) -> dict[str, Any]:
        f = self.fault
        return {
            "index": f.index,
            "kind": f.kind,
            "target": f.target,
            "planned_s": f.at_s,
            "hold_s": f.hold_s,
            "injected_s": _round(self.injected_s),
            "down_s": _round(self.down_s),
            "resumed_s": _round(self.resumed_s),
            "recovered_s": _round(self.recovered_s),
            "recovery_s": _round(
                None
                if self.recovered_s is None or self.injected_s is None
                else self.recovered_s - self.injected_s
            ),
            "exit_code": self.exit_code,
            "error": self.error,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass
class Window:
    label: str
    start: float  # event loop time; -inf for the first window
    fault: int | None = None  # index of the fault that opened it
    sent: int = 0
    counts: list[int] = field(default_factory=lambda: [0] * len(OUTCOMES))
    lost: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts)


class Accounting:
    """The load generator's observer (:class:`apdispatch.tools.loadgen.Observer`): counts
    sends and outcomes into the window each query was sent in."""

    def __init__(self) -> None:
        self.windows = [Window("before faults", -math.inf)]
        self._starts = [-math.inf]

    def open_window(self, now: float, fault: Fault) -> None:
        """A fault is injected at loop time ``now``: later sends belong to its window."""
        self.windows.append(Window(fault.describe(), now, fault.index))
        self._starts.append(now)

    def _window(self, sent_at: float) -> Window:
        return self.windows[bisect.bisect_right(self._starts, sent_at) - 1]

    def sent(self, sent_at: float) -> None:
        self._window(sent_at).sent += 1

    def outcome(self, sent_at: float, outcome: str, lost: bool) -> None:
        w = self._window(sent_at)
        w.counts[_INDEX[outcome]] += 1
        w.lost += lost

    @property
    def sent_total(self) -> int:
        return sum(w.sent for w in self.windows)

    @property
    def lost_total(self) -> int:
        return sum(w.lost for w in self.windows)

    def counts_total(self) -> dict[str, int]:
        return {name: sum(w.counts[i] for w in self.windows) for i, name in enumerate(OUTCOMES)}

    def window_rows(self, origin: float, end_s: float) -> list[dict[str, Any]]:
        """One dict per window; ``origin`` is the loop time the load started at."""
        rows = []
        for i, w in enumerate(self.windows):
            start_s = 0.0 if w.start == -math.inf else w.start - origin
            stop_s = end_s if i + 1 == len(self.windows) else self.windows[i + 1].start - origin
            row: dict[str, Any] = {
                "window": w.label,
                "fault": w.fault,
                "from_s": round(start_s, 3),
                "to_s": round(max(start_s, stop_s), 3),
                "sent": w.sent,
                "total": w.total,
            }
            row.update({name: w.counts[k] for k, name in enumerate(OUTCOMES)})
            row["lost"] = w.lost
            rows.append(row)
        return rows


def checks(doc: dict[str, Any]) -> dict[str, bool]:
    """The accounting checks of a finished run's document; the run passes when all hold."""
    totals = doc["totals"]
    load = doc["load"]
    windows = doc["windows"]
    return {
        # Every query sent got exactly one outcome ...
        "sent_equals_outcomes": totals["sent"] == sum(totals[o] for o in OUTCOMES),
        # ... in every window, too ...
        "windows_add_up": all(w["sent"] == w["total"] for w in windows),
        # ... and the load generator's own tally agrees with the windows'.
        "load_report_agrees": load["sent"] == totals["sent"]
        and all(load[o] == totals[o] for o in OUTCOMES)
        and load.get("lost", 0) == totals["lost"],
        "no_request_lost": totals["lost"] == 0,
    }


def format_report(doc: dict[str, Any]) -> str:
    """The faults and the per-window table, then the totals and the checks."""
    lines = []
    header = ["#", "fault", "planned s", "injected s", "recovery s", "exit", "note"]
    body = []
    for f in doc["faults"]:
        body.append(
            [
                str(f["index"]),
                f"{f['kind']} {f['target']}",
                f"{f['planned_s']:.1f}",
                _fmt(f["injected_s"]),
                _fmt(f["recovery_s"]),
                "-" if f["exit_code"] is None else str(f["exit_code"]),
                f["error"] or ("not injected: the load had ended" if f["injected_s"] is None else ""),
            ]
        )
    lines += text_table(header, body)
    lines.append("")
    header = ["window", "from s", "to s", "sent", *OUTCOMES, "lost", "ok %"]
    rows: Sequence[dict[str, Any]] = [*doc["windows"], {"window": "all", **doc["totals"]}]
    body = []
    for r in rows:
        sent = r["sent"]
        body.append(
            [
                r["window"],
                _fmt(r.get("from_s")),
                _fmt(r.get("to_s")),
                str(sent),
                *(str(r[o]) for o in OUTCOMES),
                str(r["lost"]),
                f"{100.0 * r['ok'] / sent:.1f}" if sent else "-",
            ]
        )
    lines += text_table(header, body)
    errors = sorted(doc["load"].get("errors", {}).items(), key=lambda kv: -kv[1])
    if errors:
        lines.append("most frequent errors:")
        lines += [f"  {n:>7}  {message}" for message, n in errors[:5]]
    lines.append("")
    for name, ok in doc["checks"].items():
        lines.append(f"{'PASS' if ok else 'FAIL'} {name.replace('_', ' ')}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
