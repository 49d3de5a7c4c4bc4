"""``apdispatch worker register``: put any Open Inference Protocol server behind the AP.

A server that speaks OIP (KServe v2) gRPC but not the AP's Registry (MLServer,
Triton, KServe's own) serves the variants; this process registers it with the
AP and heartbeats on its behalf, with :class:`workers.registration.Registrar`
and the same ``RegisterRequest`` our workers send. What a variant is (task,
accuracy, latencies, tensors) comes from the zoo's manifest; a model the
manifest does not know is described by the server's ``ModelMetadata`` and by
``--task``/``--accuracy``/``--latency-ms``.

It registers once the server answers ``ServerReady`` and ``ModelReady`` for
every variant, deregisters while the server stops answering ready (and
registers again when it does), and deregisters on SIGINT/SIGTERM
(:class:`apdispatch.common.lifecycle.Lifecycle`). The AP talks to the server
directly: unary ``ModelInfer`` calls unless ``--streaming`` says the server
takes Triton's ``ModelStreamInfer``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Sequence
from pathlib import Path

import grpc
from structlog.typing import FilteringBoundLogger

from apdispatch.common.lifecycle import Lifecycle
from apdispatch.common.logs import make_logger
from apdispatch.common.manifest import Manifest, TensorSpec, Variant, load_manifest
from apdispatch.common.protocol import oip_pb2 as pb
from apdispatch.common.protocol import oip_pb2_grpc as pb_grpc
from apdispatch.common.tls import TLSFiles
from workers.registration import Announced, Registrar, register_request


class NotReady(Exception):
    """The OIP server is not there, or not ready with every variant."""


def _spec(t: pb.ModelMetadataResponse.TensorMetadata) -> TensorSpec:
    return TensorSpec(name=t.name, datatype=t.datatype, shape=tuple(int(d) for d in t.shape))


async def check_ready(stub: pb_grpc.GRPCInferenceServiceStub, names: Sequence[str], timeout_s: float) -> None:
    """NotReady unless the server is ready and so is each of ``names``."""
    try:
        if not (await stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout_s)).ready:
            raise NotReady("the server is not ready")
        for name in names:
            if not (await stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=timeout_s)).ready:
                raise NotReady(f"model {name!r} is not ready")
    except grpc.aio.AioRpcError as err:
        raise NotReady(f"{err.code().name}: {err.details()}") from None


async def describe(
    stub: pb_grpc.GRPCInferenceServiceStub,
    names: Sequence[str],
    manifest: Manifest | None,
    args: argparse.Namespace,
    log: FilteringBoundLogger,
) -> list[Announced]:
    """Each variant as announced to the AP: the manifest's, else the server's metadata and the flags."""
    announced = []
    for name in names:
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=5.0)
        inputs = tuple(_spec(t) for t in meta.inputs)
        outputs = tuple(_spec(t) for t in meta.outputs)
        variant: Variant | None = None
        if manifest is not None:
            with contextlib.suppress(KeyError):
                variant = manifest.variant(name)
        if variant is not None:
            # The AP sends what the manifest says: a server expecting otherwise would fail each request.
            mismatch = [
                f"{side} {mine} != {theirs}"
                for side, mine, theirs in (
                    ("inputs", variant.inputs, inputs),
                    ("outputs", variant.outputs, outputs),
                )
                if theirs and [(t.name, t.datatype) for t in mine] != [(t.name, t.datatype) for t in theirs]
            ]
            if mismatch:
                raise ValueError(
                    f"{name}: the server's metadata differs from the manifest: {'; '.join(mismatch)}"
                )
        else:
            if args.task is None or args.accuracy is None or args.latency_ms is None:
                raise ValueError(f"{name!r} is not in the manifest: give --task, --accuracy and --latency-ms")
            if not inputs or not outputs:
                raise ValueError(f"{name!r}: the server's ModelMetadata names no inputs or outputs")
            variant = Variant(
                name=name,
                task=args.task,
                runtime="oip",
                file="",
                accuracy=args.accuracy,
                params=0,
                flops=0,
                latency_ms_batch1=args.latency_ms,
                latency_ms_batch8=args.latency_ms,
                inputs=inputs,
                outputs=outputs,
            )
        ms_1, ms_8 = variant.latency_ms_batch1, variant.latency_ms_batch8
        if args.latency_ms is not None and ms_1 > 0:
            # The batch-8 figure scales with the batch-1 one given.
            ms_1, ms_8 = args.latency_ms, ms_8 * args.latency_ms / ms_1
        announced.append(Announced(variant, ms_1, ms_8, max_batch_size=args.max_batch_size))
        log.info("variant", name=name, task=variant.task, accuracy=variant.accuracy, latency_ms=ms_1)
    return announced


class OIPRegistration:
    """Registers an OIP server while it answers ready; deregisters when it does not, or on stop."""

    def __init__(self, args: argparse.Namespace, log: FilteringBoundLogger) -> None:
        self.args = args
        self.names = [v.strip() for v in str(args.variants).split(",") if v.strip()]
        if not self.names:
            raise ValueError("--variants names no model")
        self.worker_id = args.worker_id or f"oip-{args.cluster}-{args.address}"
        self.log = log.bind(worker_id=self.worker_id, address=args.address)
        self.tls = TLSFiles(ca=args.tls_ca or "", cert=args.tls_cert or "", key=args.tls_key or "")
        self._channel = grpc.aio.insecure_channel(args.address)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self.registrar: Registrar | None = None
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        args = self.args
        loop = asyncio.get_running_loop()
        give_up = loop.time() + args.wait_s
        while True:
            try:
                await check_ready(self._stub, self.names, timeout_s=2.0)
                break
            except NotReady as err:
                if loop.time() >= give_up:
                    raise NotReady(f"{args.address} not ready after {args.wait_s} s: {err}") from None
                await asyncio.sleep(0.2)
        manifest = load_manifest(args.models) if (Path(args.models) / "manifest.json").is_file() else None
        variants = await describe(self._stub, self.names, manifest, args, self.log)
        request = register_request(
            worker_id=self.worker_id,
            address=args.address,
            cluster=args.cluster,
            kind=args.worker_kind,
            slots=args.slots,
            variants=variants,
            streaming=args.streaming,
        )
        self.registrar = Registrar(
            args.ap,
            request,
            self.log,
            heartbeat_s=args.heartbeat_s,
            tls=self.tls,
            token=args.ap_token or None,
        )
        self.registrar.start()
        self._watch = loop.create_task(self._watch_server())

    async def _watch_server(self) -> None:
        """Each heartbeat, check the server is ready: a heartbeat vouches for it."""
        assert self.registrar is not None
        registered = True
        while True:
            await asyncio.sleep(self.args.heartbeat_s)
            try:
                await check_ready(self._stub, self.names, timeout_s=min(2.0, self.args.heartbeat_s))
                ready = True
            except NotReady as err:
                ready = False
                if registered:
                    self.log.warning("server_not_ready", error=str(err))
            if ready and not registered:
                self.log.info("server_ready_again")
                self.registrar.start()
            elif registered and not ready:
                await self.registrar.stop()
            registered = ready

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop watching and heartbeating, and deregister: the AP stops routing to the server."""
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        if self.registrar is not None:
            await self.registrar.stop()

    async def close(self) -> None:
        await self.stop()
        await self._channel.close()


async def serve(args: argparse.Namespace, log: FilteringBoundLogger) -> int:
    """Register until SIGINT/SIGTERM; 0 after a deregistration, 1 when it could not start."""
    registration = OIPRegistration(args, log)
    failed = False

    async def startup() -> None:
        nonlocal failed
        try:
            await registration.start()
        except (NotReady, ValueError, OSError, grpc.aio.AioRpcError) as err:
            failed = True
            log.error("startup_failed", error=str(err))
            raise

    def notify(sig: signal.Signals, forced: bool) -> None:
        log.info("shutdown_requested", signal=sig.name, forced=forced)

    try:
        graceful = await Lifecycle(notify=notify).run(
            startup=startup,
            drain=registration.stop,
            shutdown=registration.close,
            grace_s=args.shutdown_grace_s,
        )
    except Exception:
        if failed:
            return 1
        raise
    return 0 if graceful else 1


def main(args: argparse.Namespace) -> int:
    """Entry point of ``apdispatch worker register``."""
    log = make_logger(args.log_level, args.log_format)
    try:
        return asyncio.run(serve(args, log))
    except ValueError as err:  # bad arguments found before the start-up
        log.error("bad_arguments", error=str(err))
        return 2
    except KeyboardInterrupt:
        return 130
