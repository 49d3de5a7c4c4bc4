"""Open-loop load generator: a scenario's client streams against a running AP.

Client streams (cameras, say) arrive as a Poisson process whose rate follows the
scenario's piecewise-constant ``clients_per_min`` schedule. Each stream picks an
app by ``share``, lives an exponential time with mean ``stream_mean_s`` (cut at
the end of the run) and sends its app's queries over one ``InferStream`` call.

Queries within a stream are periodic by default (``rate_qps`` frames per second
with a random phase, like a camera); ``query_process="poisson"`` sends them as a
Poisson process of the same rate instead. Sending is open loop: every stream
has a writer that follows its schedule and a reader that collects replies, so a
slow AP never slows the offered load down; it shows up as latency and outcomes.

Every query sent gets exactly one outcome. After a stream's last query it waits
for outstanding replies up to its app's deadline plus a grace period; replies
still missing then count as ``failed`` with the error ``no reply``.

The whole plan (stream arrivals, apps, lifetimes, send times, inputs) is drawn
up front from one seeded ``numpy.random.Generator``: the same seed offers the
same load whatever the AP does.

The plan is :mod:`apdispatch.scenario.plan`; :mod:`.run` runs it against an AP,
:mod:`.report` tallies what came back; here are ``apdispatch load`` (:func:`main`)
and the public names.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from apdispatch.common.errors import UnavailableError
from apdispatch.scenario import ScenarioError, load_scenario
from apdispatch.scenario.plan import LoadPlan, QueryProcess, StreamPlan, plan_load, stream_starts
from apdispatch.tools.loadgen.report import LoadReport
from apdispatch.tools.loadgen.run import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_GRACE_S,
    MAX_SAMPLES,
    NO_REPLY,
    Samples,
    load_samples,
    run_load,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_GRACE_S",
    "MAX_SAMPLES",
    "NO_REPLY",
    "LoadPlan",
    "LoadReport",
    "QueryProcess",
    "Samples",
    "StreamPlan",
    "load_samples",
    "main",
    "plan_load",
    "run_load",
    "stream_starts",
]


def _stop_on_signals(stop: asyncio.Event) -> None:
    """First Ctrl-C (or SIGTERM): stop sending, wait for replies, report. Second: abort."""
    loop = asyncio.get_running_loop()

    def first(sig: signal.Signals) -> None:
        print(
            f"\napdispatch load: {sig.name}: stopping; waiting for outstanding replies (again to abort)",
            file=sys.stderr,
        )
        stop.set()
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(s)  # back to the default: the next one aborts

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, first, sig)
    except (ValueError, RuntimeError, NotImplementedError):
        pass  # not the main thread, or no signal support: no graceful stop


def main(args: argparse.Namespace) -> int:
    """``apdispatch load``: 0 when the run completed, 1 when the AP was unreachable,
    2 for bad input (scenario, samples), 3 when the outcomes do not add up."""
    try:
        scenario = load_scenario(args.scenario)
    except (OSError, ScenarioError) as exc:
        print(f"apdispatch load: {exc}", file=sys.stderr)
        return 2
    progress = not getattr(args, "no_progress", False) and sys.stderr.isatty()

    async def run() -> LoadReport:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        return await run_load(
            scenario,
            args.ap,
            Path(args.models),
            duration_s=getattr(args, "duration", None),
            seed=getattr(args, "seed", None),
            progress=progress,
            connect_timeout_s=getattr(args, "connect_timeout", DEFAULT_CONNECT_TIMEOUT_S),
            stop=stop,
        )

    try:
        report = asyncio.run(run())
    except KeyboardInterrupt:
        print("apdispatch load: aborted", file=sys.stderr)
        return 130
    except UnavailableError as exc:
        print(f"apdispatch load: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"apdispatch load: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    out = getattr(args, "json", None)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.counts_add_up else 3
