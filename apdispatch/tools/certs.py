"""``apdispatch certs``: a development CA and the certificates of a deployment.

Writes into ``--out``:

- ``ca.pem`` / ``ca-key.pem``: the CA every party trusts (keep the key private);
- ``ap.pem`` / ``ap-key.pem``: the AP's server certificate, also a client
  certificate for the AP's mutual TLS to its workers;
- ``worker.pem`` / ``worker-key.pem``: a worker's certificate, server (it serves
  OIP to the AP) and client (it calls the AP's Registry);
- ``worker-NAME.pem`` / ``worker-NAME-key.pem`` for each ``--workers`` NAME: one
  worker's own certificate (CN apdispatch-worker-NAME, NAME among its hosts),
  so that each worker is an identity of its own and owns the ids it registers;
- ``operator.pem`` / ``operator-key.pem``: for ListWorkers;
- ``client.pem`` / ``client-key.pem``: for applications when the AP asks every
  caller for a certificate (``tls_ca`` set).

The role travels as the subject's organizational unit (OU=worker, operator,
client, ap); the AP reads it to decide what a caller may do. Server
certificates name localhost, 127.0.0.1 and ::1 plus ``--hosts``. For
development and tests: a production CA keeps its key offline.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ORGANIZATION = "apdispatch"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


def _name(common_name: str, role: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # in order, once each
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_certs(
    out: Path, hosts: Sequence[str] = (), days: int = 365, workers: Sequence[str] = ()
) -> dict[str, Path]:
    """Write the CA and every certificate into ``out``; returns the paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("apdispatch development CA", "ca")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": out / "ca.pem", "ca-key": out / "ca-key.pem"}
    _write(paths["ca"], ca.public_bytes(serialization.Encoding.PEM))
    _write(paths["ca-key"], _key_pem(ca_key), private=True)

    server_hosts = [*DEFAULT_HOSTS, *hosts]
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    leaves = {
        # name: (common name, role, extended key usages, SAN hosts)
        "ap": ("apdispatch-ap", "ap", both, server_hosts),
        "worker": ("apdispatch-worker", "worker", both, server_hosts),
        "operator": ("apdispatch-operator", "operator", [ExtendedKeyUsageOID.CLIENT_AUTH], []),
        "client": ("apdispatch-client", "client", [ExtendedKeyUsageOID.CLIENT_AUTH], []),
    }
    for worker in workers:
        leaves[f"worker-{worker}"] = (f"apdispatch-worker-{worker}", "worker", both, [*server_hosts, worker])
    for leaf, (common_name, role, usages, san_hosts) in leaves.items():
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, role))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if san_hosts:
            builder = builder.add_extension(_san(san_hosts), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        paths[leaf] = out / f"{leaf}.pem"
        paths[f"{leaf}-key"] = out / f"{leaf}-key.pem"
        _write(paths[leaf], cert.public_bytes(serialization.Encoding.PEM))
        _write(paths[f"{leaf}-key"], _key_pem(key), private=True)
    return paths


def main(args: argparse.Namespace) -> int:
    hosts = [h.strip() for h in (args.hosts or "").split(",") if h.strip()]
    workers = [w.strip() for w in (getattr(args, "workers", "") or "").split(",") if w.strip()]
    paths = make_certs(Path(args.out), hosts, days=args.days, workers=workers)
    for name, path in paths.items():
        print(f"{name:14} {path}")
    return 0
