"""Any Open Inference Protocol server can be a worker: MLServer behind the AP.

MLServer 1.7.0 runs in a virtual environment of its own (build/venvs/mlserver,
made here from nothing when missing: its tritonclient requirement clashes with
ours), serving zoo ONNX files through deploy/mlserver/onnx_runtime.py.
``apdispatch worker register`` registers it with the AP and heartbeats on its
behalf; the SDK's requests are served by it; SIGTERM deregisters it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from apdispatch.ap.config import APConfig
from apdispatch.ap.server import AccessPoint
from apdispatch.client import AsyncClient
from apdispatch.common.logs import make_logger
from apdispatch.common.manifest import load_manifest
from apdispatch.tools.processes import free_port

REPO = Path(__file__).resolve().parents[1]
RUNTIME_DIR = REPO / "deploy" / "mlserver"
VENV = REPO / "build" / "venvs" / "mlserver"
VARIANT = "digits-tiny"
# The same file under a name the manifest does not know: described by MLServer's ModelMetadata.
UNLISTED = "digits-oip"
WORKER_ID = "mlserver-1"


def mlserver_env() -> Path:
    """build/venvs/mlserver, created and installed when missing (it reaches the package index)."""
    done = VENV / ".installed"  # holds the requirements it was installed from
    wanted = (RUNTIME_DIR / "requirements.txt").read_text()
    if done.is_file() and done.read_text() == wanted:
        return VENV / "bin" / "mlserver"
    shutil.rmtree(VENV, ignore_errors=True)  # a half-made one
    VENV.parent.mkdir(parents=True, exist_ok=True)
    # The interpreter this one's venv was made from: a venv of its own, not nested in ours.
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    subprocess.run(
        [str(VENV / "bin" / "pip"), "install", "--quiet", "-r", str(RUNTIME_DIR / "requirements.txt")],
        check=True,
    )
    done.write_text(wanted)
    return VENV / "bin" / "mlserver"


def write_settings(root: Path, models_dir: Path, grpc_port: int) -> None:
    """MLServer's settings.json and a model-settings.json per model (one process, loopback)."""
    settings = {
        "host": "127.0.0.1",
        "http_port": free_port(),
        "grpc_port": grpc_port,
        "metrics_port": free_port(),
        "parallel_workers": 0,
    }
    (root / "settings.json").write_text(json.dumps(settings))
    onnx = models_dir / load_manifest(models_dir).variant(VARIANT).file
    for name in (VARIANT, UNLISTED):
        folder = root / name
        folder.mkdir()
        model = {"name": name, "implementation": "onnx_runtime.OnnxRuntime", "parameters": {"uri": str(onnx)}}
        (folder / "model-settings.json").write_text(json.dumps(model))


async def _until(check: Callable[[], bool], proc: asyncio.subprocess.Process, what: str, log: Path) -> None:
    # A bound against hanging, not a timing: MLServer starts in seconds.
    for _ in range(1200):
        if check():
            return
        assert proc.returncode is None, f"exited before {what}:\n{log.read_text()[-3000:]}"
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {what} after 120 s:\n{log.read_text()[-3000:]}")


async def start_register(arguments: list[str], log: Path) -> asyncio.subprocess.Process:
    """``apdispatch worker register ARGUMENTS``, its log to ``log``."""
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "apdispatch.cli",
            "worker",
            "register",
            *arguments,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.mark.timeout(900)
@pytest.mark.venv
async def test_mlserver_serves_behind_the_ap(models_dir: Path, tmp_path: Path) -> None:
    mlserver = await asyncio.to_thread(mlserver_env)
    grpc_port = free_port()
    root = tmp_path / "mlserver"
    root.mkdir()
    write_settings(root, models_dir, grpc_port)
    server_log = tmp_path / "mlserver.log"
    register_log = tmp_path / "register.log"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(RUNTIME_DIR), "HOME": str(tmp_path)}
    with server_log.open("wb") as out:
        server = await asyncio.create_subprocess_exec(
            str(mlserver), "start", str(root), cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    # A long lease: within the test, only a deregistration takes the worker off the AP.
    ap = AccessPoint(APConfig(listen="127.0.0.1:0", lease_s=600.0), make_logger("warning"))
    register: asyncio.subprocess.Process | None = None
    try:
        await ap.start()
        manifest = load_manifest(models_dir)
        variant = manifest.variant(VARIANT)
        arguments = [
            "--ap",
            ap.address,
            "--address",
            f"127.0.0.1:{grpc_port}",
            "--variants",
            f"{VARIANT},{UNLISTED}",
            "--models",
            str(models_dir),
            "--worker-id",
            WORKER_ID,
            "--cluster",
            "mlserver",
            "--task",
            variant.task,
            "--accuracy",
            "0.5",
            "--latency-ms",
            "2",
            "--heartbeat-s",
            "0.5",
            "--wait-s",
            "120",
        ]
        register = await start_register(arguments, register_log)
        await _until(lambda: ap.registry.get(WORKER_ID) is not None, register, "registration", register_log)
        worker = ap.registry.get(WORKER_ID)
        assert worker is not None
        assert worker.address == f"127.0.0.1:{grpc_port}" and not worker.streaming
        # The unlisted model's tensors come from MLServer's ModelMetadata (the runtime reads the file).
        unlisted = worker.variants[UNLISTED]
        assert unlisted.task == variant.task and unlisted.accuracy == 0.5
        assert [(s.name, s.datatype, s.shape) for s in unlisted.inputs] == [
            (s.name, s.datatype, s.shape) for s in variant.inputs
        ]

        x = np.random.default_rng(0).random((2, *variant.inputs[0].shape[1:]), dtype=np.float32)
        reference = ort.InferenceSession(str(models_dir / variant.file)).run(None, {"input": x})[0]
        async with AsyncClient(ap.address) as client:
            for name in (VARIANT, UNLISTED):
                result = await client.infer(variant.task, x, deadline_ms=5000, variant=name)
                assert result.outcome == "ok" and result.served_by is not None
                assert result.served_by.worker == WORKER_ID
                assert result.served_by.variant == name
                assert result.served_by.cluster == "mlserver"
                np.testing.assert_allclose(result.output, reference, rtol=1e-5, atol=1e-6)

        register.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(register.wait(), 30) == 0, register_log.read_text()
        assert ap.registry.get(WORKER_ID) is None
        assert '"deregistered"' in register_log.read_text()

        # Registered again; then the server goes away: no longer ready, so deregistered.
        register_log = tmp_path / "register-2.log"
        register = await start_register(arguments, register_log)
        await _until(lambda: ap.registry.get(WORKER_ID) is not None, register, "registration", register_log)
        server.terminate()
        await asyncio.wait_for(server.wait(), 30)
        await _until(lambda: ap.registry.get(WORKER_ID) is None, register, "deregistration", register_log)
        assert '"server_not_ready"' in register_log.read_text()
    finally:
        for proc in (register, server):
            if proc is not None and proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        await ap.stop(grace_s=0.5)
