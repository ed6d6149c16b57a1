"""``/v1/ws``: chat completions over one long-lived WebSocket, several at a time.

Client → server, one JSON object per text message:

* ``{"type": "chat", "id": ..., "model": ..., "messages": [...], ...}`` with the parameters of
  ``POST /v1/chat/completions`` (validated by the same pydantic model, so the same errors);
  ``"trim": false`` turns off history trimming;
* ``{"type": "cancel", "id": ...}`` stops that generation;
* ``{"type": "ping"}`` is answered by ``{"type": "pong"}`` (browsers cannot send WS pings).

Server → client: ``delta`` events (``content``, or ``tool_calls`` pieces in the shape of
OpenAI's streamed ``delta.tool_calls``), then exactly one ``done`` (``finish_reason`` ``stop``,
``length``, ``tool_calls`` or ``cancelled``) or ``error`` per chat id. Errors carry the body
and status an HTTP request would get. The server pings the socket (aiohttp heartbeat) and a
close cancels every job of the socket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import WSCloseCode, WSMsgType, web
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError

from llmis.api.middleware import parse_json, validation_error
from llmis.api.openai_bodies import usage
from llmis.api.sse import within
from llmis.engine.jobs import Delta, Failed, Finished
from llmis.errors import APIError, BadRequestError
from llmis.ops.access_log import finish_request
from llmis.ops.app_keys import MANAGER, OVERSIGHT, SETTINGS, task_services
from llmis.ops.auth import WS_PROTOCOL
from llmis.ops.families import error_for
from llmis.ops.policy import Guard
from llmis.ops.ratelimit import RateLimitError
from llmis.ops.request_context import (
    RequestContext,
    current_request,
    new_request_id,
    request_scope,
)
from llmis.serving.chunking import coalesce, pacing
from llmis.serving.formats import compile_grammar
from llmis.serving.generation import Generation, start_chat
from llmis.serving.protocol import ChatCompletionRequest
from llmis.serving.toolcalls import chat_deltas
from llmis.serving.trimming import start_trimmed_chat
from llmis.tasks.plan import TaskPlan, plan_chat

__all__ = ["SOCKETS", "heartbeat_seconds", "routes", "setup"]

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()
SOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("websockets")

ChatId = StrictStr | StrictInt
_ENVELOPE_KEYS = ("type", "id", "trim")


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["chat", "cancel", "ping"]
    id: ChatId | None = None
    trim: bool = True


def heartbeat_seconds(keepalive_seconds: float) -> float:
    """WS ping interval: the SSE keepalive, but never under 5 s (the pong deadline is half)."""
    return max(keepalive_seconds, 5.0)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


@dataclass(eq=False)
class _Chat:
    task: asyncio.Task[None]
    cancelled: bool = False


class _Session:
    """The jobs of one socket, keyed by the client's ids."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        self.app = request.app
        self.manager = request.app[MANAGER]
        self.oversight = request.app.get(OVERSIGHT)
        self.ws = ws
        self.transport = request.transport
        self.chats: dict[ChatId, _Chat] = {}
        self.settings = request.app[SETTINGS]
        self.write_timeout = self.settings.server.write_timeout_seconds
        self.streaming = self.settings.streaming
        ctx = current_request()
        # The client as the rate-limit middleware knew it when the socket was opened.
        self.rate_key = ctx.rate_key if ctx is not None and ctx.rate_key else None

    def admit(self) -> None:
        """Each chat message is a request for the rate limits, as an HTTP request is."""
        if self.oversight is None or self.rate_key is None:
            return
        try:
            self.oversight.limiter.admit(self.rate_key)
        except RateLimitError as exc:
            self.oversight.metrics.rate_limited.labels(exc.limit).inc()
            raise

    async def send(self, event: dict[str, Any]) -> None:
        if self.ws.closed:
            return
        # A socket going away raises here; its reader loop then ends and cancels the jobs.
        # A client that stops reading is closed once a write has waited write_timeout.
        try:
            await within(self.ws.send_json(event, dumps=_dumps), self.write_timeout)
        except ConnectionResetError:
            pass
        except asyncio.TimeoutError:  # TimeoutError on 3.11+, its own class on 3.10
            logger.warning(
                "websocket write stalled for %gs: dropping the client", self.write_timeout
            )
            if self.transport is not None:
                self.transport.abort()  # the reader loop ends, which cancels the jobs

    async def error(self, id_: ChatId | None, exc: APIError) -> None:
        await self.send(
            {"type": "error", "id": id_, "status": exc.status, **error_for("openai", exc)}
        )

    async def receive(self, raw: str) -> None:
        """Act on one client message; every problem becomes an ``error`` event."""
        id_: ChatId | None = None
        try:
            data = parse_json(raw, "of your message")
            if not isinstance(data, dict):
                raise BadRequestError("a message must be a JSON object", code="invalid_value")
            raw_id = data.get("id")
            if isinstance(raw_id, str | int) and not isinstance(raw_id, bool):
                id_ = raw_id
            envelope = _Envelope.model_validate(data)
            if envelope.type == "ping":
                await self.send({"type": "pong", "id": envelope.id})
                return
            if envelope.id is None:
                raise BadRequestError(
                    f"id: a {envelope.type} message needs an id (a string or an integer)",
                    param="id",
                    code="missing_required_parameter",
                )
            if envelope.type == "cancel":
                self.cancel(envelope.id)
                return
            if envelope.id in self.chats:
                raise BadRequestError(
                    f"id: a request with id {envelope.id!r} is still running on this socket",
                    param="id",
                    code="duplicate_id",
                )
            body = {k: v for k, v in data.items() if k not in _ENVELOPE_KEYS}
            request, plan = await plan_chat(task_services(self.app), body)
            self.admit()
        except ValidationError as exc:
            await self.error(id_, validation_error(exc))
            return
        except APIError as exc:
            await self.error(id_, exc)
            return
        task = asyncio.get_running_loop().create_task(
            self._scoped_chat(envelope.id, request, envelope.trim, plan)
        )
        self.chats[envelope.id] = _Chat(task)

    def cancel(self, id_: ChatId) -> None:
        chat = self.chats.get(id_)
        if chat is None:
            raise BadRequestError(
                f"id: no request with id {id_!r} is running on this socket",
                param="id",
                code="unknown_id",
            )
        chat.cancelled = True
        chat.task.cancel()

    async def _scoped_chat(
        self, id_: ChatId, request: ChatCompletionRequest, trim: bool, plan: TaskPlan | None
    ) -> None:
        """Run one chat as its own request: its own id, and timeouts counted from now."""
        socket = current_request()
        if socket is None:
            await self._chat(id_, request, trim, plan, None)
            return
        ctx = dataclasses.replace(
            socket,
            id=new_request_id(),
            started=time.monotonic(),
            method="WS",
            model=None,
            prompt_tokens=0,
            completion_tokens=0,
            ttft=None,
            finish_reason=None,
        )
        status = 499  # the socket closed first
        with request_scope(ctx):
            try:
                status = await self._chat(id_, request, trim, plan, ctx)
            finally:
                finish_request(ctx, "/v1/ws", status)  # one access-log line per chat

    def _release(self, id_: ChatId) -> None:
        """Free ``id_`` for reuse: called by its own task just before its last event."""
        chat = self.chats.get(id_)
        if chat is not None and chat.task is asyncio.current_task():
            del self.chats[id_]

    async def _end(self, id_: ChatId, event: dict[str, Any]) -> None:
        self._release(id_)
        await self.send(event)

    async def _fail(self, id_: ChatId, exc: APIError) -> None:
        self._release(id_)
        await self.error(id_, exc)

    async def _chat(
        self,
        id_: ChatId,
        request: ChatCompletionRequest,
        trim: bool,
        plan: TaskPlan | None,
        ctx: RequestContext | None,
    ) -> int:
        """Run one chat (``ctx``: its own request context); return its status for the
        access log (200, an error's, 499)."""
        generation: Generation | None = None
        status = 200
        try:
            await compile_grammar(request)
            guard = Guard.for_request(request.model, self.settings, self.oversight, ctx)
            if trim:
                generation, trimmed = await start_trimmed_chat(self.manager, request, guard)
            else:
                generation, trimmed = await start_chat(self.manager, request, guard), 0
            parts: list[str] = []
            parser = generation.parser()
            pace = pacing(self.streaming, request.stream_options)
            async for event in coalesce(generation.events(generation.jobs[0]), pace):
                if isinstance(event, Delta):
                    parts.append(event.text)
                    for delta in chat_deltas(parser.feed(event.text)):
                        await self.send({"type": "delta", "id": id_, **delta})
                elif isinstance(event, Finished):
                    for delta in chat_deltas(parser.finish()):
                        await self.send({"type": "delta", "id": id_, **delta})
                    done: dict[str, Any] = {
                        "type": "done",
                        "id": id_,
                        "finish_reason": parser.finish_reason(event.finish_reason),
                        "usage": usage(event.prompt_tokens, event.completion_tokens),
                    }
                    if trimmed:
                        done["trimmed"] = trimmed
                    if plan is not None:
                        done["model"] = plan.model_id
                        done.update(await plan.result("".join(parts)))
                    await self._end(id_, done)
                elif isinstance(event, Failed):
                    status = event.error.status
                    await self._fail(id_, event.error)
        except APIError as exc:
            status = exc.status
            await self._fail(id_, exc)
        except asyncio.CancelledError:
            chat = self.chats.get(id_)
            if chat is None or not chat.cancelled:
                raise  # the socket closed: nobody to tell
            status = 499
            await self._end(
                id_, {"type": "done", "id": id_, "finish_reason": "cancelled", "usage": None}
            )
        except Exception:
            logger.exception("websocket chat %r failed", id_)
            status = 500
            await self._fail(
                id_, APIError("The server had an error while processing your request.")
            )
        finally:
            if generation is not None:
                generation.cancel()
            self._release(id_)
        return status

    async def close(self) -> None:
        """Cancel every job of this socket and wait for their tasks to end."""
        tasks = [chat.task for chat in self.chats.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@routes.get("/v1/ws")
async def chat_socket(request: web.Request) -> web.WebSocketResponse:
    server = request.app[SETTINGS].server
    ws = web.WebSocketResponse(
        protocols=(WS_PROTOCOL,),  # answered when a browser offered it (with its key)
        heartbeat=heartbeat_seconds(server.keepalive_seconds),
        max_msg_size=server.max_body_bytes,
    )
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    session = _Session(request, ws)
    try:
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await session.receive(message.data)
            elif message.type == WSMsgType.BINARY:
                await session.error(
                    None, BadRequestError("send JSON text messages, not binary ones")
                )
    finally:
        await session.close()
    return ws


async def _close_sockets(app: web.Application) -> None:
    sockets = app[SOCKETS]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")


def setup(app: web.Application) -> None:
    """Add ``/v1/ws`` to ``app``; open sockets are closed when the app shuts down."""
    app[SOCKETS] = weakref.WeakSet[web.WebSocketResponse]()
    app.on_shutdown.append(_close_sockets)
    app.add_routes(routes)
