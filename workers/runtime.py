"""Runtimes (one loaded model variant each) and the slots that run them.

A :class:`Runtime` is MLServer style: ``load()``, ``predict(inputs) -> outputs``
(synchronous, numpy in and out, called from a slot's thread or inline on the
event loop), ``unload()``. It knows nothing about gRPC.

:class:`Slots` is the worker's capacity: at most ``count`` executions at once
(an ``asyncio.Semaphore`` plus a thread pool of that size); more wait in FIFO
order. It also carries the emulation of a slower device (see :meth:`Slots.execute`):
a slowdown factor on the real compute time, or a fixed :class:`ServiceTime`
per variant, which does not depend on how fast or busy this machine is.

A scheduler turns requests into executions: :class:`DirectScheduler` runs every
request on its own (the edge worker); ``workers.cloud.BatchingScheduler`` groups
requests into batches first.

This module must not import torch (an edge device does not have it).
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np

from apdispatch.common.errors import DeadlineExceededError
from apdispatch.common.manifest import Variant, batch_latency_ms
from apdispatch.common.tensors import DATATYPE_TO_DTYPE, TensorSpec

T = TypeVar("T")

# Below this much emulated extra hold time, asyncio.sleep cannot be trusted: the
# selector rounds its timeout up to whole milliseconds, so an idle loop would turn
# a 0.1 ms hold into 1 ms. Such short holds are slept in the slot's own thread
# instead (time.sleep is accurate to tens of microseconds), which keeps the
# slot just as busy without blocking the loop.
THREAD_HOLD_BELOW_S = 0.002


@dataclass(slots=True)
class InferResult:
    outputs: list[np.ndarray]  # in the order of the variant's output specs
    queue_ms: float  # waiting for a slot (and, when batching, for the batch to form)
    compute_ms: float  # running the model, emulated slowdown included
    batch_size: int  # rows in the forward pass that served this request


@dataclass(frozen=True, slots=True)
class ServiceTime:
    """A fixed time one execution holds its slot: the emulated device's speed, whatever this machine's.

    Milliseconds for a batch of 1 and of 8 rows; other sizes are interpolated
    linearly, as the simulator does. An execution that really takes longer
    holds its slot for as long as it takes (waiting cannot make a device faster).
    """

    batch1_ms: float
    batch8_ms: float

    def __post_init__(self) -> None:
        if not (self.batch1_ms > 0 and self.batch8_ms > 0):
            raise ValueError(f"service times must be > 0 ms, got {self.batch1_ms}:{self.batch8_ms}")

    def seconds(self, rows: int) -> float:
        return max(0.0, batch_latency_ms(self.batch1_ms, self.batch8_ms, max(1, rows))) / 1e3


def parse_service_times(text: str) -> dict[str, ServiceTime]:
    """``VARIANT=B1:B8,...`` (milliseconds at batch 1 and 8; ``VARIANT=B1`` for both) to a table."""
    table: dict[str, ServiceTime] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, times = item.partition("=")
        parts = times.split(":")
        try:
            if not sep or not name.strip() or len(parts) > 2:
                raise ValueError
            b1 = float(parts[0])
            b8 = float(parts[1]) if len(parts) == 2 else b1
            table[name.strip()] = ServiceTime(b1, b8)
        except ValueError:
            raise ValueError(
                f"--service-ms: {item!r} is not VARIANT=MS or VARIANT=MS_BATCH1:MS_BATCH8 with times > 0"
            ) from None
    return table


class Runtime(ABC):
    """One model variant, loaded into memory and ready to predict."""

    platform: ClassVar[str] = ""  # OIP ModelMetadata platform string

    def __init__(self, variant: Variant, path: Path, *, max_batch_size: int = 8) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.variant = variant
        self.path = path
        self.max_batch_size = max_batch_size

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.variant.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.variant.outputs

    @abstractmethod
    def load(self) -> None:
        """Read the model file and get ready; called once, before any predict."""

    @abstractmethod
    def predict(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Outputs in the order of :attr:`outputs`, for inputs in the order of :attr:`inputs`.

        Inputs may be read-only views over request bytes. Runs in a slot's thread
        (or inline on the event loop for tiny models), so it must be thread safe.
        """

    def unload(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Free what :meth:`load` took."""

    def example_inputs(self, rows: int) -> list[np.ndarray]:
        """Zero inputs of ``rows`` rows (other variable dimensions: 1)."""
        arrays = []
        for spec in self.inputs:
            shape = (rows, *(d if d > 0 else 1 for d in spec.shape[1:]))
            arrays.append(np.zeros(shape, dtype=DATATYPE_TO_DTYPE[spec.datatype]))
        return arrays

    def warmup(self, rows: int = 1, runs: int = 15) -> float:
        """Median milliseconds of ``predict`` at ``rows`` rows, measured here and now.

        Also warms caches and lazy initialisation, so that the first request is
        not the slow one.
        """
        inputs = self.example_inputs(rows)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            self.predict(inputs)
            times.append(time.perf_counter() - t0)
        times.sort()
        return times[len(times) // 2] * 1e3


class Slots:
    """At most ``count`` executions at once; more wait in FIFO order.

    **Emulation.** ``slowdown`` F makes this worker behave like a device F times
    slower than the machine it runs on: after an execution that really took c
    seconds, the slot stays busy for a further c*(F-1) seconds before it is
    released and the reply goes out. F <= 1 emulates nothing (a faster device
    cannot be emulated by waiting). An execution given a ``hold_s`` (from a
    :class:`ServiceTime`) instead keeps its slot until ``hold_s`` has passed
    since it started, so its speed does not follow this machine's load.
    """

    def __init__(self, count: int, *, slowdown: float = 1.0) -> None:
        if count < 1:
            raise ValueError("slots must be >= 1")
        self.count = count
        self.slowdown = max(1.0, float(slowdown))
        self._sem = asyncio.Semaphore(count)
        self._pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="slot")
        self.waiting = 0  # requests queued for a slot right now
        self.busy = 0  # slots held right now (executing, or holding for emulated slowdown)

    async def acquire(self, deadline: float | None = None) -> None:
        """Wait for a free slot (FIFO). ``deadline`` is in event-loop time.

        Raises :class:`DeadlineExceededError` when the deadline passes while
        waiting, or has already passed when the slot comes free: a dead request
        must not take a slot from a live one.
        """
        sem = self._sem
        if not sem.locked():
            # Free slot and nobody queued: this does not suspend.
            await sem.acquire()
        else:
            self.waiting += 1
            try:
                if deadline is None:
                    await sem.acquire()
                else:
                    try:
                        async with asyncio.timeout_at(deadline):
                            await sem.acquire()
                    except TimeoutError:
                        raise DeadlineExceededError() from None
            finally:
                self.waiting -= 1
        self.busy += 1
        if deadline is not None and asyncio.get_running_loop().time() >= deadline:
            self.release()
            raise DeadlineExceededError()

    def release(self) -> None:
        self.busy -= 1
        self._sem.release()

    def emulates(self) -> bool:
        return self.slowdown > 1.0

    async def execute(
        self, fn: Callable[[], T], *, inline: bool = False, hold_s: float | None = None
    ) -> tuple[T, float]:
        """Run ``fn`` in an acquired slot, hold the slot for the emulated slowdown, release it.

        Returns ``fn``'s result and the seconds the slot was held (compute plus
        emulated extra). ``inline`` runs ``fn`` on the event loop: worth it only
        for models much faster than a thread hop, and never when emulating
        (short holds are slept in the thread, see ``THREAD_HOLD_BELOW_S``).
        """
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        if inline and not self.emulates() and hold_s is None:
            try:
                result = fn()
            finally:
                self.release()
            return result, time.perf_counter() - t0
        fut = loop.run_in_executor(self._pool, self._run_in_slot, fn, t0, hold_s)
        try:
            result, extra = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The thread cannot be stopped: keep the slot busy until it is done
            # (and its emulated extra), so the slot count stays true for everyone else.
            fut.add_done_callback(self._release_when_done)
            raise
        except BaseException:
            self.release()
            raise
        if extra > 0:
            # Scheduled rather than released after the sleep: if this request is
            # cancelled meanwhile, the emulated device is still busy for the full time.
            loop.call_later(extra, self.release)
            await asyncio.sleep(extra)
        else:
            self.release()
        return result, time.perf_counter() - t0

    def _run_in_slot(self, fn: Callable[[], T], started: float, hold_s: float | None) -> tuple[T, float]:
        """In the slot's thread: run ``fn``, then work out how much longer the slot stays held.

        With ``hold_s``, until ``hold_s`` after ``started`` (the hop into this
        thread included); otherwise the slowdown on the real compute time.
        Short extra holds are slept right here; a longer one is returned for the
        event loop to hold (a thread blocked in sleep would be just as busy, but
        the loop's timer keeps the thread pool free for cancellation and shutdown).
        """
        t0 = time.perf_counter()
        result = fn()
        now = time.perf_counter()
        extra = hold_s - (now - started) if hold_s is not None else (now - t0) * (self.slowdown - 1.0)
        if 0.0 < extra < THREAD_HOLD_BELOW_S:
            time.sleep(extra)
            extra = 0.0
        return result, extra

    def _release_when_done(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.release()
            return
        _, extra = fut.result()
        if extra > 0:
            fut.get_loop().call_later(extra, self.release)
        else:
            self.release()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Scheduler(Protocol):
    """Turns requests for one variant into executions on the worker's slots."""

    runtime: Runtime

    async def infer(self, inputs: list[np.ndarray], rows: int, deadline: float | None) -> InferResult: ...

    def start(self) -> None: ...

    async def close(self) -> None: ...


class DirectScheduler:
    """Every request is one execution of its own."""

    def __init__(
        self, runtime: Runtime, slots: Slots, *, inline: bool = False, service: ServiceTime | None = None
    ) -> None:
        self.runtime = runtime
        self.slots = slots
        self.inline = inline
        self.service = service

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def infer(self, inputs: list[np.ndarray], rows: int, deadline: float | None) -> InferResult:
        t0 = time.perf_counter()
        await self.slots.acquire(deadline)
        queued = time.perf_counter() - t0
        hold_s = None if self.service is None else self.service.seconds(rows)
        outputs, held = await self.slots.execute(
            partial(self.runtime.predict, inputs), inline=self.inline, hold_s=hold_s
        )
        return InferResult(outputs, queued * 1e3, held * 1e3, rows)
