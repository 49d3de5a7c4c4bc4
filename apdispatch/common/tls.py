"""TLS credentials and bearer tokens, shared by the AP, its workers and the SDK.

Plaintext is what every function gives when no file is named: local
development keeps working unchanged. A server given a CA asks every caller
for a certificate signed by it (mutual TLS); a client given a CA checks the
server's certificate against it, and presents its own when it has one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

AUTHORIZATION = "authorization"


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise OSError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """PEM files: ``ca`` to check the other side, ``cert`` + ``key`` to present."""

    ca: str = ""
    cert: str = ""
    key: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("a certificate and its key go together: give both or neither")

    @property
    def enabled(self) -> bool:
        return bool(self.ca or self.cert)

    def server_credentials(self) -> grpc.ServerCredentials:
        """A server's credentials; with ``ca``, callers must present a certificate it signed."""
        if not self.cert:
            raise ValueError("a TLS server needs a certificate and its key")
        pair = (_read(self.key, "key"), _read(self.cert, "certificate"))
        if self.ca:
            return grpc.ssl_server_credentials(
                [pair], root_certificates=_read(self.ca, "CA"), require_client_auth=True
            )
        return grpc.ssl_server_credentials([pair])

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """A client's credentials: the server checked against ``ca`` (else the system's roots)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA") if self.ca else None,
            private_key=_read(self.key, "key") if self.key else None,
            certificate_chain=_read(self.cert, "certificate") if self.cert else None,
        )


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token``."""
    return ((AUTHORIZATION, f"Bearer {token}"),)


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry; None when there is none."""
    for key, value in metadata or ():
        if key == AUTHORIZATION:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def _with_token(details: Any, token: str) -> Any:
    metadata = [(k, v) for k, v in (details.metadata or ()) if k != AUTHORIZATION]
    metadata.extend(bearer(token))
    return details._replace(metadata=metadata)


class _AioUnaryToken(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the bearer token to every unary call of a ``grpc.aio`` channel."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._token), request)


# A separate class: a grpc.aio channel files each interceptor under its first
# matching kind only.
class _AioStreamToken(grpc.aio.StreamStreamClientInterceptor):
    """Adds the bearer token to every stream of a ``grpc.aio`` channel."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_token(details, self._token), request_iterator)


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the bearer token to every call of a blocking channel."""

    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_with_token(details, self._token), request)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(_with_token(details, self._token), request_iterator)


def aio_channel(
    address: str,
    tls: TLSFiles | None = None,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel: TLS when ``tls`` names files, the token on every call when given."""
    interceptors: list[Any] | None = [_AioUnaryToken(token), _AioStreamToken(token)] if token else None
    if tls is not None and tls.enabled:
        return grpc.aio.secure_channel(
            address, tls.channel_credentials(), options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def sync_channel(
    address: str,
    tls: TLSFiles | None = None,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
) -> grpc.Channel:
    """A blocking channel: TLS when ``tls`` names files, the token on every call when given."""
    if tls is not None and tls.enabled:
        channel = grpc.secure_channel(address, tls.channel_credentials(), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, _SyncToken(token)) if token else channel


@dataclass(frozen=True, slots=True)
class PeerCert:
    """What a verified client certificate says: its subject's common name and role (OU)."""

    common_name: str
    role: str
    subject: str


def peer_cert(context: grpc.aio.ServicerContext) -> PeerCert | None:
    """The caller's verified certificate, or None on a plaintext or server-only TLS call."""
    auth = context.auth_context()
    subject = _first(auth.get("x509_subject"))
    common_name = _first(auth.get("x509_common_name"))
    if not subject and not common_name:
        return None
    role = ""
    for part in _split_dn(subject):
        key, _, value = part.partition("=")
        if key.strip().upper() == "OU":
            role = value.strip()
    return PeerCert(common_name=common_name, role=role, subject=subject or f"CN={common_name}")


def _first(values: Sequence[bytes] | None) -> str:
    return values[0].decode("utf-8", "replace") if values else ""


def _split_dn(subject: str) -> list[str]:
    """RFC 2253 parts, commas escaped by a backslash kept inside their part."""
    parts, current, escaped = [], [], False
    for ch in subject:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            current.append(ch)
            escaped = True
        elif ch == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts
