"""An AccessPoint in this process, on its own thread and event loop, with real edge workers.

For tests that look inside the AP while they call it over gRPC (its Stats,
its config), such as the limit and fuzz tests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from apdispatch.ap.config import APConfig
from apdispatch.ap.server import AccessPoint
from apdispatch.common.logs import make_logger
from apdispatch.common.manifest import load_manifest
from apdispatch.tools.processes import ChildError, Children, free_port

T = TypeVar("T")


class APThread:
    def __init__(self, config: APConfig) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.ap: AccessPoint = self.run(self._make())
        self.address = self.run(self.ap.start())

    async def _make(self) -> AccessPoint:
        # Built on the AP's loop: the gRPC server binds to the loop it is made on.
        return AccessPoint(self.config, make_logger("warning"))

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def close(self) -> None:
        try:
            self.run(self.ap.stop(grace_s=0.5))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


@contextmanager
def live_ap(config: APConfig, models_dir: Path, run_dir: Path, edge_workers: int = 2) -> Iterator[APThread]:
    """An AP with ``edge_workers`` edge workers serving every ONNX variant, all registered."""
    manifest = load_manifest(models_dir)
    variants = ",".join(v.name for v in manifest.variants if v.runtime == "onnx")
    ap = APThread(config)
    children = Children(run_dir)
    try:
        ids = [f"edge-{i}" for i in range(edge_workers)]
        for wid in ids:
            children.start(
                wid,
                [
                    "worker",
                    "edge",
                    "--listen",
                    f"127.0.0.1:{free_port()}",
                    "--worker-id",
                    wid,
                    "--cluster",
                    wid,
                    "--variants",
                    variants,
                    "--slots",
                    "2",
                    "--models",
                    str(models_dir),
                    "--ap",
                    ap.address,
                ],
            )
        deadline = time.monotonic() + 120
        while {w.worker_id for w in ap.ap.registry.workers()} < set(ids):
            for wid in ids:
                if children.get(wid).exited() is not None:
                    raise ChildError(children.get(wid).describe())
            if time.monotonic() > deadline:
                raise ChildError("\n".join(children.get(wid).describe() for wid in ids))
            time.sleep(0.2)
        yield ap
    finally:
        children.close()
        ap.close()


def sample(models_dir: Path, task: str = "digits", rows: int = 1) -> np.ndarray:
    with np.load(models_dir / "samples" / f"{task}.npz") as npz:
        x: np.ndarray = npz["x"][:rows]
    return x
