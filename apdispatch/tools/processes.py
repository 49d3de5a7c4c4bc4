"""Child processes of the demo, the benchmark and the tests: start, watch, stop.

Every child runs ``python -m apdispatch.cli ...`` in its own session, with its
output in a log file; ``Children.close`` stops them all (SIGTERM, then SIGKILL
after a grace period) whatever the way out.
"""

from __future__ import annotations

import contextlib
import os
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


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
