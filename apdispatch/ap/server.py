"""The AP daemon's lifecycle: start up, serve, shut down with a grace period.

``AccessPoint`` is usable in-process (tests, benchmarks); ``main`` runs it as
``apdispatch serve`` under :class:`apdispatch.common.lifecycle.Lifecycle`: the
first SIGINT/SIGTERM drains within ``shutdown_grace_s``, a second one cuts the
grace period short; the checkpoint is written either way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from apdispatch.ap.auth import DispatcherAuth, Gate, Tokens
from apdispatch.ap.config import APConfig, ConfigError, load_config
from apdispatch.ap.dispatcher import Dispatcher
from apdispatch.ap.forwarder import Forwarder
from apdispatch.ap.metrics import Stats
from apdispatch.ap.oip_front import OIPServicer, add_oip_to_server
from apdispatch.ap.overload import Overload
from apdispatch.ap.prom import ap_registry
from apdispatch.ap.servicers import DispatcherServicer, RegistryServicer, add_dispatcher_to_server
from apdispatch.common.gc_tuning import settle
from apdispatch.common.lifecycle import Lifecycle, stop_server
from apdispatch.common.logs import is_enabled, make_logger
from apdispatch.common.metrics_http import MetricsServer
from apdispatch.common.protocol import dispatcher_pb2_grpc as pb_grpc
from apdispatch.common.tls import TLSFiles
from apdispatch.learned import NATIVE
from apdispatch.learned.guard_config import parse_guard_overrides
from apdispatch.policies import make_policy, policy_names
from apdispatch.routing.estimator import LatencyEstimator
from apdispatch.routing.outlier import OutlierDetector
from apdispatch.routing.registry import Registry, Worker

# Health is reported for the AP as a whole ("") and for each of its services;
# server reflection lists the same services (a service the AP adds goes here).
# NOT_SERVING from before the port opens until start() completes, and again
# from the first step of a drain. Readiness does not wait for a worker: the
# workers register through the AP's address (a Kubernetes Service only routes
# to ready pods), and an AP without workers answers, with rejections.
HEALTH_SERVICES = (
    "",
    "apdispatch.v1.Dispatcher",
    "apdispatch.v1.Registry",
    "inference.GRPCInferenceService",
)


def reflected_services() -> list[str]:
    """The services server reflection lists: the AP's own, health, reflection itself."""
    own = [name for name in HEALTH_SERVICES if name]
    return [*own, health.SERVICE_NAME, reflection.SERVICE_NAME]


SERVER_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
]


def server_options(config: APConfig) -> list[tuple[str, int]]:
    # gRPC refuses a bigger request with RESOURCE_EXHAUSTED before reading it in.
    return [*SERVER_OPTIONS, ("grpc.max_receive_message_length", config.max_message_bytes)]


class AccessPoint:
    def __init__(self, config: APConfig, log: structlog.typing.FilteringBoundLogger | None = None) -> None:
        self.config = config
        self.log = log or structlog.get_logger()
        self.registry = Registry(lease_s=config.lease_s)
        self.estimator = LatencyEstimator(config.estimator_alpha, config.queue_model)
        # A deployment's checkpoint is resumed from when it is there; the first
        # run starts from the shipped one and creates it.
        self.policy = make_policy(
            config.policy, seed=config.seed, resume_from=config.checkpoint or None, guards=config.guards
        )
        self.tls = TLSFiles(ca=config.tls_ca, cert=config.tls_cert, key=config.tls_key)
        # With a CA the AP presents its own certificate to workers, and checks theirs.
        worker_credentials = self.tls.channel_credentials() if config.tls_ca else None
        self.forwarder = Forwarder(config.forward_mode, self.log, worker_credentials)
        self.stats = Stats()
        tokens = Tokens.load(config.tokens_file) if config.tokens_file else None
        self.gate = Gate(tokens, mtls=bool(config.tls_ca), stats=self.stats)
        self.overload = Overload(config.overload(), time.monotonic)
        self.outlier = OutlierDetector(self.registry, config.outlier(), on_change=self._outlier_changed)
        self.dispatcher = Dispatcher(
            config,
            self.registry,
            self.estimator,
            self.policy,
            self.forwarder,
            self.stats,
            self.log,
            debug=is_enabled("debug", config.log_level),
            limit=self.overload.limit,
            outlier=self.outlier,
        )
        self.server = grpc.aio.server(
            options=server_options(config),
            interceptors=[DispatcherAuth(self.gate)] if tokens is not None else None,
        )
        self.dispatcher_servicer = DispatcherServicer(self.dispatcher, self.overload)
        add_dispatcher_to_server(self.dispatcher_servicer, self.server)
        # The Open Inference Protocol over the same data plane: tritonclient works unchanged.
        self.oip_servicer = OIPServicer(self.dispatcher, self.registry, self.overload, self.gate)
        add_oip_to_server(self.oip_servicer, self.server)
        # grpc.health.v1: "" (the AP as a whole) and each of its services.
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        # Reflection: grpcurl and other generic clients discover the API without the protos.
        reflection.enable_server_reflection(reflected_services(), self.server)
        pb_grpc.add_RegistryServicer_to_server(
            RegistryServicer(
                self.registry, self.estimator, self.forwarder, config.policy, self.log, gate=self.gate
            ),
            self.server,
        )
        self.address = ""
        # Prometheus /metrics on its own port, from a registry of this AP's own.
        host, port = config.listen.rsplit(":", 1)[0], config.metrics_port
        self.metrics = MetricsServer(ap_registry(self), host, port) if port else None
        self.metrics_address = ""
        self._background: list[asyncio.Task[None]] = []
        self._started = False
        self._cut = asyncio.Event()  # a second signal: the drain's notice ends too

    async def start(self) -> str:
        # The servicer starts out with "" SERVING: not before start() completes.
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        host = self.config.listen.rsplit(":", 1)[0]
        try:
            if self.tls.cert:
                port = self.server.add_secure_port(self.config.listen, self.tls.server_credentials())
            else:
                port = self.server.add_insecure_port(self.config.listen)
        except RuntimeError:  # grpcio's way to say the address is taken or not this host's
            port = 0
        if port == 0:
            raise OSError(f"listen: cannot bind {self.config.listen}")
        self.address = f"{host}:{port}"
        await self.server.start()
        self._started = True
        if self.metrics is not None:
            self.metrics_address = self.metrics.start()
            self.log.info("metrics", address=self.metrics_address, path="/metrics")
        loop = asyncio.get_running_loop()
        self._background = [
            loop.create_task(self._expire_leases()),
            loop.create_task(self._summaries()),
            loop.create_task(self._probe_ejected()),
            loop.create_task(self.overload.run()),
        ]
        if self._checkpoint_path() is not None:
            self._background.append(loop.create_task(self._checkpoints()))
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.log.info("serving", address=self.address, policy=self.config.policy, hot_path=NATIVE.reason)
        if self.gate.open and self.tls.cert:
            self.log.warning("TLS without tokens_file or tls_ca: anyone may register workers")
        return self.address

    async def stop(self, grace_s: float | None = None) -> None:
        await self.drain(self.config.shutdown_grace_s if grace_s is None else grace_s)
        await self.close()

    async def drain(self, grace_s: float) -> None:
        """Stop taking calls; those in flight get ``grace_s`` seconds to finish.

        Health turns NOT_SERVING first; open streams stop being read, answer what
        they took and end with UNAVAILABLE: no new work, only what was taken. The
        port stays open ``drain_notice_s`` (from the grace) so that probes see it.
        """
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.dispatcher.draining = True
        self.dispatcher_servicer.drain()
        self.oip_servicer.drain()
        notice_s = min(self.config.drain_notice_s, grace_s)
        if notice_s > 0:
            # The port stays open so that health checks answer NOT_SERVING meanwhile.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cut.wait(), notice_s)
            grace_s -= notice_s
        await self._cancel_background()
        await stop_server(self.server, None if self._cut.is_set() else grace_s)

    async def _set_health(self, status: int) -> None:
        for service in HEALTH_SERVICES:
            await self.health.set(service, status)

    async def cut(self) -> None:
        """End a drain now, its notice included: calls still in flight are cancelled."""
        self._cut.set()
        await stop_server(self.server, None)

    async def close(self) -> None:
        """The shut-down steps, whatever came before (a drain, a cut one, a failed start)."""
        self.dispatcher.draining = True
        await self._cancel_background()
        await stop_server(self.server, None)  # a no-op once drained
        await self.forwarder.close()
        if self.metrics is not None:
            self.metrics.stop()
        # Save first: the learner (a process for the actor-critic) holds the parameters.
        if self._started:
            await self._save_checkpoint()
        await asyncio.to_thread(self.policy.close)
        self.log.info("stopped", requests=self.stats.total, **dict(self.stats.totals))

    async def _cancel_background(self) -> None:
        tasks, self._background = self._background, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _checkpoint_path(self) -> Path | None:
        if self.policy.learns and self.config.checkpoint:
            return Path(self.config.checkpoint)
        return None

    async def _save_checkpoint(self) -> None:
        path = self._checkpoint_path()
        if path is None:
            return
        try:
            written = await asyncio.to_thread(self.policy.save, path)
        except Exception as exc:  # a full disk must not stop the AP
            self.log.error("checkpoint failed", path=str(path), error=repr(exc))
            return
        self.log.info("checkpoint", path=str(written))

    async def _checkpoints(self) -> None:
        while True:
            await asyncio.sleep(self.config.checkpoint_interval_s)
            # A save under way finishes before the task ends: the shut-down's
            # save must not run beside it.
            save = asyncio.ensure_future(self._save_checkpoint())
            try:
                await asyncio.shield(save)
            except asyncio.CancelledError:
                await save
                raise

    async def _expire_leases(self) -> None:
        interval = min(1.0, self.config.lease_s / 4)
        while True:
            await asyncio.sleep(interval)
            for worker in self.registry.expire():
                self.estimator.forget(worker)
                await self.forwarder.drop(worker.address)
                self.log.warning("worker lease expired", worker=worker.worker_id)

    def _outlier_changed(self, worker: Worker, what: str, length_s: float) -> None:
        # "kept": an outlier left in routing, as too many of its task's workers are out.
        level = {"ejected": self.log.warning, "readmitted": self.log.info}.get(what, self.log.debug)
        level(f"worker {what}", worker=worker.worker_id, ejection_s=round(length_s, 3) or None)

    async def _probe_ejected(self) -> None:
        """Probe each ejected worker when its ejection ends (OIP ServerReady): readmitted if ready."""
        timeout_s = self.config.outlier_probe_timeout_ms / 1000.0
        probes: set[asyncio.Task[None]] = set()

        async def probe(worker: Worker) -> None:
            ready = await self.forwarder.probe(worker.address, worker.streaming, timeout_s)
            self.outlier.probed(worker, ready)

        try:
            while True:
                for worker in self.outlier.due():
                    task = asyncio.get_running_loop().create_task(probe(worker))
                    probes.add(task)
                    task.add_done_callback(probes.discard)
                # A new ejection lasts at least the base time: checking a few
                # times within it is soon enough.
                wait = self.outlier.next_due()
                step_s = self.config.outlier_base_ejection_ms / 4000.0
                await asyncio.sleep(min(wait if wait is not None else step_s, step_s))
        finally:
            for task in list(probes):
                task.cancel()

    async def _summaries(self) -> None:
        while True:
            await asyncio.sleep(self.config.summary_interval_s)
            summary = self.stats.roll()
            if summary["requests"]:
                limit = self.overload.limit
                self.log.info(
                    "summary",
                    workers=len(self.registry.workers()),
                    loop_lag_ms=round(self.overload.lag.lag_s * 1000.0, 3),
                    in_flight_limit=limit.limit,
                    shed=limit.shed,
                    **summary,
                )

    async def __aenter__(self) -> AccessPoint:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(grace_s=0.5)


async def serve(config: APConfig, log: structlog.typing.FilteringBoundLogger) -> bool:
    """Serve until a signal; False when a second signal cut the drain short."""
    ap = AccessPoint(config, log)

    def notify(sig: signal.Signals, forced: bool) -> None:
        if forced:
            log.warning("second signal, cutting the grace period short", signal=sig.name)
        else:
            log.info("shutting down", signal=sig.name, grace_s=config.shutdown_grace_s)

    async def startup() -> None:
        await ap.start()
        # A process-wide setting, so here and not in AccessPoint (tests run several in one process).
        threshold, frozen = settle(config.gc_young_threshold)
        log.info("gc settled", young_threshold=threshold, frozen_objects=frozen)

    return await Lifecycle(notify=notify).run(
        startup=startup,
        drain=ap.drain,
        cut=ap.cut,
        shutdown=ap.close,
        grace_s=config.shutdown_grace_s,
    )


def main(args: argparse.Namespace) -> int:
    try:
        config = load_config(
            Path(args.config) if args.config else None,
            listen=args.listen,
            policy=args.policy,
            log_level=args.log_level,
            log_format=args.log_format,
            checkpoint=getattr(args, "checkpoint", None),
            checkpoint_interval_s=getattr(args, "checkpoint_interval_s", None),
            guards=parse_guard_overrides(getattr(args, "guard", None)) or None,
            tls_cert=getattr(args, "tls_cert", None),
            tls_key=getattr(args, "tls_key", None),
            tls_ca=getattr(args, "tls_ca", None),
            tokens_file=getattr(args, "tokens_file", None),
            metrics_port=getattr(args, "metrics_port", None),
            cascade=getattr(args, "cascade", None),
        )
        if config.policy not in policy_names():
            known = ", ".join(policy_names())
            raise ConfigError(f"policy: unknown policy {config.policy!r} (known: {known})")
    except ValueError as exc:  # ConfigError, and a --guard that is not KEY=VALUE
        print(f"apdispatch serve: {exc}", file=sys.stderr)
        return 2
    try:
        log = make_logger(config.log_level, config.log_format)
    except ValueError as exc:  # an unknown log level
        print(f"apdispatch serve: log_level: {exc}", file=sys.stderr)
        return 2
    try:
        graceful = asyncio.run(serve(config, log))
    except OSError as exc:
        log.error("cannot serve", error=str(exc))
        return 1
    return 0 if graceful else 1
