"""Child processes of the demo, the benchmark and the tests: start, watch, stop.

Every child runs ``python -m apdispatch.cli ...`` in its own session, with its
output in a log file; ``Children.close`` stops them all (SIGTERM, then SIGKILL
after a grace period) whatever the way out.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

import grpc

from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.common.protocol import dispatcher_pb2_grpc as pb_grpc

STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 15


class ChildError(RuntimeError):
    """A child did not come up; the message shows the end of its log."""


LOWEST_PORT = 10_000
RANDOM_DRAWS = 64
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL_RANGE = (32_768, 60_999)


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The ports the kernel hands out for ``bind(0)`` and outgoing connections."""
    try:
        low, high = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL_RANGE
    return low, high


def _usable_ports() -> tuple[int, ...]:
    low, high = ephemeral_range()
    return tuple(p for p in range(LOWEST_PORT, 65_536) if not low <= p <= high)


class PortPicker:
    """Hands out ports that are free now and that this picker has not handed out before.

    A child binds its port only once it has started, so asking the kernel for a free
    port twice in a row can return the same one; and a port from the ephemeral range
    can be taken meanwhile by any outgoing connection. The picker remembers what it
    handed out and draws outside that range.
    """

    def __init__(self, candidates: Sequence[int] | None = None, rng: random.Random | None = None) -> None:
        self._candidates = tuple(candidates) if candidates is not None else _usable_ports()
        self._rng = rng or random.Random()
        self._handed: set[int] = set()

    def pick(self, host: str = "127.0.0.1") -> int:
        # Random draws find a port at once on a quiet machine; the scan settles a crowded one.
        draws = (self._rng.choice(self._candidates) for _ in range(RANDOM_DRAWS))
        for port in itertools.chain(draws, self._candidates):
            if port not in self._handed and _bindable(host, port):
                self._handed.add(port)
                return port
        raise RuntimeError(f"no free port left among {len(self._candidates)} candidates on {host}")


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# One picker per process: what it remembers is which ports this process's children were given.
_PORTS = PortPicker()


def free_port(host: str = "127.0.0.1") -> int:
    return _PORTS.pick(host)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = text.splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in tail) or "    (empty log)"


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    log_file: IO[bytes]

    def exited(self) -> int | None:
        return self.popen.poll()

    def describe(self) -> str:
        rc = self.exited()
        state = "running" if rc is None else f"exited with {rc}"
        return f"{self.name} ({state}; log {self.log}):\n{log_tail(self.log)}"


@dataclass
class Children:
    """Subprocesses, each in its own process group, all stopped by ``close``."""

    run_dir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = self.run_dir / f"{name}.log"
        log_file = log.open("ab")
        argv = [sys.executable, "-m", "apdispatch.cli", *args]
        log_file.write(("$ " + " ".join(argv) + "\n").encode())
        log_file.flush()
        # A new session: Ctrl-C in the terminal reaches only the parent, which
        # stops the children in order; killpg reaches grandchildren too.
        popen = subprocess.Popen(
            argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )
        child = Child(name, popen, log, log_file)
        self.children.append(child)
        return child

    def get(self, name: str) -> Child:
        for child in self.children:
            if child.name == name:
                return child
        raise KeyError(name)

    def stop(
        self, child: Child, timeout_s: float = STOP_TIMEOUT_S, sig: signal.Signals = signal.SIGTERM
    ) -> int:
        self._signal(child, sig)
        try:
            rc = child.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._signal(child, signal.SIGKILL)
            rc = child.popen.wait()
        self._signal(child, signal.SIGKILL)  # stragglers of its group, none expected
        child.log_file.close()
        if child in self.children:
            self.children.remove(child)
        return rc

    def close(self) -> None:
        """SIGTERM to all at once (they shut down in parallel), then wait, then SIGKILL."""
        for child in self.children:
            self._signal(child, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in list(self.children):
            try:
                child.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(child, signal.SIGKILL)
                child.popen.wait()
            self._signal(child, signal.SIGKILL)
            child.log_file.close()
        self.children.clear()

    @staticmethod
    def _signal(child: Child, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.popen.pid, sig)


def registered_workers(ap: str, timeout_s: float = 1.0) -> tuple[dict[str, int], str] | None:
    """``({worker_id: in_flight}, policy)`` from the AP, or None when it does not answer."""
    with grpc.insecure_channel(ap) as channel:
        stub = pb_grpc.RegistryStub(channel)
        try:
            reply = stub.ListWorkers(pb.ListWorkersRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return None
    return {w.worker.worker_id: w.in_flight for w in reply.workers}, reply.policy


def wait_for_workers(ap: str, ap_child: Child, workers: Mapping[str, Child], timeout_s: float = 90.0) -> str:
    """Wait until every worker id in ``workers`` is registered with the AP; returns its policy."""
    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    while True:
        for child in [ap_child, *workers.values()]:
            if child.exited() is not None:
                raise ChildError(f"{child.name} stopped early:\n{child.describe()}")
        answer = registered_workers(ap)
        if answer is not None:
            seen = set(answer[0])
            if set(workers) <= seen:
                return answer[1]
        if time.monotonic() > deadline:
            missing = [c for wid, c in workers.items() if wid not in seen]
            what = (
                f"the AP at {ap} did not answer"
                if answer is None
                else f"not registered: {', '.join(c.name for c in missing)}"
            )
            details = "\n".join(c.describe() for c in [ap_child, *missing])
            raise ChildError(f"after {timeout_s:.0f} s, {what}\n{details}")
        time.sleep(0.2)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that the finally blocks stop the children."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """A second Ctrl-C must not cut the clean-up short and leave children behind."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
