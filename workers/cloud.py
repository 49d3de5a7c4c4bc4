"""The cloud runtime: large PyTorch variants, with dynamic batching.

:class:`TorchRuntime` rebuilds the network from the manifest's ``arch`` config
and loads its ``state_dict`` (``weights_only=True``: no pickled code), on CUDA
when present (``device="auto"``), CPU otherwise.

:class:`BatchingScheduler` collects the requests for one variant into a batch
until it holds ``max_batch_size`` rows or ``max_wait_ms`` have passed since its
first request arrived, then runs the batch as one forward pass in a slot and
splits the outputs back. On a worker with several slots, several batches can be
in flight; while every slot is busy, requests keep accumulating, so batches grow
with load.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apdispatch.common.errors import DeadlineExceededError
from apdispatch.common.manifest import Variant
from workers.runtime import InferResult, Runtime, ServiceTime, Slots

NetworkBuilder = Callable[[dict[str, Any]], torch.nn.Module]


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when this machine has it, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r} (auto, cpu or cuda)")
    return torch.device(device)


def configure_threads(slots: int) -> int:
    """Few intra-op threads: concurrency comes from slots, and the cores are shared.

    Returns the number of intra-op threads set.
    """
    threads = max(1, min(2, (os.cpu_count() or 1) // max(1, slots)))
    torch.set_num_threads(threads)
    # Only possible before torch's first parallel work; harmless to skip later.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return threads


def _default_builder(arch: dict[str, Any]) -> torch.nn.Module:
    from workers.zoo.architectures import build_network

    return build_network(arch)


class TorchRuntime(Runtime):
    platform = "pytorch_libtorch"

    def __init__(
        self,
        variant: Variant,
        path: Path,
        *,
        max_batch_size: int = 8,
        device: str = "auto",
        builder: NetworkBuilder | None = None,
    ) -> None:
        super().__init__(variant, path, max_batch_size=max_batch_size)
        self.device = resolve_device(device)
        self._builder = builder or _default_builder
        self._net: torch.nn.Module | None = None

    def load(self) -> None:
        if not self.variant.arch:
            raise ValueError(f"variant '{self.name}' has no 'arch' to rebuild its network from")
        net = self._builder(self.variant.arch)
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        net.eval()
        self._net = net.to(self.device)

    def predict(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        net = self._net
        if net is None:
            raise RuntimeError(f"variant '{self.name}' is not loaded")
        # torch refuses to share memory with read-only arrays (request bytes);
        # batches are fresh concatenations and need no copy.
        tensors = [torch.from_numpy(a if a.flags.writeable else a.copy()).to(self.device) for a in inputs]
        with torch.inference_mode():
            out = net(*tensors)
        outs = list(out) if isinstance(out, tuple | list) else [out]
        return [o.detach().cpu().numpy() for o in outs]

    def unload(self) -> None:
        self._net = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass(slots=True, eq=False)
class _Pending:
    inputs: list[np.ndarray]
    rows: int
    enqueued: float  # perf_counter
    future: asyncio.Future[InferResult]
    expiry: asyncio.TimerHandle | None = field(default=None)


class BatchingScheduler:
    """Dynamic batching for one variant (see the module docstring)."""

    def __init__(
        self,
        runtime: Runtime,
        slots: Slots,
        *,
        max_batch_size: int = 8,
        max_wait_ms: float = 2.0,
        service: ServiceTime | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.runtime = runtime
        self.slots = slots
        self.service = service
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(0.0, max_wait_ms) / 1e3
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._arrived: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        if self._loop_task is None:
            self._arrived = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(
                self._batch_loop(), name=f"batcher-{self.runtime.name}"
            )

    async def close(self) -> None:
        tasks = [t for t in (self._loop_task, *self._running) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop_task = None
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.cancel()

    async def infer(self, inputs: list[np.ndarray], rows: int, deadline: float | None) -> InferResult:
        if self._arrived is None:
            raise RuntimeError("BatchingScheduler.start() was not called")
        loop = asyncio.get_running_loop()
        pending = _Pending(inputs, rows, time.perf_counter(), loop.create_future())
        if deadline is not None:
            # Dropped at its deadline if it is still waiting for a batch then.
            pending.expiry = loop.call_at(deadline, self._expire, pending)
        self._queue.append(pending)
        self._queued_rows += rows
        self._arrived.set()
        try:
            return await pending.future
        finally:
            if pending.expiry is not None:
                pending.expiry.cancel()

    def _expire(self, pending: _Pending) -> None:
        if not pending.future.done():
            pending.future.set_exception(DeadlineExceededError("deadline exceeded while waiting for a batch"))

    def _predict_batch(self, per_request: list[list[np.ndarray]]) -> list[np.ndarray]:
        """In the slot's thread: stack the requests' inputs row-wise and run them as one."""
        if len(per_request) == 1:
            return self.runtime.predict(per_request[0])
        stacked = [np.concatenate(parts) for parts in zip(*per_request, strict=True)]
        return self.runtime.predict(stacked)

    async def _batch_loop(self) -> None:
        assert self._arrived is not None
        arrived = self._arrived
        loop = asyncio.get_running_loop()
        while True:
            self._drop_done()
            if not self._queue:
                arrived.clear()
                await arrived.wait()
                continue
            # Wait for a full batch or for the first request's max_wait to pass.
            window_end = loop.time() + self.max_wait_s - (time.perf_counter() - self._queue[0].enqueued)
            while self._queued_rows < self.max_batch_size and loop.time() < window_end:
                arrived.clear()
                try:
                    async with asyncio.timeout_at(window_end):
                        await arrived.wait()
                except TimeoutError:
                    break
            await self.slots.acquire()
            batch = self._take_batch()
            if not batch:
                self.slots.release()
                continue
            task = loop.create_task(self._run_batch(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _drop_done(self) -> None:
        """Forget requests already answered (deadline passed) or cancelled by their caller."""
        queue = self._queue
        while queue and queue[0].future.done():
            self._queued_rows -= queue.popleft().rows

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        rows = 0
        queue = self._queue
        while queue:
            p = queue[0]
            if p.future.done():
                queue.popleft()
                self._queued_rows -= p.rows
                continue
            if rows + p.rows > self.max_batch_size:
                break
            queue.popleft()
            self._queued_rows -= p.rows
            if p.expiry is not None:
                p.expiry.cancel()
            batch.append(p)
            rows += p.rows
        return batch

    async def _run_batch(self, batch: list[_Pending]) -> None:
        start = time.perf_counter()
        rows = sum(p.rows for p in batch)
        try:
            work = partial(self._predict_batch, [p.inputs for p in batch])
            hold_s = None if self.service is None else self.service.seconds(rows)
            outputs, held = await self.slots.execute(work, hold_s=hold_s)
        except Exception as exc:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        except asyncio.CancelledError:
            # Shutting down: nobody must wait on this batch for ever.
            for p in batch:
                p.future.cancel()
            raise
        compute_ms = held * 1e3
        offset = 0
        for p in batch:
            if not p.future.done():
                # Slices are views: the bytes are copied once, into the reply.
                part = [o[offset : offset + p.rows] for o in outputs]
                p.future.set_result(InferResult(part, (start - p.enqueued) * 1e3, compute_ms, rows))
            offset += p.rows
