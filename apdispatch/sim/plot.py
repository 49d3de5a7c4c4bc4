"""Timelines of a simulated run, as ASET's figures show them.

Four panels sharing the time axis: the offered load (queries/s per window),
then, per policy, the share of each window's queries that succeeded, that
were served with a QoS violation (late or inaccurate) and that were
rejected. Queries count in the window they arrived in. Matplotlib's Agg
backend: no display needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from apdispatch.sim.engine import INACCURATE, LATE, OK, REJECTED
from apdispatch.sim.results import SimReport


def _shares(timeline: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    totals = timeline.sum(axis=1).astype(np.float64)
    safe = np.where(totals > 0, totals, np.nan)
    return (
        100.0 * timeline[:, OK] / safe,
        100.0 * (timeline[:, LATE] + timeline[:, INACCURATE]) / safe,
        100.0 * timeline[:, REJECTED] / safe,
    )


def plot_report(report: SimReport, path: Path | str) -> Path:
    """Draw ``report``'s timelines into a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    window_s = report.window_s
    windows = report.arrivals_per_window.shape[0]
    t = (np.arange(windows) + 0.5) * window_s
    # The last window may be shorter than the others.
    widths = np.minimum(window_s, report.duration_s - np.arange(windows) * window_s)
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True, constrained_layout=True)
    load, success, violations, rejections = axes
    for a, app in enumerate(report.app_names):
        load.plot(t, report.arrivals_per_window[:, a] / widths, label=app, linewidth=1.2)
    load.plot(t, report.arrivals_per_window.sum(axis=1) / widths, label="all", color="black", linewidth=1.8)
    load.set_ylabel("offered queries/s")
    load.legend(loc="upper left", fontsize="small", ncol=2)
    for name, result in report.results.items():
        ok, bad, rejected = _shares(result.timeline())
        success.plot(t, ok, label=name, linewidth=1.4)
        violations.plot(t, bad, label=name, linewidth=1.4)
        rejections.plot(t, rejected, label=name, linewidth=1.4)
    if report.upper_bound is not None:
        success.axhline(
            100.0 * report.upper_bound, color="black", linestyle="--", linewidth=1, label="bound, whole run"
        )
    success.set_ylabel("success %")
    violations.set_ylabel("QoS violations %")
    rejections.set_ylabel("rejected %")
    for ax in (success, violations, rejections):
        ax.set_ylim(-2, 102)
    success.legend(loc="lower left", fontsize="small", ncol=2)
    for ax in axes:
        ax.grid(alpha=0.3)
    rejections.set_xlabel(f"time (s), windows of {window_s:g} s")
    fig.suptitle(f"{report.scenario} (seed {report.seed})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
