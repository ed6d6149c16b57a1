"""Server-Sent Events framed exactly as OpenAI sends them.

``data: {json}\\n\\n`` per event, ``data: [DONE]\\n\\n`` at the end, ``: ping`` comment lines to
keep an idle connection open; headers as aiohttp-sse sets them.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

__all__ = ["SSE_HEADERS", "EventStream"]

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",
}


class EventStream:
    """A prepared ``text/event-stream`` response. Writes raise ``ConnectionResetError``
    once the client has gone."""

    def __init__(self, request: web.Request, headers: dict[str, str] | None = None) -> None:
        self.request = request
        self.response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **(headers or {})})

    async def prepare(self) -> None:
        await self.response.prepare(self.request)

    async def send(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        await self.response.write(f"data: {data}\n\n".encode())

    async def ping(self) -> None:
        await self.response.write(b": ping\n\n")

    async def done(self) -> None:
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
