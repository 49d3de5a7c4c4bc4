"""The background learner: feedback in through a bounded queue, snapshots out.

The hot path (``choose``/``observe``) only appends to a ``deque`` (atomic,
never blocks) and reads the current snapshot with one attribute access.
The learner drains the queue in batches, runs the torch update, and
publishes a new immutable snapshot by rebinding one attribute, which is
atomic under the GIL: a decision sees either the old parameters or the new
ones, never a mix.

Two ways to run it:

- ``background=True``: a daemon thread, woken when a batch is ready. It
  shares the GIL with the caller, so the AP runs the actor-critic's learner
  in a process instead (``process.py``); ASET, with one small update per 16
  windows, keeps this thread.
- ``background=False`` (the simulator, tests, ``apdispatch train``): the
  update runs inside ``put`` when a batch is complete, so that a seeded run
  gives the same decisions every time. Decisions still read a snapshot.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import torch

T = TypeVar("T")
S = TypeVar("S")
S_co = TypeVar("S_co", covariant=True)

# Transitions waiting for the learner beyond this are dropped (the oldest
# first): under overload the AP keeps deciding and learns from a sample.
QUEUE_LIMIT = 65536
# Share of one core the background learner may use: after an update that took
# t seconds it rests t * (1 / MAX_DUTY - 1), leaving the rest to serving.
MAX_DUTY = 0.3


# The reward a policy reports (``telemetry``) is the mean of its recent rewards:
# of every one up to REWARD_SPAN, then weighted exponentially over about that many.
REWARD_SPAN = 100


class RewardMean:
    """The recent mean of a policy's rewards, and how many there were (read by monitoring)."""

    __slots__ = ("count", "mean")

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0

    def add(self, reward: float) -> None:
        self.count += 1
        self.mean += (reward - self.mean) / min(self.count, REWARD_SPAN)


class Algorithm(Protocol[T, S_co]):
    batch_size: int

    def update(self, batch: list[T]) -> S_co: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...


class Learner(Generic[T, S]):
    def __init__(
        self,
        algo: Algorithm[T, S],
        publish: Callable[[S], None],
        *,
        background: bool,
        queue_limit: int = QUEUE_LIMIT,
        name: str = "learner",
    ) -> None:
        self.algo = algo
        self._publish = publish
        self._queue: deque[T] = deque(maxlen=queue_limit)
        self._background = background
        self._lock = threading.Lock()  # held while the parameters change or are saved
        self._stop = threading.Event()
        # Set when a batch is ready (or to stop). The thread sleeps on it
        # instead of polling: each wake-up would take the GIL from the event loop.
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._name = name
        self.dropped = 0
        self.updates = 0
        self.error: BaseException | None = None
        # One thread for torch's own work, in either mode: updates are small
        # (a few hundred rows), where more threads only spin and contend with
        # serving (the AP) or with the simulation's own loop.
        torch.set_num_threads(1)
        if background:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def put(self, item: T) -> None:
        """Hand one transition over. Never blocks; drops the oldest when the queue is full."""
        queue = self._queue
        if len(queue) == queue.maxlen:
            self.dropped += 1
        queue.append(item)
        if len(queue) >= self.algo.batch_size:
            if not self._background:
                self.step()
            elif not self._ready.is_set():
                self._ready.set()  # once per batch: wake the learner thread

    def pending(self) -> int:
        return len(self._queue)

    def step(self) -> bool:
        """One update if a batch is ready; True when one ran."""
        n = self.algo.batch_size
        if len(self._queue) < n:
            return False
        popleft = self._queue.popleft
        batch = [popleft() for _ in range(n)]
        with self._lock:
            snapshot = self.algo.update(batch)
            self.updates += 1
        self._publish(snapshot)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                started = time.perf_counter()
                if self.step():
                    self._stop.wait((time.perf_counter() - started) * (1.0 / MAX_DUTY - 1.0))
                else:
                    self._ready.clear()
                    if len(self._queue) < self.algo.batch_size:  # a put may have come in between
                        self._ready.wait()
            except Exception as exc:  # a failed update must not take the AP down
                self.error = exc
                self._queue.clear()
                self._stop.wait(1.0)

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return self.algo.state_dict()

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._ready.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
