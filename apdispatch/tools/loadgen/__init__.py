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
from apdispatch.common.lifecycle import Lifecycle
from apdispatch.scenario import ScenarioError, load_scenario
from apdispatch.scenario.plan import LoadPlan, QueryProcess, StreamPlan, plan_load, stream_starts
from apdispatch.tools.loadgen.report import LoadReport, Observer
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
    "Observer",
    "QueryProcess",
    "Samples",
    "StreamPlan",
    "load_samples",
    "main",
    "plan_load",
    "run_load",
    "stream_starts",
]


def _announce(sig: signal.Signals, forced: bool) -> None:
    if forced:
        print(
            f"apdispatch load: {sig.name}: no longer waiting; missing replies count as '{NO_REPLY}'",
            file=sys.stderr,
        )
    else:
        print(
            f"\napdispatch load: {sig.name}: stopping; waiting for outstanding replies (again: stop waiting)",
            file=sys.stderr,
        )


def main(args: argparse.Namespace) -> int:
    """``apdispatch load``: 0 when the run completed, 1 when the AP was unreachable,
    2 for bad input (scenario, samples), 3 when the outcomes do not add up, 130
    when a second signal cut the wait for replies short (the report is still
    printed and written).

    The first SIGINT/SIGTERM stops sending and waits for outstanding replies;
    a second one stops waiting (:class:`apdispatch.common.lifecycle.Lifecycle`).
    """
    try:
        scenario = load_scenario(args.scenario)
    except (OSError, ScenarioError) as exc:
        print(f"apdispatch load: {exc}", file=sys.stderr)
        return 2
    progress = not getattr(args, "no_progress", False) and sys.stderr.isatty()

    async def run() -> tuple[LoadReport, bool]:
        # The handlers stay in place while the report is written: a further
        # signal then changes nothing.
        with Lifecycle(notify=_announce) as life:
            report = await run_load(
                scenario,
                args.ap,
                Path(args.models),
                duration_s=getattr(args, "duration", None),
                seed=getattr(args, "seed", None),
                progress=progress,
                connect_timeout_s=getattr(args, "connect_timeout", DEFAULT_CONNECT_TIMEOUT_S),
                stop=life.stopping,
                force=life.forced,
                ca=getattr(args, "ca", None),
                cert=getattr(args, "cert", None),
                key=getattr(args, "key", None),
                token=getattr(args, "token", None),
            )
            _write(report, getattr(args, "json", None))
            return report, life.forced.is_set()

    try:
        report, forced = asyncio.run(run())
    except KeyboardInterrupt:  # before the handlers are in place, or after
        print("apdispatch load: aborted", file=sys.stderr)
        return 130
    except UnavailableError as exc:
        print(f"apdispatch load: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"apdispatch load: {exc}", file=sys.stderr)
        return 2
    if not report.counts_add_up:
        return 3
    return 130 if forced else 0


def _write(report: LoadReport, out: Path | str | None) -> None:
    """The shut-down step: the summary on stdout, the JSON document to ``out``."""
    print(report.summary())
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
