"""The worker's side of the AP's ``apdispatch.v1.Registry``: register, heartbeat, deregister.

Runs as one background task on the worker's event loop, over one grpc.aio
channel. The worker serves whether or not the AP is there: an unreachable AP is
retried with capped exponential backoff, forever, and never crashes the worker.
A heartbeat answered ``known=false`` (the AP restarted or dropped the lease)
and a failed heartbeat both lead back to ``Register``, which the AP treats as
idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from structlog.typing import FilteringBoundLogger

from apdispatch.common.manifest import Variant
from apdispatch.common.protocol import dispatcher_pb2 as dpb
from apdispatch.common.protocol import dispatcher_pb2_grpc as dpb_grpc
from apdispatch.common.tls import TLSFiles, aio_channel


@dataclass(frozen=True)
class Announced:
    """One variant as a worker announces it: what one execution costs there, at batch 1 and 8."""

    variant: Variant
    latency_ms: float
    latency_ms_batch8: float
    max_batch_size: int


def register_request(
    *,
    worker_id: str,
    address: str,
    cluster: str,
    kind: str,
    slots: int,
    variants: Sequence[Announced],
    link_delay_ms: float = 0.0,
    streaming: bool = True,
) -> dpb.RegisterRequest:
    """The ``Register`` call for a worker: ours, or any OIP server registered on its behalf."""
    return dpb.RegisterRequest(
        worker_id=worker_id,
        address=address,
        cluster=cluster,
        kind=kind,
        slots=slots,
        link_delay_ms=link_delay_ms,
        streaming=streaming,
        variants=[
            dpb.VariantInfo(
                name=a.variant.name,
                task=a.variant.task,
                accuracy=a.variant.accuracy,
                latency_ms=a.latency_ms,
                latency_ms_batch8=a.latency_ms_batch8,
                inputs=[s.to_proto() for s in a.variant.inputs],
                outputs=[s.to_proto() for s in a.variant.outputs],
                max_batch_size=a.max_batch_size,
                acceptance=[dpb.Acceptance(**e.to_json()) for e in a.variant.acceptance],
            )
            for a in variants
        ],
    )


class Registrar:
    def __init__(
        self,
        ap: str,
        request: dpb.RegisterRequest,
        log: FilteringBoundLogger,
        *,
        heartbeat_s: float = 1.0,
        rpc_timeout_s: float = 2.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float | None = None,
        tls: TLSFiles | None = None,
        token: str | None = None,
    ) -> None:
        self.ap = ap
        self._tls = tls  # TLS (mutual with a cert) to the AP; None: plaintext
        self._token = token  # a worker token, sent on every call
        self.request = request
        self.heartbeat_s = heartbeat_s
        self.rpc_timeout_s = rpc_timeout_s
        self.backoff_initial_s = backoff_initial_s
        # A restarted AP must find its workers again within a heartbeat: neither
        # the retries nor gRPC's reconnection may wait longer than that.
        self.backoff_max_s = heartbeat_s if backoff_max_s is None else backoff_max_s
        reconnect_ms = max(100, int(self.backoff_max_s * 1000))
        self.channel_options: list[tuple[str, int]] = [
            ("grpc.initial_reconnect_backoff_ms", min(100, reconnect_ms)),
            ("grpc.min_reconnect_backoff_ms", min(100, reconnect_ms)),
            ("grpc.max_reconnect_backoff_ms", reconnect_ms),
        ]
        self._log = log.bind(ap=ap)
        self._channel: grpc.aio.Channel | None = None
        self._stub: dpb_grpc.RegistryStub | None = None
        self._task: asyncio.Task[None] | None = None
        # Set while the AP holds a lease for this worker, as far as it knows.
        self.registered = asyncio.Event()
        self.registrations = 0  # successful Register calls so far

    @property
    def worker_id(self) -> str:
        return self.request.worker_id

    def start(self) -> None:
        if self._task is not None:
            return
        self._channel = aio_channel(self.ap, self._tls, self._token, options=self.channel_options)
        self._stub = dpb_grpc.RegistryStub(self._channel)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="registrar")

    async def stop(self, *, deregister: bool = True) -> None:
        """Stop heartbeating and, when the AP knows this worker, deregister (best effort)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if deregister and self._stub is not None and self.registrations > 0:
            try:
                await self._stub.Deregister(
                    dpb.DeregisterRequest(worker_id=self.worker_id),
                    timeout=min(1.0, self.rpc_timeout_s),
                )
                self._log.info("deregistered", worker_id=self.worker_id)
            except grpc.aio.AioRpcError as err:
                self._log.warning("deregister_failed", code=err.code().name, error=err.details())
        self.registered.clear()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    async def _run(self) -> None:
        assert self._stub is not None
        stub = self._stub
        backoff = self.backoff_initial_s
        failures = 0
        lease_s = 0.0
        while True:
            if not self.registered.is_set():
                try:
                    reply = await stub.Register(self.request, timeout=self.rpc_timeout_s)
                except grpc.aio.AioRpcError as err:
                    failures += 1
                    # Loud once, then quiet: the AP may simply not be up yet.
                    level = self._log.warning if failures == 1 else self._log.debug
                    level(
                        "register_failed",
                        code=err.code().name,
                        error=err.details(),
                        retry_in_s=round(backoff, 3),
                        failures=failures,
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.backoff_max_s)
                    continue
                lease_s = reply.lease_s
                self.registrations += 1
                self.registered.set()
                backoff = self.backoff_initial_s
                self._log.info(
                    "registered",
                    worker_id=self.worker_id,
                    lease_s=lease_s,
                    after_failures=failures,
                )
                failures = 0
            # Heartbeat well within the lease, whatever heartbeat_s says.
            interval = self.heartbeat_s
            if lease_s > 0:
                interval = min(interval, lease_s / 3)
            await asyncio.sleep(interval)
            try:
                beat = await stub.Heartbeat(
                    dpb.HeartbeatRequest(worker_id=self.worker_id), timeout=self.rpc_timeout_s
                )
            except grpc.aio.AioRpcError as err:
                self._log.warning("heartbeat_failed", code=err.code().name, error=err.details())
                self.registered.clear()
                continue
            if beat.lease_s > 0:
                lease_s = beat.lease_s
            if not beat.known:
                self._log.info("lease_lost", worker_id=self.worker_id)
                self.registered.clear()
