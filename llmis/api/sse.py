"""Server-Sent Events framed exactly as OpenAI sends them, on the streamed-response writer
that Ollama's NDJSON shares.

``data: {json}\\n\\n`` per event, ``data: [DONE]\\n\\n`` at the end, ``: ping`` comment lines to
keep an idle connection open; headers as aiohttp-sse sets them. A write that cannot complete
within ``write_timeout`` (a client that stopped reading while its socket buffers are full)
drops the connection and raises ``ConnectionResetError``, as a client that left does, so
the handler cancels the generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Coroutine
from typing import Any

import orjson
from aiohttp import web

__all__ = ["SSE_HEADERS", "EventStream", "ResponseStream", "dumps", "within"]

logger = logging.getLogger(__name__)

# a write of this size onto an empty transport stays under aiohttp's high-water mark (64 KiB)
_UNBLOCKED_WRITE = 16 * 1024

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",
}


def dumps(payload: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, once per token: orjson, with the standard library for what orjson
    refuses (integers beyond 64 bits, non-string keys)."""
    try:
        return orjson.dumps(payload)
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


async def within(write: Coroutine[Any, Any, None], seconds: float | None) -> None:
    """Await ``write``; ``TimeoutError`` after ``seconds`` (None: no limit). On Python 3.11+
    this costs no task per write (``asyncio.timeout``), which matters once per token."""
    if seconds is None:
        await write
    elif sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            await write
    else:  # pragma: no cover
        await asyncio.wait_for(write, seconds)


class ResponseStream:
    """A prepared streamed response (SSE or NDJSON), written a frame at a time. Writes raise
    ``ConnectionResetError`` once the client has gone, or when one stalls for
    ``write_timeout`` seconds."""

    def __init__(
        self, request: web.Request, headers: dict[str, str], write_timeout: float | None
    ) -> None:
        self.request = request
        self.response = web.StreamResponse(status=200, headers=headers)
        self.write_timeout = write_timeout

    async def prepare(self) -> None:
        await self.response.prepare(self.request)

    async def write(self, data: bytes) -> None:
        """One frame; once per token, so no timer unless the transport is backed up."""
        transport = self.request.transport
        if self.write_timeout is None or (
            transport is not None
            and transport.get_write_buffer_size() == 0
            and len(data) < _UNBLOCKED_WRITE
        ):
            # nothing is backed up, so this write cannot wait (aiohttp waits only while the
            # transport holds more than its high-water mark): no timer for it
            await self.response.write(data)
            return
        try:
            await within(self.response.write(data), self.write_timeout)
        except asyncio.TimeoutError:  # TimeoutError on 3.11+, its own class on 3.10
            logger.warning(
                "a stream write stalled for %gs (the client stopped reading): dropping it",
                self.write_timeout,
            )
            transport = self.request.transport
            if transport is not None:
                transport.abort()
            raise ConnectionResetError("the client stopped reading") from None

    async def close(self) -> None:
        """End the stream (for SSE: without OpenAI's ``[DONE]``)."""
        await self.response.write_eof()


class EventStream(ResponseStream):
    """A prepared ``text/event-stream`` response."""

    def __init__(
        self,
        request: web.Request,
        headers: dict[str, str] | None = None,
        write_timeout: float | None = None,
    ) -> None:
        super().__init__(request, {**SSE_HEADERS, **(headers or {})}, write_timeout)

    async def send(self, payload: dict[str, Any]) -> None:
        await self.write(b"data: " + dumps(payload) + b"\n\n")

    async def send_event(self, event: str, payload: dict[str, Any]) -> None:
        """A named event, as Anthropic frames them: ``event: name\ndata: {json}\n\n``."""
        await self.write(f"event: {event}\ndata: ".encode() + dumps(payload) + b"\n\n")

    async def ping(self) -> None:
        await self.write(b": ping\n\n")

    async def done(self) -> None:
        await self.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
