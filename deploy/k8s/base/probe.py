"""Kubernetes exec probe: one gRPC health call over mutual TLS; exit 0 when serving.

The kubelet's own gRPC probe speaks plaintext only, and the AP and workers
here ask every caller for a certificate, so the probe runs inside the pod
with the pod's own certificate (its SANs name localhost).

    python probe.py --address localhost:50051 --service apdispatch.v1.Dispatcher
    python probe.py --address localhost:8001 --oip      # a worker: OIP ServerReady

Exit status: 0 serving, 1 not serving or no answer, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _credentials(tls_dir: Path) -> grpc.ChannelCredentials:
    # The layout of a kubernetes.io/tls Secret with its CA (as cert-manager writes it).
    return grpc.ssl_channel_credentials(
        root_certificates=(tls_dir / "ca.crt").read_bytes(),
        private_key=(tls_dir / "tls.key").read_bytes(),
        certificate_chain=(tls_dir / "tls.crt").read_bytes(),
    )


def probe(address: str, tls_dir: Path | None, service: str, oip: bool, timeout_s: float) -> tuple[bool, str]:
    """Whether the server at ``address`` is serving, and what it said."""
    channel = (
        grpc.secure_channel(address, _credentials(tls_dir))
        if tls_dir is not None
        else grpc.insecure_channel(address)
    )
    with channel:
        try:
            if oip:
                from apdispatch.common.protocol import oip_pb2, oip_pb2_grpc

                stub = oip_pb2_grpc.GRPCInferenceServiceStub(channel)
                ready = stub.ServerReady(oip_pb2.ServerReadyRequest(), timeout=timeout_s).ready
                return ready, f"ready={ready}"
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="host:port (a name in the certificate's SANs)")
    parser.add_argument(
        "--tls-dir", type=Path, default=Path("/etc/apdispatch/tls"), help="tls.crt, tls.key, ca.crt"
    )
    parser.add_argument("--plaintext", action="store_true", help="no TLS (local development)")
    parser.add_argument("--service", default="", help="grpc.health.v1 service name ('' = the whole server)")
    parser.add_argument("--oip", action="store_true", help="ask OIP ServerReady instead of grpc.health.v1")
    parser.add_argument("--timeout-s", type=float, default=3.0)
    args = parser.parse_args(argv)
    ok, said = probe(
        args.address, None if args.plaintext else args.tls_dir, args.service, args.oip, args.timeout_s
    )
    print(f"{args.address}: {said}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
