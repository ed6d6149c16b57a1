"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``) as a thin
translation onto the serving layer.

A request becomes a chat request (:mod:`llmis.api.anthropic_protocol`) served by
:func:`llmis.serving.generation.start_chat`: the same limits, metrics, auth (``x-api-key``
is accepted beside ``Authorization: Bearer``), request ids and cancellation as every route. The
``anthropic-version`` header is accepted and not needed. Streams are Anthropic's typed
server-sent events: ``message_start``, ``content_block_start``, ``ping``,
``content_block_delta`` (``text_delta``)..., ``content_block_stop``, ``message_delta`` (stop
reason and usage), ``message_stop``; ``ping`` also while a request waits; an error after the
stream started is an ``error`` event.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from aiohttp import web

from llmis.api.anthropic_protocol import CountTokensRequest, MessagesRequest
from llmis.api.middleware import read_json, request_policy
from llmis.api.sse import EventStream
from llmis.engine.jobs import Delta, Failed, Finished
from llmis.ops.app_keys import MANAGER, SETTINGS, task_services
from llmis.ops.families import error_for
from llmis.serving.chunking import Pacing, coalesce, pacing
from llmis.serving.formats import compile_grammar
from llmis.serving.generation import Generation, count_chat_tokens, start_chat
from llmis.serving.toolcalls import ContentPiece, OutputParser, Piece
from llmis.tasks.plan import TaskPlan, plan_task

__all__ = ["routes", "stop_reason"]

routes = web.RouteTableDef()


def stop_reason(event: Finished, stop_sequences: list[str] | None) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` for a finished job."""
    if event.finish_reason == "length":
        return "max_tokens", None
    if event.finish_reason == "content_filter":
        return "refusal", None
    if event.stop_sequence is not None and event.stop_sequence in (stop_sequences or []):
        return "stop_sequence", event.stop_sequence
    return "end_turn", None  # end of generation, or the chat template's own end marker


def _input(arguments: str) -> dict[str, Any]:
    """A call's ``input`` object (the grammar or the parser keeps arguments a JSON object)."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _blocks(parser: OutputParser) -> list[dict[str, Any]]:
    """The answer's content blocks: its text (unless only blank beside calls), then calls."""
    content = parser.content
    blocks: list[dict[str, Any]] = []
    if content.strip() or not parser.calls:
        blocks.append({"type": "text", "text": content})
    for call in parser.calls:
        blocks.append(
            {"type": "tool_use", "id": call.id, "name": call.name, "input": _input(call.arguments)}
        )
    return blocks


def _message(
    id_: str,
    model: str,
    content: list[dict[str, Any]],
    reason: tuple[str, str | None] | None,
    input_tokens: int,
    output_tokens: int,
) -> dict[str, Any]:
    return {
        "id": id_,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason[0] if reason else None,
        "stop_sequence": reason[1] if reason else None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }


@routes.post("/v1/messages")
async def messages(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    req = MessagesRequest.model_validate(body)
    chat = req.to_openai()  # validated with Anthropic's field names in errors
    # a preset: its task fields are top-level fields beside Anthropic's
    planned = (
        await plan_task(task_services(request.app), req.chat_body(), body)
        if isinstance(body, dict)
        else None
    )
    chat, plan = planned if planned is not None else (chat, None)
    await compile_grammar(chat)
    generation = await start_chat(request.app[MANAGER], chat, request_policy(request, chat.model))
    if plan is not None:  # a preset: the response names it
        generation = dataclasses.replace(generation, model=plan.model_id)
    id_ = f"msg_{uuid.uuid4().hex[:24]}"
    try:
        if req.stream:
            pace = pacing(request.app[SETTINGS].streaming, chat.stream_options)
            return await _stream(request, req, generation, id_, pace, plan)
        result = await generation.collect(generation.jobs[0])
        done = Finished(
            result.finish_reason,
            result.prompt_tokens,
            result.completion_tokens,
            result.cached_tokens,
            result.stop_sequence,
        )
        parser = generation.parser()
        parser.feed(result.text)
        parser.finish()
        reason = stop_reason(done, req.stop_sequences)
        if parser.calls and result.finish_reason == "stop":
            reason = ("tool_use", None)
        reply = _message(
            id_,
            generation.model,
            _blocks(parser),
            reason,
            result.prompt_tokens,
            result.completion_tokens,
        )
        if plan is not None:
            reply.update(await plan.result(result.text))
        return web.json_response(reply)
    finally:
        generation.cancel()


async def _stream(
    request: web.Request,
    req: MessagesRequest,
    generation: Generation,
    id_: str,
    pace: Pacing,
    plan: TaskPlan | None = None,
) -> web.StreamResponse:
    """``plan``: a preset's task; what it knows before generating goes in
    ``message_start``'s message as ``task``, its result on ``message_delta`` as ``task``."""
    server = request.app[SETTINGS].server
    sse = EventStream(request, write_timeout=server.write_timeout_seconds)
    job = generation.jobs[0]
    input_tokens = len(job.prompt)
    parts: list[str] = []
    try:
        await sse.prepare()
        start = _message(id_, generation.model, [], None, input_tokens, 0)
        if plan is not None:
            start.update(plan.first())
        await sse.send_event("message_start", {"type": "message_start", "message": start})
        blocks = _Blocks(sse, eager_text=not req.tools)
        await blocks.begin()
        await sse.send_event("ping", {"type": "ping"})
        parser = generation.parser()
        async for event in coalesce(generation.events(job, server.keepalive_seconds), pace):
            if event is None:
                await sse.send_event("ping", {"type": "ping"})
            elif isinstance(event, Delta):
                parts.append(event.text)
                await blocks.send(parser.feed(event.text))
            elif isinstance(event, Finished):
                await blocks.send(parser.finish())
                await blocks.close()
                reason, sequence = stop_reason(event, req.stop_sequences)
                if parser.calls and event.finish_reason == "stop":
                    reason, sequence = "tool_use", None
                delta: dict[str, Any] = {
                    "type": "message_delta",
                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": {"output_tokens": event.completion_tokens},
                }
                if plan is not None:
                    delta.update(await plan.result("".join(parts)))
                await sse.send_event("message_delta", delta)
                await sse.send_event("message_stop", {"type": "message_stop"})
            elif isinstance(event, Failed):
                await sse.send_event("error", error_for("anthropic", event.error))
        await sse.close()
    except ConnectionResetError:
        pass  # the client left; the caller cancels the job
    return sse.response


class _Blocks:
    """The stream's content blocks: text deltas, then each call as a ``tool_use`` block whose
    arguments go out as ``input_json_delta`` pieces. ``eager_text``: the text block opens at
    once (no tools: every answer is text); with tools it opens on the first text."""

    def __init__(self, sse: EventStream, *, eager_text: bool) -> None:
        self.sse = sse
        self.eager_text = eager_text
        self.index = -1
        self.open_kind: str | None = None

    async def _start(self, block: dict[str, Any]) -> None:
        await self._stop()
        self.index += 1
        self.open_kind = block["type"]
        await self.sse.send_event(
            "content_block_start",
            {"type": "content_block_start", "index": self.index, "content_block": block},
        )

    async def _delta(self, delta: dict[str, Any]) -> None:
        await self.sse.send_event(
            "content_block_delta",
            {"type": "content_block_delta", "index": self.index, "delta": delta},
        )

    async def begin(self) -> None:
        if self.eager_text:
            await self._start({"type": "text", "text": ""})

    async def send(self, pieces: list[Piece]) -> None:
        for piece in pieces:
            if isinstance(piece, ContentPiece):
                if not piece.text or (self.open_kind != "text" and not piece.text.strip()):
                    continue  # no block for blank text between calls
                if self.open_kind != "text":
                    await self._start({"type": "text", "text": ""})
                await self._delta({"type": "text_delta", "text": piece.text})
                continue
            if piece.name is not None:
                block: dict[str, Any] = {
                    "type": "tool_use",
                    "id": piece.id,
                    "name": piece.name,
                    "input": {},
                }
                await self._start(block)
            if piece.arguments:
                await self._delta({"type": "input_json_delta", "partial_json": piece.arguments})

    async def close(self) -> None:
        """Close the open block at the end (an empty text block if there was none)."""
        if self.index < 0:
            await self._start({"type": "text", "text": ""})
        await self._stop()

    async def _stop(self) -> None:
        if self.open_kind is not None:
            await self.sse.send_event(
                "content_block_stop", {"type": "content_block_stop", "index": self.index}
            )
            self.open_kind = None


@routes.post("/v1/messages/count_tokens")
async def count_tokens(request: web.Request) -> web.Response:
    """The tokens of the prompt the request would send, rendered with the chat template."""
    req = CountTokensRequest.model_validate(await read_json(request))
    tokens = await count_chat_tokens(request.app[MANAGER], req.model, req.template_messages())
    return web.json_response({"input_tokens": tokens})
