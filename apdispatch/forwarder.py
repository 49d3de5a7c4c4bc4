"""Sends a request to a worker over the Open Inference Protocol and waits for the reply.

Two transports, per worker:

- ``stream``: one long-lived ModelStreamInfer call (Triton's streaming
  extension) carries every request to that worker; replies are matched by id.
  Per request this costs a message on an open stream instead of a whole unary
  call, which in Python gRPC is most of the AP's overhead. The time left
  travels as Triton's ``timeout`` parameter (microseconds).
- ``unary``: one ModelInfer per request, the time left as the gRPC deadline;
  works with any OIP server.

Tensor bytes are passed through as ``raw_input_contents`` untouched.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import grpc
import structlog

from apdispatch.errors import ApdispatchError, InvalidRequestError, NotFoundError, UnavailableError
from apdispatch.protocol import oip_pb2, oip_pb2_grpc

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
]


class DeadlineReached(Exception):
    """The worker did not answer before the request's deadline."""


def _worker_error(address: str, code: grpc.StatusCode, details: str) -> ApdispatchError:
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError("inputs", details)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(f"variant: {details}")
    return UnavailableError(f"worker {address}: {code.name}: {details}")


class WorkerLink:
    """The AP's connection to one worker."""

    def __init__(self, address: str, streaming: bool, log: structlog.typing.FilteringBoundLogger) -> None:
        self.address = address
        self.streaming = streaming
        self._log = log.bind(worker_address=address)
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = oip_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._ids = itertools.count()
        self._pending: dict[str, asyncio.Future[oip_pb2.ModelInferResponse]] = {}
        self._outbox: asyncio.Queue[oip_pb2.ModelInferRequest | None] | None = None
        self._reader: asyncio.Task[None] | None = None

    async def infer(self, request: oip_pb2.ModelInferRequest, timeout_s: float) -> oip_pb2.ModelInferResponse:
        """Send ``request`` (its id is set here) and return the reply.

        Raises DeadlineReached when ``timeout_s`` passes first, an
        ApdispatchError when the worker answers with an error.
        """
        request.id = str(next(self._ids))
        if self.streaming:
            return await self._infer_stream(request, timeout_s)
        try:
            reply: oip_pb2.ModelInferResponse = await self._stub.ModelInfer(request, timeout=timeout_s)
            return reply
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineReached from None
            raise _worker_error(self.address, exc.code(), exc.details() or "") from None

    async def _infer_stream(
        self, request: oip_pb2.ModelInferRequest, timeout_s: float
    ) -> oip_pb2.ModelInferResponse:
        if self._reader is None:
            self._open_stream()
        assert self._outbox is not None
        request.parameters["timeout"].int64_param = max(1, int(timeout_s * 1e6))
        future: asyncio.Future[oip_pb2.ModelInferResponse] = asyncio.get_running_loop().create_future()
        self._pending[request.id] = future
        self._outbox.put_nowait(request)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise DeadlineReached from None
        finally:
            self._pending.pop(request.id, None)

    def _open_stream(self) -> None:
        outbox: asyncio.Queue[oip_pb2.ModelInferRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[oip_pb2.ModelInferRequest]:
            while (item := await outbox.get()) is not None:
                yield item

        call = self._stub.ModelStreamInfer(requests())
        self._outbox = outbox
        self._reader = asyncio.get_running_loop().create_task(self._read(call, outbox))

    async def _read(
        self,
        call: grpc.aio.StreamStreamCall,
        outbox: asyncio.Queue[oip_pb2.ModelInferRequest | None],
    ) -> None:
        error: ApdispatchError = UnavailableError(f"worker {self.address}: stream closed")
        try:
            async for reply in call:
                inner = reply.infer_response
                future = self._pending.get(inner.id)
                if future is None or future.done():
                    continue  # its requester already gave up (deadline)
                if reply.error_message:
                    future.set_exception(UnavailableError(f"worker {self.address}: {reply.error_message}"))
                else:
                    future.set_result(inner)
        except grpc.aio.AioRpcError as exc:
            error = _worker_error(self.address, exc.code(), exc.details() or "")
            self._log.warning("worker stream broke", code=exc.code().name, details=exc.details())
        except asyncio.CancelledError:
            pass
        finally:
            # Whatever was waiting on this stream fails now; the next request
            # opens a new one.
            if self._outbox is outbox:
                self._outbox = None
                self._reader = None
            outbox.put_nowait(None)
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)

    async def close(self) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
        await self._channel.close()


class Forwarder:
    """Keeps one WorkerLink per worker address."""

    def __init__(self, mode: str, log: structlog.typing.FilteringBoundLogger) -> None:
        self._mode = mode
        self._log = log
        self._links: dict[str, WorkerLink] = {}

    def link(self, address: str, streaming: bool) -> WorkerLink:
        link = self._links.get(address)
        if link is None:
            link = WorkerLink(address, streaming and self._mode == "stream", self._log)
            self._links[address] = link
        return link

    async def drop(self, address: str) -> None:
        link = self._links.pop(address, None)
        if link is not None:
            await link.close()

    async def close(self) -> None:
        links, self._links = self._links, {}
        await asyncio.gather(*(link.close() for link in links.values()), return_exceptions=True)
