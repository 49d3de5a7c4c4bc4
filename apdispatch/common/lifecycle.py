"""A long-running process's lifecycle, shared by the AP, the workers and the load generator.

In the spirit of uvicorn's ``Server``, the phases are explicit: start-up, the
main loop (serve until the first signal), a drain, shut-down.

- The first SIGINT/SIGTERM sets :attr:`Lifecycle.stopping`: the main loop
  ends and the drain starts, bounded by a grace period the drain is given.
- A second one sets :attr:`Lifecycle.forced`: the grace period is cut short
  (the drain's ``cut`` runs, or the drain is cancelled), but the shut-down
  steps still run, so that what they write (a learned policy's checkpoint)
  is always written.

Cancelled tasks are awaited before the next phase, and the signal handlers are
removed at the end, whatever the way out. :func:`cut_short` is the drain's
building block, for code that takes the two events rather than a lifecycle
(``apdispatch.tools.loadgen.run_load``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

import grpc

SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)

# Told of every signal handled: the signal, and whether it cut the grace short.
Notify = Callable[[signal.Signals, bool], None]


async def cut_short(
    work: Awaitable[Any],
    forced: asyncio.Event,
    cut: Callable[[], Awaitable[object]] | None = None,
) -> bool:
    """Await ``work``; if ``forced`` is set first, end it early and await it all the same.

    ``cut`` is how to end it early (stopping a server ends its drain); without
    one, ``work`` is cancelled. Returns True when ``work`` finished by itself.
    Its exceptions propagate; if the caller is cancelled, so is ``work``, and
    it is awaited before the cancellation goes on.
    """
    task = asyncio.ensure_future(work)
    try:
        if not forced.is_set():
            waiter = asyncio.ensure_future(forced.wait())
            try:
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                await asyncio.gather(waiter, return_exceptions=True)
        if task.done():
            task.result()
            return True
        if cut is not None:
            await cut()
        else:
            task.cancel()
        # return_exceptions: the work's own cancellation is expected here; the
        # caller's is not swallowed (gather raises it).
        outcome: list[object] = await asyncio.gather(task, return_exceptions=True)
        if isinstance(outcome[0], BaseException) and not isinstance(outcome[0], asyncio.CancelledError):
            raise outcome[0]
        return False
    except asyncio.CancelledError:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        raise


async def stop_server(server: grpc.aio.Server, grace_s: float | None) -> None:
    """``server.stop``, safe beside another stop of the same server (a drain's and a cut's).

    A grace of 0 or less is passed as None, which means the same (cancel every
    call now): gRPC's timeout path for a zero grace cancels the calls of a
    server that a concurrent stop may just have destroyed, and crashes.
    """
    await server.stop(grace_s if grace_s is not None and grace_s > 0 else None)


class Lifecycle:
    """Signals turned into two events, and the phases of a server run on them.

    ``loop`` is the event loop to install the handlers on (default: the
    running one). :meth:`handle` is what a signal does, callable directly.
    """

    def __init__(
        self,
        *,
        notify: Notify | None = None,
        signals: Sequence[signal.Signals] = SIGNALS,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.stopping = asyncio.Event()  # first signal: drain
        self.forced = asyncio.Event()  # second signal: cut the grace period short
        self.received: list[signal.Signals] = []
        self._notify = notify
        self._signals = tuple(signals)
        self._loop = loop
        self._installed: list[tuple[signal.Signals, Any]] = []  # with the handler it replaced
        self._installed_on: asyncio.AbstractEventLoop | None = None

    def handle(self, sig: signal.Signals) -> None:
        """The first signal sets ``stopping``; any later one sets ``forced``."""
        self.received.append(sig)
        forced = self.stopping.is_set()
        (self.forced if forced else self.stopping).set()
        if self._notify is not None:
            self._notify(sig, forced)

    def install(self) -> bool:
        """Handle the signals on the loop; False where that cannot be (not the main thread)."""
        loop = self._loop or asyncio.get_running_loop()
        self._installed_on = loop
        try:
            for sig in self._signals:
                previous = signal.getsignal(sig)
                loop.add_signal_handler(sig, self.handle, sig)
                self._installed.append((sig, previous))
        except (ValueError, RuntimeError, NotImplementedError):
            self.remove()
            return False
        return True

    def remove(self) -> None:
        """Give the signals back the handling they had (``asyncio.run``'s own for SIGINT)."""
        loop = self._installed_on
        while self._installed:
            sig, previous = self._installed.pop()
            if loop is not None and not loop.is_closed():
                with contextlib.suppress(ValueError, RuntimeError):
                    loop.remove_signal_handler(sig)
            if previous is not None:
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(sig, previous)

    def __enter__(self) -> Lifecycle:
        self.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    async def drain(self, work: Awaitable[Any], cut: Callable[[], Awaitable[object]] | None = None) -> bool:
        """:func:`cut_short` on this lifecycle's second signal."""
        return await cut_short(work, self.forced, cut)

    async def run(
        self,
        *,
        startup: Callable[[], Awaitable[object]],
        drain: Callable[[float], Awaitable[object]],
        shutdown: Callable[[], Awaitable[object]],
        grace_s: float,
        cut: Callable[[], Awaitable[object]] | None = None,
    ) -> bool:
        """Start up, serve until the first signal, drain within ``grace_s``, shut down.

        ``drain(grace_s)`` lets work in flight finish within the grace period; a
        second signal ends it through ``cut`` (or cancels it). ``shutdown`` runs
        whatever happened before it: a failed start-up, a cut drain, a
        cancellation. Returns True when the drain was not cut short.
        """
        with self:
            try:
                await startup()
                await self.stopping.wait()
                return await self.drain(drain(grace_s), cut)
            finally:
                await shutdown()
