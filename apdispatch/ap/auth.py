"""Who may call the AP, and how often: tokens, certificate roles, per-app rate limits.

One ``Gate`` per AP decides every refusal:

- Dispatcher calls: with a tokens file, each call carries
  ``authorization: Bearer <token>`` of a token with role ``app``; none, or an
  unknown one, is UNAUTHENTICATED. A request naming another app than its
  token's is PERMISSION_DENIED; a request naming no app gets its token's. An
  app over its rate limit (token bucket) is RESOURCE_EXHAUSTED and counted
  ``rejected``; on a stream that is one error reply and the stream goes on.
- Register, Heartbeat, Deregister: a client certificate with role (OU)
  ``worker`` (mutual TLS), or a token with role ``worker``. The identity that
  registered a worker id owns it (see ``Registry``).
- ListWorkers: a certificate or token with role ``operator``.

With neither a tokens file nor a CA the AP is open, as in local development.

The tokens file (TOML), one ``[[token]]`` table per token::

    [[token]]
    token = "a long random string"
    app = "camera"      # role "app" (the default): may send requests as this app
    rate = 50.0         # optional: requests/s for this app, over all its tokens
    burst = 100         # optional: the bucket's size (default: max(1, rate))

    [[token]]
    token = "another"
    role = "worker"     # or "operator"
    name = "edge-a"     # the identity it registers workers under
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from apdispatch.ap.metrics import Stats
from apdispatch.common.errors import (
    ApdispatchError,
    PermissionDeniedError,
    RejectedError,
    UnauthenticatedError,
)
from apdispatch.common.outcomes import Outcome
from apdispatch.common.protocol import dispatcher_pb2 as pb
from apdispatch.common.tls import bearer_token, peer_cert

APP, WORKER, OPERATOR = "app", "worker", "operator"
ROLES = (APP, WORKER, OPERATOR)
DISPATCHER_PREFIX = "/apdispatch.v1.Dispatcher/"


class TokensFileError(ValueError):
    """A tokens file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class TokenEntry:
    role: str
    name: str  # the app's name for role "app"; an identity otherwise
    rate: float | None = None  # requests/s, role "app" only
    burst: float | None = None


def _digest(token: str) -> bytes:
    # Looked up by hash: the secret itself is never compared byte by byte.
    return hashlib.sha256(token.encode()).digest()


class Tokens:
    """The tokens file, read once; tokens are kept as SHA-256 digests."""

    def __init__(self, entries: dict[str, TokenEntry]) -> None:
        self._by_digest = {_digest(token): entry for token, entry in entries.items()}
        self.rates: dict[str, tuple[float, float]] = {}
        for entry in entries.values():
            if entry.role == APP and entry.rate is not None:
                burst = entry.burst if entry.burst is not None else max(1.0, entry.rate)
                self.rates[entry.name] = (entry.rate, burst)

    def lookup(self, token: str) -> TokenEntry | None:
        return self._by_digest.get(_digest(token))

    @classmethod
    def load(cls, path: str | Path) -> Tokens:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise TokensFileError(f"tokens_file: {path}: {exc}") from None
        tables = doc.get("token")
        if not isinstance(tables, list) or not tables:
            raise TokensFileError(f"tokens_file: {path}: no [[token]] tables")
        entries: dict[str, TokenEntry] = {}
        rates: dict[str, tuple[float | None, float | None]] = {}
        for i, table in enumerate(tables):
            where = f"tokens_file: {path}: token[{i}]"
            unknown = sorted(set(table) - {"token", "role", "app", "name", "rate", "burst"})
            if unknown:
                raise TokensFileError(f"{where}: unknown keys {', '.join(unknown)}")
            token = table.get("token")
            if not isinstance(token, str) or len(token) < 8:
                raise TokensFileError(f"{where}.token: a string of at least 8 characters is needed")
            if token in entries:
                raise TokensFileError(f"{where}.token: given twice")
            role = table.get("role", APP)
            if role not in ROLES:
                raise TokensFileError(f"{where}.role: must be one of {', '.join(ROLES)}, got {role!r}")
            name = table.get("app" if role == APP else "name")
            if not isinstance(name, str) or not name:
                key = "app" if role == APP else "name"
                raise TokensFileError(f"{where}.{key}: a non-empty string is needed")
            rate, burst = table.get("rate"), table.get("burst")
            for key, value in (("rate", rate), ("burst", burst)):
                if value is None:
                    continue
                if role != APP:
                    raise TokensFileError(f"{where}.{key}: only tokens of role 'app' have a rate limit")
                if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                    raise TokensFileError(f"{where}.{key}: must be a number > 0, got {value!r}")
            if role == APP and name in rates and rates[name] != (rate, burst):
                raise TokensFileError(f"{where}: app {name!r} has another rate limit on an earlier token")
            if role == APP:
                rates[name] = (rate, burst)
            entries[token] = TokenEntry(
                role=role,
                name=name,
                rate=None if rate is None else float(rate),
                burst=None if burst is None else float(burst),
            )
        return cls(entries)


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; a request takes one."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Gate:
    def __init__(
        self,
        tokens: Tokens | None,
        mtls: bool,
        stats: Stats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tokens = tokens
        self.mtls = mtls
        self._stats = stats
        self._buckets = {
            app: TokenBucket(rate, burst, clock)
            for app, (rate, burst) in (tokens.rates if tokens else {}).items()
        }

    @property
    def open(self) -> bool:
        """No credential is asked for: local development."""
        return self.tokens is None and not self.mtls

    def _token(self, metadata: Sequence[tuple[str, Any]] | None) -> TokenEntry | None:
        token = bearer_token(metadata)
        if token is None or self.tokens is None:
            return None
        entry = self.tokens.lookup(token)
        if entry is None:
            raise UnauthenticatedError("unknown bearer token")
        return entry

    # -- Dispatcher --------------------------------------------------------

    def app(self, metadata: Sequence[tuple[str, Any]] | None) -> TokenEntry | None:
        """The calling app's token; None when the AP has no tokens file (nothing to check)."""
        if self.tokens is None:
            return None
        if bearer_token(metadata) is None:
            raise UnauthenticatedError("missing credential: send 'authorization: Bearer <token>'")
        entry = self._token(metadata)
        assert entry is not None
        if entry.role != APP:
            raise PermissionDeniedError(f"a token of role {entry.role!r} cannot send requests")
        return entry

    def admit(self, entry: TokenEntry, request: pb.InferRequest) -> ApdispatchError | None:
        """None when ``request`` may go on (its app set from the token); else the refusal."""
        if request.app and request.app != entry.name:
            return PermissionDeniedError(
                f"app: the token is for app {entry.name!r}, not {request.app[:64]!r}",
                request_id=request.request_id,
            )
        request.app = entry.name
        bucket = self._buckets.get(entry.name)
        if bucket is not None and not bucket.take():
            if self._stats is not None:
                self._stats.record(Outcome.REJECTED, entry.name, 0.0, error="rate limit")
            return RejectedError(
                f"app {entry.name!r} is over its rate limit of {bucket.rate:g} requests/s",
                request_id=request.request_id,
            )
        return None

    # -- Registry ----------------------------------------------------------

    def _role(self, context: grpc.aio.ServicerContext, role: str, what: str) -> str:
        cert = peer_cert(context) if self.mtls else None
        if cert is not None and cert.role == role:
            return f"cert:{cert.subject}"
        entry = self._token(context.invocation_metadata())
        if entry is not None:
            if entry.role == role:
                return f"token:{entry.name}"
            raise PermissionDeniedError(f"{what} needs role {role!r}; the token has role {entry.role!r}")
        if cert is not None:
            raise PermissionDeniedError(
                f"{what} needs role {role!r}; the certificate has role {cert.role or '(none)'!r}"
            )
        if self.open:
            return ""
        raise UnauthenticatedError(f"{what} needs a {role} certificate or a {role} token")

    def worker(self, context: grpc.aio.ServicerContext, what: str) -> str:
        """The calling worker's identity ("" on an open AP); raises when it is none."""
        return self._role(context, WORKER, what)

    def operator(self, context: grpc.aio.ServicerContext, what: str) -> None:
        self._role(context, OPERATOR, what)


def _refusal_reply(exc: ApdispatchError) -> pb.InferResponse:
    outcome = pb.REJECTED if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED else pb.FAILED
    return pb.InferResponse(
        request_id=exc.request_id, outcome=outcome, status_code=exc.code.value[0], error=exc.message
    )


class DispatcherAuth(grpc.aio.ServerInterceptor):
    """Applies the Gate to the Dispatcher's calls, before the servicer sees a request."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(DISPATCHER_PREFIX):
            return handler
        metadata = details.invocation_metadata
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, metadata))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=self._stream(handler.stream_stream, metadata))
        return handler

    def _unary(self, behavior: Any, metadata: Any) -> Any:
        gate = self._gate

        async def infer(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                entry = gate.app(metadata)
                if entry is not None and isinstance(request, pb.InferRequest):
                    refusal = gate.admit(entry, request)
                    if refusal is not None:
                        raise refusal
            except ApdispatchError as exc:
                await context.abort(exc.code, exc.message)
            return await behavior(request, context)

        return infer

    def _stream(self, behavior: Any, metadata: Any) -> Any:
        gate = self._gate

        async def infer_stream(
            request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            try:
                entry = gate.app(metadata)
            except ApdispatchError as exc:
                await context.abort(exc.code, exc.message)
            if entry is None:
                async for reply in behavior(request_iterator, context):
                    yield reply
                return
            # Refusals and the servicer's replies share one small queue: a
            # client that does not read stalls both, as it stalls the servicer.
            done = object()
            out: asyncio.Queue[Any] = asyncio.Queue(maxsize=16)

            async def admitted() -> AsyncIterator[Any]:
                async for request in request_iterator:
                    if isinstance(request, pb.InferRequest):
                        refusal = gate.admit(entry, request)
                        if refusal is not None:
                            await out.put(_refusal_reply(refusal))
                            continue
                    yield request

            failure: list[BaseException] = []

            async def pump() -> None:
                try:
                    async for reply in behavior(admitted(), context):
                        await out.put(reply)
                except Exception as exc:  # handed to the call below
                    failure.append(exc)
                await out.put(done)

            task = asyncio.get_running_loop().create_task(pump())
            try:
                while (reply := await out.get()) is not done:
                    yield reply
                if failure:
                    raise failure[0]
            finally:
                task.cancel()

        return infer_stream
