"""One client stream of requests, as both stream APIs of the AP serve it.

``Dispatcher/InferStream`` and the OIP front's ``ModelStreamInfer`` differ only in
how a message becomes a request and a result becomes a reply. What they share
is here: replies go out in completion order, one per message; a client that
does not read its replies stops being read once ``max_pending`` of them wait,
so that gRPC's flow control holds its requests back; and when the AP drains,
the stream stops being read, answers what it took and ends with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import grpc

from apdispatch.ap.metrics import Stats

Request = TypeVar("Request")
Result = TypeVar("Result")
Reply = TypeVar("Reply")


async def serve_stream(
    requests: AsyncIterator[Request],
    take: Callable[[Request, Callable[[Result], None]], None],
    to_reply: Callable[[Result], Reply],
    *,
    context: grpc.aio.ServicerContext,
    stats: Stats,
    max_pending: int,
    draining: asyncio.Event,
) -> AsyncIterator[Reply]:
    """The stream's replies; ``take(request, answer)`` must call ``answer`` once per request."""
    loop = asyncio.get_running_loop()
    replies: asyncio.Queue[Reply | None] = asyncio.Queue()
    outstanding = 0  # taken, not answered yet
    pending = 0  # read, and the reply not yet handed to gRPC
    room = asyncio.Event()
    room.set()
    reading = True

    def answer(result: Result) -> None:
        nonlocal outstanding
        outstanding -= 1
        replies.put_nowait(to_reply(result))
        if not reading and outstanding == 0:
            replies.put_nowait(None)

    async def read_all() -> None:
        nonlocal outstanding, pending, reading
        try:
            async for request in requests:
                outstanding += 1
                pending += 1
                stats.stream_pending_add(1)
                take(request, answer)
                if pending >= max_pending:
                    room.clear()
                    await room.wait()
        finally:
            reading = False
            if outstanding == 0:
                replies.put_nowait(None)

    reader = loop.create_task(read_all())
    cut_by_drain = False

    async def stop_reading_when_draining() -> None:
        nonlocal cut_by_drain
        await draining.wait()
        if not reader.done():
            cut_by_drain = True
            reader.cancel()  # what was read is answered; the rest was never taken

    drainer = loop.create_task(stop_reading_when_draining())
    try:
        while (reply := await replies.get()) is not None:
            yield reply  # returns once gRPC has taken the reply
            pending -= 1
            stats.stream_pending_add(-1)
            if pending < max_pending:
                room.set()
        if cut_by_drain:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the AP is shutting down")
    finally:
        reader.cancel()
        drainer.cancel()
        stats.stream_pending_add(-pending)
