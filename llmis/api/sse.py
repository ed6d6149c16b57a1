"""Server-Sent Events framed exactly as OpenAI sends them.

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

from aiohttp import web

__all__ = ["SSE_HEADERS", "EventStream", "within"]

logger = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",
}


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


class EventStream:
    """A prepared ``text/event-stream`` response. Writes raise ``ConnectionResetError``
    once the client has gone, or when one stalls for ``write_timeout`` seconds."""

    def __init__(
        self,
        request: web.Request,
        headers: dict[str, str] | None = None,
        write_timeout: float | None = None,
    ) -> None:
        self.request = request
        self.response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **(headers or {})})
        self.write_timeout = write_timeout

    async def prepare(self) -> None:
        await self.response.prepare(self.request)

    async def _write(self, data: bytes) -> None:
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

    async def send(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        await self._write(f"data: {data}\n\n".encode())

    async def send_event(self, event: str, payload: dict[str, Any]) -> None:
        """A named event, as Anthropic frames them: ``event: name\ndata: {json}\n\n``."""
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        await self._write(f"event: {event}\ndata: {data}\n\n".encode())

    async def close(self) -> None:
        """End the stream without OpenAI's ``[DONE]``."""
        await self.response.write_eof()

    async def ping(self) -> None:
        await self._write(b": ping\n\n")

    async def done(self) -> None:
        await self._write(b"data: [DONE]\n\n")
        await self.response.write_eof()
