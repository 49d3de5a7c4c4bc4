"""The actor-critic's learner in a process of its own: the AP's default.

A learner thread shares the GIL with the event loop: every stretch of Python
it runs between torch ops (batching, advantages, optimiser bookkeeping) is a
stretch the data plane waits, and decisions are timed in microseconds. A
process shares nothing but memory:

- transitions go through a ring buffer of shared memory (``RawArray``), one
  slot per decision, at most ``max_learn_per_s`` a second (the rest are
  shed, so that the learner's CPU time stays small and bounded at any load):
  ``put`` copies the features and logits into the next slot and advances the
  head. No pickling, no lock, no system call on the hot path. When the
  learner falls a whole ring behind, the oldest are lost (``dropped``).
- the learner process reads whole batches from the ring, updates the torch
  networks, and sends each new actor back over a pipe as plain numpy arrays;
  a watcher thread in the AP turns them into an immutable ``ActorSnapshot``
  and publishes it with one attribute assignment.
- checkpoints are written by the learner process, which holds the current
  parameters; ``save`` asks and waits for its answer.

The learner process exits when asked, and on its own when the AP is gone.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from apdispatch.learned.actor_critic import (
    ActorCriticAlgo,
    ActorCriticConfig,
    ActorSnapshot,
    Transition,
)
from apdispatch.learned.features import N_FEATURES

# Decisions the ring holds; larger candidate sets than MAX_CANDIDATES are not
# learned from (they are still decided on).
RING = 8192
MAX_CANDIDATES = 32
POLL_S = 0.005
MAX_DUTY = 0.3  # share of one core the learner process may use, at most
START_TIMEOUT_S = 120.0
SAVE_TIMEOUT_S = 60.0
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _views(x: Any, z: Any, meta: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy views of the ring: features, logits, (seq, n, action, reward) per slot."""
    slots = len(meta) // 4
    return (
        np.frombuffer(x, dtype=np.float32).reshape(slots, -1, N_FEATURES),
        np.frombuffer(z, dtype=np.float32).reshape(slots, -1),
        np.frombuffer(meta, dtype=np.float64).reshape(slots, 4),
    )


def _snapshot_arrays(s: ActorSnapshot) -> tuple[Any, ...]:
    return (s.first, s.hidden, s.out_w, s.out_b, s.version)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


class ProcessLearner:
    def __init__(
        self, algo: ActorCriticAlgo, publish: Callable[[ActorSnapshot], None], *, name: str = "learner"
    ) -> None:
        ctx = mp.get_context("spawn")  # never fork a process with gRPC threads
        self.algo = algo
        self._publish = publish
        self._raw = (
            ctx.RawArray("f", RING * MAX_CANDIDATES * N_FEATURES),
            ctx.RawArray("f", RING * MAX_CANDIDATES),
            ctx.RawArray("d", RING * 4),
        )
        self._head = ctx.RawValue("q", 0)
        self._x, self._z, self._meta = _views(*self._raw)
        self._ring = RING
        self._max_n = MAX_CANDIDATES
        self._h = 0
        rate = algo.hyper.max_learn_per_s
        self._keep_gap = 1.0 / rate if rate > 0 else 0.0
        self._next_keep = 0.0
        self.shed = 0  # transitions over max_learn_per_s, not learned from
        self.dropped = 0  # known to the learner process; mirrored with each snapshot
        self.skipped = 0  # candidate sets too large for the ring
        self.updates = 0  # this session's updates
        self.error: str | None = None
        parent, child = ctx.Pipe()
        state = {k: v.numpy() for k, v in algo.state_dict().items()}
        self._proc = ctx.Process(
            target=_serve,
            args=(child, *self._raw, self._head, algo.config.to_json(), state, algo.updates, algo.samples),
            name=name,
            daemon=True,
        )
        # Blocked from its very start (the mask passes through exec): a signal
        # to the AP's group while it still imports torch must not kill it.
        # The resource tracker first: its own start unblocks them.
        resource_tracker.ensure_running()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self._proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.close()
        self._conn = parent
        self._send_lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._saved: dict[str, Any] = {}
        self._saved_event = threading.Event()
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name=f"{name}-watch", daemon=True)
        self._watcher.start()

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> bool:
        return self._ready.wait(timeout_s)

    def put(self, t: Transition) -> None:
        """Copy one transition into the ring (hot path: a few small copies)."""
        now = time.monotonic()
        if now < self._next_keep:
            self.shed += 1
            return
        self._next_keep = now + self._keep_gap
        n = len(t.logits)
        if n > self._max_n:
            self.skipped += 1
            return
        h = self._h
        i = h % self._ring
        self._x[i, :n] = t.x
        self._z[i, :n] = t.logits
        self._meta[i] = (t.seq, n, t.action, t.reward)
        self._h = h + 1
        self._head.value = h + 1  # after the slot: the learner reads up to here

    def _watch(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "ready":
                self._ready.set()
            elif kind == "snapshot":
                (first, hidden, out_w, out_b, version), updates, samples, dropped, loss = msg[1:]
                snapshot = ActorSnapshot(
                    _frozen(first),
                    tuple((_frozen(w), _frozen(b)) for w, b in hidden),
                    _frozen(out_w),
                    out_b,
                    version,
                )
                self.algo.updates, self.algo.samples, self.dropped = updates, samples, dropped
                self.algo.loss = loss
                self.updates += 1
                self._publish(snapshot)
            elif kind == "saved":
                self._saved = {"path": msg[1], "error": msg[2]}
                self._saved_event.set()
            elif kind == "error":
                self.error = msg[1]
            elif kind == "stopped":
                break
        self._stopped.set()
        self._saved_event.set()  # nobody waits for a save that cannot come

    def _send(self, msg: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def save(self, path: Path | str, config: dict[str, Any]) -> Path:
        """Ask the learner process to write the checkpoint; wait for it."""
        with self._save_lock:  # one save at a time: one answer to wait for
            # Its start (torch's import) takes tens of seconds on a loaded
            # machine: the save's own timeout starts once it is up.
            deadline = time.monotonic() + START_TIMEOUT_S
            while not (self._ready.is_set() or self._stopped.is_set()) and time.monotonic() < deadline:
                self._ready.wait(0.1)
            if self._stopped.is_set():
                raise RuntimeError("the learner process has stopped")
            self._saved_event.clear()
            self._send(("save", str(path), config))
            if not self._saved_event.wait(SAVE_TIMEOUT_S) or not self._saved:
                raise RuntimeError("the learner process did not write the checkpoint")
            saved, self._saved = self._saved, {}
        if saved["error"]:
            raise RuntimeError(saved["error"])
        return Path(saved["path"])

    def close(self, timeout_s: float = 10.0) -> None:
        if self._proc.is_alive():
            with contextlib.suppress(OSError, ValueError):  # already gone
                self._send(("stop",))
            self._stopped.wait(timeout_s)
            self._proc.join(timeout_s)
        if self._proc.is_alive():
            self._proc.kill()  # it ignores SIGTERM (see _serve)
            self._proc.join(timeout_s)
        self._conn.close()


def _serve(
    conn: Connection,
    x_raw: Any,
    z_raw: Any,
    meta_raw: Any,
    head: Any,
    config: dict[str, Any],
    state: dict[str, np.ndarray],
    updates: int,
    samples: int,
) -> None:
    """The learner process: read batches from the ring, update, send snapshots back."""
    # The AP decides when this process ends (a stop message, or its own
    # exit): a Ctrl-C or SIGTERM sent to the whole process group must not
    # kill it before the AP has asked for its last checkpoint. Ignored, then
    # unblocked (they were blocked since the start): one pending is dropped.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    import torch

    from apdispatch.learned.checkpoint import save_checkpoint

    torch.set_num_threads(1)
    # Below the AP in the scheduler: on a machine of few cores, serving
    # comes first and learning takes what is left.
    with contextlib.suppress(OSError):
        os.nice(10)
    algo = ActorCriticAlgo(ActorCriticConfig.from_json(config))
    algo.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    algo.updates, algo.samples = updates, samples
    xs, zs, meta = _views(x_raw, z_raw, meta_raw)
    ring = len(meta)
    parent = os.getppid()
    tail = 0
    dropped = 0

    def learn_one() -> bool:
        """One update from the oldest full batch in the ring; False when there is none."""
        nonlocal tail, dropped
        h = head.value
        if h - tail > ring:
            dropped += h - tail - ring
            tail = h - ring
        n = algo.batch_size
        if h - tail < n:
            return False
        batch = []
        for s in range(tail, tail + n):
            i = s % ring
            k = int(meta[i, 1])
            batch.append(
                Transition(
                    int(meta[i, 0]),
                    xs[i, :k].astype(np.float64),
                    int(meta[i, 2]),
                    zs[i, :k].astype(np.float64),
                    float(meta[i, 3]),
                )
            )
        if head.value - tail > ring:
            return True  # lapped while copying: the slots changed under us; go again
        tail += n
        try:
            snapshot = algo.update(batch)
        except Exception as exc:  # keep learning from the next batches
            conn.send(("error", repr(exc)))
            return True
        conn.send(("snapshot", _snapshot_arrays(snapshot), algo.updates, algo.samples, dropped, algo.loss))
        return True

    conn.send(("ready",))
    while True:
        if conn.poll(POLL_S):
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            if msg[0] == "stop":
                conn.send(("stopped",))
                return
            if msg[0] == "save":
                # What the ring holds is learned first, whatever the duty
                # cycle: a checkpoint at shutdown keeps the last feedback.
                while learn_one():
                    pass
                try:
                    cfg = {**msg[2], "updates": algo.updates, "samples": algo.samples}
                    conn.send(("saved", str(save_checkpoint(msg[1], algo.state_dict(), cfg)), ""))
                except Exception as exc:
                    conn.send(("saved", "", repr(exc)))
        if os.getppid() != parent:
            return  # the AP is gone
        started = time.perf_counter()
        if learn_one():
            time.sleep((time.perf_counter() - started) * (1.0 / MAX_DUTY - 1.0))
