"""``/metrics`` over HTTP for one Prometheus registry, shared by the AP and the workers."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


class MetricsServer:
    """``/metrics`` for one registry, in a daemon thread; ``port`` 0 picks a free one."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        # An empty host listens everywhere, as the gRPC port does; "[::1]" is "::1" here.
        addr = self.host.strip("[]") or "0.0.0.0"
        self._httpd, self._thread = start_http_server(self.port, addr=addr, registry=self.registry)
        self.port = self._httpd.server_port
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
