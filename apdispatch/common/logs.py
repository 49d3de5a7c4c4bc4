"""structlog set-up for the AP, the workers and the tools: JSON lines by default,
one logger passed down, context bound per use.

The logger is built with ``structlog.wrap_logger`` rather than a global
``structlog.configure`` so that several workers (and an AP) can share one process
in tests, each with its own level, format and bound context (worker id, kind).
Levels below the threshold compile to no-ops, so debug calls on the hot path
cost next to nothing at ``info``.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
from structlog.typing import FilteringBoundLogger, Processor


def make_logger(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> FilteringBoundLogger:
    """A logger writing one line per event to ``stream`` (stdout), flushed per line.

    Flushing matters: a parent process waits for the ``serving`` line on a pipe.
    """
    levels = logging.getLevelNamesMapping()
    try:
        min_level = levels[level.upper()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}") from None
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        raise ValueError(f"unknown log format {fmt!r} (json or console)")
    processors: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]
    logger: FilteringBoundLogger = structlog.wrap_logger(
        structlog.PrintLogger(stream if stream is not None else sys.stdout),
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
    )
    return logger


def is_enabled(level: str, current: str) -> bool:
    """Whether a logger at level ``current`` writes ``level`` events."""
    mapping = logging.getLevelNamesMapping()
    return mapping[level.upper()] >= mapping[current.upper()]
