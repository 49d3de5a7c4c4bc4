"""The demo's figure: success ratio over time, one line per policy, on the same axes.

Drawn from the demo's report document alone (``build/demo/<ts>/report.json``),
so a finished run can be drawn again. Live lines come from each policy's load
generator timeline (queries counted in the second they were sent, grouped
into windows); with ``--fidelity`` the simulator's timeline for the same
policy is drawn dashed in the same colour. Learned policies are drawn thick
and on top: they are what the figure is for. The legend ranks the policies by
their success over the run, best first.

Matplotlib (the ``all`` extra) is imported by :func:`plot_success` only, with
the Agg backend: no display needed, and a demo without a plot never loads it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apdispatch.common.outcomes import OUTCOMES
from apdispatch.policies import LEARNED_POLICIES

TARGET_WINDOWS = 20  # about this many points per line, whatever the run's length
DPI = 100
_HIGHLIGHT = "crimson"
_LEARNED_OTHERS = ("black", "dimgray")


def window_s(duration_s: float) -> int:
    """Whole seconds per window: the live timeline counts per second."""
    return max(1, round(duration_s / TARGET_WINDOWS))


def _percent(ok: np.ndarray, total: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 100.0 * ok / np.maximum(total, 1), np.nan)


def live_series(timeline: Sequence[Mapping[str, int]], window: int) -> tuple[np.ndarray, np.ndarray]:
    """(window mid-times in s, success % per window) from a load report's per-second timeline.

    A window's denominator is its queries' outcomes, so every query sent in it
    counts once whenever its reply came; a window with none is NaN (a gap in
    the line), not 0.
    """
    if window < 1:
        raise ValueError("window must be >= 1 s")
    n = math.ceil(len(timeline) / window)
    ok = np.zeros(n)
    total = np.zeros(n)
    for entry in timeline:
        w = int(entry["t_s"]) // window
        ok[w] += entry["ok"]
        total[w] += sum(entry[k] for k in OUTCOMES)
    return (np.arange(n) + 0.5) * window, _percent(ok, total)


def sim_series(timeline: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The same from a simulated timeline of report.json's ``fidelity`` (``ok``, ``total`` per window)."""
    ok = np.asarray(timeline["ok"], dtype=np.float64)
    total = np.asarray(timeline["total"], dtype=np.float64)
    return (np.arange(len(ok)) + 0.5) * float(timeline["window_s"]), _percent(ok, total)


def offered_series(timeline: Sequence[Mapping[str, int]], window: int) -> tuple[np.ndarray, np.ndarray]:
    """(window mid-times, queries/s sent) from a load report's timeline."""
    n = math.ceil(len(timeline) / window)
    sent = np.zeros(n)
    for entry in timeline:
        sent[int(entry["t_s"]) // window] += entry["sent"]
    # The last window may hold fewer seconds than the others.
    widths = np.minimum(window, len(timeline) - np.arange(n) * window)
    return (np.arange(n) + 0.5) * window, sent / widths


def legend_order(policies: Mapping[str, Any]) -> list[str]:
    """Policy names by success % over the run, best first (ties keep the run's order)."""
    return sorted(policies, key=lambda name: -float(policies[name]["summary"]["success_pct"]))


def sim_run_to_draw(doc: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
    """The simulator run drawn beside live: the fitted one when there is one (closest to live)."""
    fidelity = doc.get("fidelity") or {}
    for label in ("fitted", "default"):
        if label in fidelity:
            return label, fidelity[label]
    return None


def plot_success(doc: Mapping[str, Any], path: Path | str) -> Path:
    """Draw the demo report ``doc`` into a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    window = window_s(float(doc["duration_s"]))
    policies: Mapping[str, Any] = doc["policies"]
    sim = sim_run_to_draw(doc)
    fig, (load_ax, ax) = plt.subplots(
        2, 1, figsize=(11, 6), sharex=True, height_ratios=(1, 3), constrained_layout=True
    )
    first = next(iter(policies.values()), None)
    if first is not None:
        t, qps = offered_series(first["report"]["timeline"], window)
        load_ax.fill_between(t, qps, step="mid", color="0.8")
        load_ax.plot(t, qps, drawstyle="steps-mid", color="0.4", linewidth=1)
    load_ax.set_ylabel("sent queries/s")
    # tab10 without its red, which marks `learned`.
    static_colors = iter(f"C{i}" for i in (0, 1, 2, 4, 5, 6, 7, 8, 9, 0, 1, 2))
    others = iter(_LEARNED_OTHERS)
    lows = [100.0]
    handles: dict[str, Any] = {}
    for name, result in policies.items():
        learned = name in LEARNED_POLICIES
        if name == "learned":
            color: Any = _HIGHLIGHT
        elif learned:
            color = next(others, "black")
        else:
            color = next(static_colors)
        t, pct = live_series(result["report"]["timeline"], window)
        label = f"{name} {result['summary']['success_pct']:.1f}%"
        sim_doc = None if sim is None else sim[1]["policies"].get(name)
        if sim_doc is not None:
            label += f" (sim {sim_doc['sim_pct']:.1f})"
        (handles[name],) = ax.plot(
            t,
            pct,
            color=color,
            label=label,
            linewidth=3.0 if learned else 1.4,
            alpha=1.0 if learned else 0.85,
            zorder=4 if learned else 2,
            marker="o" if learned else None,
            markersize=3.5,
        )
        if sim_doc is not None:
            st, spct = sim_series(sim_doc["timeline"])
            ax.plot(st, spct, color=color, linestyle="--", linewidth=1.0, alpha=0.6, zorder=1)
        lows.append(float(np.nanmin(pct)) if np.isfinite(pct).any() else 100.0)
    legend = [handles[name] for name in legend_order(policies)]
    if sim is not None:
        cal = sim[1]["calibration"]
        (dashed,) = ax.plot(
            [],
            [],
            color="0.3",
            linestyle="--",
            linewidth=1.0,
            label=f"dashed: simulator ({sim[0]}, scale {cal['scale']:.3g})",
        )
        legend.append(dashed)
    ax.set_ylim(max(0.0, min(lows) - 5.0), 101.0)
    ax.set_ylabel("success % (ok / sent)")
    ax.set_xlabel(f"time (s), windows of {window} s, by send time")
    # Outside the axes: with eight policies a legend inside hides the low lines.
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    for a in (load_ax, ax):
        a.grid(alpha=0.3)
    fig.suptitle(
        f"{doc['scenario']}: live on loopback, seed {doc['seed']}, {doc['duration_s']:g} s per policy"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
