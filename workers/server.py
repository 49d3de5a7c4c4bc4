"""A worker process: loads model variants, serves them over the Open Inference Protocol
(KServe v2) gRPC, registers with the AP and shuts down gracefully.

``apdispatch worker edge|cloud ...`` ends up in :func:`main`. The pieces:

- :mod:`workers.codec`: :class:`~workers.codec.Model`, one served variant: its
  runtime, its scheduler and the wire codec (validation of inputs, raw
  little-endian replies).
- :mod:`workers.servicer`: the ``inference.GRPCInferenceService`` RPCs.
- :class:`Worker` (here): start-up, the grpc.aio server, registration,
  shut-down; :func:`serve` runs one under :class:`apdispatch.common.lifecycle.Lifecycle`.

**Emulation**, so that one machine can host a heterogeneous topology:
``slowdown`` F holds each slot F times as long as the real compute took
(:class:`workers.runtime.Slots`), or ``service_ms`` holds it for a fixed time
per variant, whatever the speed and load of this machine; ``link_delay_ms`` D adds a round trip to every
request, D/2 before it enters the queue and D/2 after its reply is ready
(holding no slot). Both ride on asyncio timers, which an idle loop fires up to
a millisecond late; the ``queue_ms`` and ``compute_ms`` a reply carries are
measured, not computed from the settings.

The edge worker must not import torch: ``workers.cloud`` is imported only when a
cloud worker starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from structlog.typing import FilteringBoundLogger

from apdispatch.common.lifecycle import Lifecycle, stop_server
from apdispatch.common.logs import make_logger
from apdispatch.common.manifest import Variant, load_manifest
from apdispatch.common.metrics_http import MetricsServer
from apdispatch.common.protocol import dispatcher_pb2 as dpb
from apdispatch.common.protocol import oip_pb2_grpc as pb_grpc
from apdispatch.common.tls import TLSFiles
from workers.codec import Model
from workers.config import WorkerConfig
from workers.metrics import WorkerMetrics
from workers.registration import Announced, Registrar, register_request
from workers.runtime import DirectScheduler, Runtime, Scheduler, Slots, parse_service_times
from workers.servicer import InferenceServicer

# ONNX variants whose measured execution at full batch takes less than this
# run inline on the event loop: handing them to a thread costs more than the
# model itself. Measured on digits-tiny (about 0.01 ms): inline serves about
# 1.7x the streamed requests per second of a thread hop, at a lower p50.
INLINE_BELOW_MS = 0.3
# Message limits: large tensors are fine on loopback and in a LAN.
GRPC_OPTIONS = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # An explicit port must fail when taken, not be silently shared.
    ("grpc.so_reuseport", 0),
    # The AP pings its links every 10 s, also while they are idle; by default gRPC
    # answers such pings with GOAWAY ("too many pings") and the link breaks.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
)


# grpc.health.v1: the worker as a whole ("") and its one service. NOT_SERVING
# while the models load (the port is open by then) and from the first step of
# a drain; SERVING in between.
HEALTH_SERVICES = ("", "inference.GRPCInferenceService")


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen must be HOST:PORT, got {listen!r}")
    return host, int(port)


class Worker:
    """Loads the variants, serves them over OIP gRPC, registers with the AP.

    ``await start()`` returns the bound address; ``await stop()`` shuts down
    gracefully. Usable in-process (tests) or through :func:`main`.
    """

    def __init__(
        self,
        config: WorkerConfig,
        log: FilteringBoundLogger | None = None,
        *,
        inline_below_ms: float = INLINE_BELOW_MS,
    ) -> None:
        if config.kind not in ("edge", "cloud"):
            raise ValueError(f"worker kind must be 'edge' or 'cloud', got {config.kind!r}")
        self.config = config
        self.tls = TLSFiles()
        self.log = (log or make_logger()).bind(kind=config.kind, cluster=config.cluster)
        self.inline_below_ms = inline_below_ms
        self.models: dict[str, Model] = {}
        self.slots: Slots | None = None
        self.address = ""
        self.worker_id = ""
        self.registrar: Registrar | None = None
        self._server: grpc.aio.Server | None = None
        self._servicer: InferenceServicer | None = None
        # Prometheus /metrics (metrics_port; 0: none), from a registry of this worker's own.
        self.metrics = WorkerMetrics() if config.metrics_port else None
        self._metrics_http: MetricsServer | None = None
        self.metrics_address = ""
        self.health = health.aio.HealthServicer()
        self._stopping = False
        self._closing = False
        self._cut = False  # a second signal ended the drain early
        self._stopped = asyncio.Event()

    # Start-up ------------------------------------------------------------

    def _load_models(self, slots: Slots) -> dict[str, Model]:
        config = self.config
        manifest = load_manifest(config.models)
        models: dict[str, Model] = {}
        for name in config.variants:
            try:
                variant = manifest.variant(name)
            except KeyError as err:
                raise ValueError(str(err.args[0])) from None
            path = manifest.path(variant)
            runtime = self._make_runtime(variant, path)
            runtime.load()
            ms_1 = runtime.warmup(1)
            ms_max = runtime.warmup(runtime.max_batch_size)
            scheduler: Scheduler
            service = config.service_ms.get(name)
            if config.kind == "cloud":
                from workers.cloud import BatchingScheduler

                scheduler = BatchingScheduler(
                    runtime,
                    slots,
                    max_batch_size=config.max_batch_size,
                    max_wait_ms=config.max_wait_ms,
                    service=service,
                )
                mode = "batching"
            else:
                inline = ms_max < self.inline_below_ms
                scheduler = DirectScheduler(runtime, slots, inline=inline, service=service)
                mode = "inline" if inline and not slots.emulates() and service is None else "thread"
            models[name] = Model(runtime, scheduler, max_batch_size=config.max_batch_size)
            self.log.info(
                "model_loaded",
                model=name,
                platform=runtime.platform,
                mode=mode,
                measured_ms_batch1=round(ms_1, 4),
                measured_ms_batch_max=round(ms_max, 4),
                max_batch_size=config.max_batch_size,
                manifest_ms_batch1=variant.latency_ms_batch1,
                service_ms_batch1=None if service is None else service.batch1_ms,
            )
        return models

    def _make_runtime(self, variant: Variant, path: Path) -> Runtime:
        config = self.config
        if variant.runtime == "onnx":
            from workers.edge import OnnxRuntime

            return OnnxRuntime(variant, path, max_batch_size=config.max_batch_size)
        if variant.runtime == "torch":
            if config.kind != "cloud":
                raise ValueError(
                    f"variant '{variant.name}' needs PyTorch: serve it from a cloud worker"
                    " (edge workers run ONNX variants only)"
                )
            from workers.cloud import TorchRuntime, configure_threads

            configure_threads(config.slots)
            return TorchRuntime(variant, path, max_batch_size=config.max_batch_size, device=config.device)
        raise ValueError(f"variant '{variant.name}' has unknown runtime {variant.runtime!r}")

    async def start(self) -> str:
        """Bind, load, serve, register; returns the bound ``host:port``.

        The port opens first: while the variants load (seconds for a torch
        one), health answers NOT_SERVING and the OIP API knows no model.
        """
        config = self.config
        if not config.variants:
            raise ValueError("no variants to serve")
        self.tls = TLSFiles(ca=config.tls_ca, cert=config.tls_cert, key=config.tls_key)
        if config.tls_ca and not config.tls_cert:
            raise ValueError("--tls-ca needs --tls-cert and --tls-key: a worker serves mutual TLS")
        unserved = sorted(set(config.service_ms) - set(config.variants))
        if unserved:
            raise ValueError(f"--service-ms names variants this worker does not serve: {', '.join(unserved)}")
        host, _ = _split_listen(config.listen)
        slots = Slots(config.slots, slowdown=config.slowdown)
        self.slots = slots

        # The servicer holds self.models, filled in place once loaded.
        servicer = InferenceServicer(self.models, self.log, link_delay_ms=config.link_delay_ms)
        server = grpc.aio.server(options=list(GRPC_OPTIONS))
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        if self.metrics is not None:
            self.metrics.watch(slots, self.models, lambda: servicer.ready)
            servicer.metrics = self.metrics
            self._metrics_http = MetricsServer(self.metrics.registry, host, config.metrics_port)
            self.metrics_address = self._metrics_http.start()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            port = (
                server.add_secure_port(config.listen, self.tls.server_credentials())
                if config.tls_cert
                else server.add_insecure_port(config.listen)
            )
        except RuntimeError as err:
            raise OSError(f"cannot listen on {config.listen}: {err}") from None
        if port == 0:
            raise OSError(f"cannot listen on {config.listen}")
        await server.start()
        self._server, self._servicer = server, servicer
        self.address = f"{host}:{port}"
        self.worker_id = config.worker_id or f"{config.kind}-{config.cluster}-{port}"
        self.log = self.log.bind(worker_id=self.worker_id)
        servicer.log = self.log
        # In a thread, so that the event loop answers health checks meanwhile.
        self.models.update(await asyncio.to_thread(self._load_models, slots))
        for model in self.models.values():
            model.scheduler.start()
        servicer.ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        # One line a parent process can wait for; the logger flushes each line.
        self.log.info(
            "serving",
            address=self.address,
            variants=list(self.models),
            slots=config.slots,
            slowdown=config.slowdown,
            link_delay_ms=config.link_delay_ms,
        )
        if config.ap:
            self.registrar = Registrar(
                config.ap,
                self.register_request(),
                self.log,
                heartbeat_s=config.heartbeat_s,
                tls=self.tls,
                token=config.ap_token or None,
            )
            self.registrar.start()
        return self.address

    def advertised_address(self) -> str:
        if self.config.advertise:
            return self.config.advertise
        host, port = _split_listen(self.address)
        if host in ("", "0.0.0.0", "[::]", "::"):
            # A wildcard bind is reachable under this machine's name.
            host = socket.gethostname()
        return f"{host}:{port}"

    def _announced_ms(self, variant: Variant) -> tuple[float, float]:
        """What one execution of ``variant`` costs here, at batch 1 and 8, as the AP is told."""
        service = self.config.service_ms.get(variant.name)
        if service is not None:
            return service.batch1_ms, service.batch8_ms
        factor = max(1.0, self.config.slowdown)
        return variant.latency_ms_batch1 * factor, variant.latency_ms_batch8 * factor

    def register_request(self) -> dpb.RegisterRequest:
        config = self.config
        return register_request(
            worker_id=self.worker_id,
            address=self.advertised_address(),
            cluster=config.cluster,
            kind=config.kind,
            slots=config.slots,
            link_delay_ms=config.link_delay_ms,
            streaming=True,
            variants=[
                Announced(m.variant, *self._announced_ms(m.variant), max_batch_size=m.max_batch_size)
                for m in self.models.values()
            ],
        )

    # Shut-down -------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> bool:
        """Drain within ``grace`` seconds (default: the config's), then shut down.

        Idempotent; returns False when a drain was cut short (:meth:`cut`).
        """
        if self._stopping:
            await self._stopped.wait()
            return not self._cut
        self._stopping = True
        await self.drain(self.config.shutdown_grace_s if grace is None else grace)
        await self.close()
        return not self._cut

    async def drain(self, grace_s: float) -> None:
        """Deregister, stop accepting, let in-flight requests finish within ``grace_s`` seconds."""
        slots = self.slots
        self.log.info(
            "stopping",
            grace_s=grace_s,
            running=slots.busy if slots else 0,
            queued=slots.waiting if slots else 0,
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._servicer is not None:
            self._servicer.ready = False
        if self.registrar is not None:
            await self.registrar.stop()
        if self._server is not None:
            await stop_server(self._server, None if self._cut else grace_s)

    async def _set_health(self, status: int) -> None:
        for service in HEALTH_SERVICES:
            await self.health.set(service, status)

    async def cut(self) -> None:
        """End a drain now: requests still in flight are cancelled."""
        self._cut = True
        self.log.warning("forced_stop")
        if self._server is not None:
            await stop_server(self._server, None)

    async def close(self) -> None:
        """The shut-down steps, whatever came before (a drain, a cut one, a failed start)."""
        if self._closing:
            await self._stopped.wait()
            return
        self._closing = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._servicer is not None:
            self._servicer.ready = False
        # Both are no-ops after a drain.
        if self.registrar is not None:
            await self.registrar.stop()
        if self._server is not None:
            await stop_server(self._server, None)
        for model in self.models.values():
            await model.scheduler.close()
            model.runtime.unload()
        if self.slots is not None:
            self.slots.close()
        if self._metrics_http is not None:
            self._metrics_http.stop()
        self.log.info("stopped", graceful=not self._cut)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    """The WorkerConfig for ``apdispatch worker edge|cloud`` flags."""
    variants = tuple(v.strip() for v in str(args.variants).split(",") if v.strip())
    defaults = WorkerConfig(kind=args.kind, listen=args.listen, models=Path(args.models), variants=variants)
    return WorkerConfig(
        kind=args.kind,
        listen=args.listen,
        models=Path(args.models),
        variants=variants,
        ap=args.ap or None,
        cluster=args.cluster,
        slots=args.slots,
        slowdown=args.slowdown,
        link_delay_ms=args.link_delay_ms,
        service_ms=parse_service_times(getattr(args, "service_ms", "") or ""),
        worker_id=args.worker_id or None,
        advertise=args.advertise or None,
        max_batch_size=getattr(args, "max_batch_size", defaults.max_batch_size),
        max_wait_ms=getattr(args, "max_wait_ms", defaults.max_wait_ms),
        device=getattr(args, "device", defaults.device),
        tls_cert=getattr(args, "tls_cert", None) or "",
        tls_key=getattr(args, "tls_key", None) or "",
        tls_ca=getattr(args, "tls_ca", None) or "",
        ap_token=getattr(args, "ap_token", None) or "",
        metrics_port=getattr(args, "metrics_port", 0) or 0,
        shutdown_grace_s=(
            defaults.shutdown_grace_s
            if getattr(args, "shutdown_grace_s", None) is None
            else args.shutdown_grace_s
        ),
    )


async def serve(config: WorkerConfig, log: FilteringBoundLogger) -> int:
    """Run a worker until SIGINT/SIGTERM, under :class:`Lifecycle`.

    0 when it drained; 1 when a second signal cut the drain short, or when it
    could not start.
    """
    worker = Worker(config, log)
    failed = False

    async def startup() -> None:
        nonlocal failed
        try:
            await worker.start()
        except (OSError, ValueError, KeyError) as err:
            failed = True
            # Expected failures (a taken port, a missing zoo, an unknown variant): one line.
            log.error("startup_failed", error=str(err))
            raise
        except Exception:
            failed = True
            log.exception("startup_failed")
            raise

    def notify(sig: signal.Signals, forced: bool) -> None:
        if forced:
            log.warning("forced_exit_requested", signal=sig.name)
        else:
            log.info("shutdown_requested", signal=sig.name)

    try:
        graceful = await Lifecycle(notify=notify).run(
            startup=startup,
            drain=worker.drain,
            cut=worker.cut,
            shutdown=worker.close,
            grace_s=config.shutdown_grace_s,
        )
    except Exception:
        if failed:  # logged above, and shut down
            return 1
        raise
    return 0 if graceful else 1


def main(args: argparse.Namespace) -> int:
    """Entry point of ``apdispatch worker edge|cloud``."""
    log = make_logger(args.log_level, args.log_format)
    try:
        config = config_from_args(args)
    except ValueError as err:
        log.error("bad_arguments", error=str(err))
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(serve(config, log))
    return 130
