"""One config object per worker process, filled from the command line."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from workers.runtime import ServiceTime


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    kind: str  # "edge" or "cloud"
    listen: str  # host:port to serve the Open Inference Protocol on; port 0 = any free port
    models: Path  # model zoo folder (holds manifest.json)
    variants: tuple[str, ...]  # variant names to load from the manifest
    ap: str | None = None  # AP registry address host:port; None = do not register
    cluster: str = "default"
    slots: int = 1  # requests run at once; more wait in the queue
    # Emulation, so that one machine can host a heterogeneous topology:
    # slowdown multiplies every compute time (a slower device), link_delay_ms
    # is a round trip added to every request (half before, half after).
    slowdown: float = 1.0
    link_delay_ms: float = 0.0
    # Per variant, a fixed time each execution holds its slot (the device's
    # speed independent of this machine's); replaces slowdown for those variants.
    service_ms: Mapping[str, ServiceTime] = field(default_factory=dict)
    worker_id: str | None = None  # default: "<kind>-<cluster>-<port>"
    advertise: str | None = None  # address announced to the AP (default: the bound one)
    heartbeat_s: float = 1.0
    # Cloud only: dynamic batching.
    max_batch_size: int = 8
    max_wait_ms: float = 2.0
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"
    shutdown_grace_s: float = 5.0
    # Security, all empty for plaintext: tls_cert + tls_key serve OIP over TLS; tls_ca asks
    # the AP for its certificate (mutual TLS) and checks the AP's; the same files are
    # presented to the AP's Registry. ap_token: a worker token of the AP's tokens file.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    ap_token: str = ""
    metrics_port: int = 0  # Prometheus /metrics on this port, on the listen address's host; 0: none
