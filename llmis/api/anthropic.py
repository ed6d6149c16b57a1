"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``) as a thin
translation onto the serving layer.

A request becomes a chat request (:mod:`llmis.api.anthropic_protocol`) served by
:func:`llmis.serving.start_chat`: the same limits, metrics, auth (``x-api-key`` is accepted
beside ``Authorization: Bearer``), request ids and cancellation as every route. The
``anthropic-version`` header is accepted and not needed. Streams are Anthropic's typed
server-sent events: ``message_start``, ``content_block_start``, ``ping``,
``content_block_delta`` (``text_delta``)..., ``content_block_stop``, ``message_delta`` (stop
reason and usage), ``message_stop``; ``ping`` also while a request waits; an error after the
stream started is an ``error`` event.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from llmis.api.anthropic_protocol import CountTokensRequest, MessagesRequest
from llmis.api.middleware import read_json
from llmis.families import error_for
from llmis.jobs import Delta, Failed, Finished
from llmis.protocol import compile_grammar
from llmis.serving import Generation, count_chat_tokens, start_chat
from llmis.sse import EventStream
from llmis.state import MANAGER, SETTINGS

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


def _message(
    id_: str,
    model: str,
    text: str | None,
    reason: tuple[str, str | None] | None,
    input_tokens: int,
    output_tokens: int,
) -> dict[str, Any]:
    return {
        "id": id_,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [] if text is None else [{"type": "text", "text": text}],
        "stop_reason": reason[0] if reason else None,
        "stop_sequence": reason[1] if reason else None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }


@routes.post("/v1/messages")
async def messages(request: web.Request) -> web.StreamResponse:
    req = MessagesRequest.model_validate(await read_json(request))
    chat = req.to_openai()
    await compile_grammar(chat)
    generation = await start_chat(request.app[MANAGER], chat)
    id_ = f"msg_{uuid.uuid4().hex[:24]}"
    try:
        if req.stream:
            return await _stream(request, req, generation, id_)
        result = await generation.collect(generation.jobs[0])
        done = Finished(
            result.finish_reason,
            result.prompt_tokens,
            result.completion_tokens,
            result.cached_tokens,
            result.stop_sequence,
        )
        reason = stop_reason(done, req.stop_sequences)
        body = _message(
            id_,
            generation.model,
            result.text,
            reason,
            result.prompt_tokens,
            result.completion_tokens,
        )
        return web.json_response(body)
    finally:
        generation.cancel()


async def _stream(
    request: web.Request, req: MessagesRequest, generation: Generation, id_: str
) -> web.StreamResponse:
    server = request.app[SETTINGS].server
    sse = EventStream(request, write_timeout=server.write_timeout_seconds)
    job = generation.jobs[0]
    input_tokens = len(job.prompt)
    try:
        await sse.prepare()
        start = _message(id_, generation.model, None, None, input_tokens, 0)
        await sse.send_event("message_start", {"type": "message_start", "message": start})
        block = {"type": "text", "text": ""}
        await sse.send_event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        )
        await sse.send_event("ping", {"type": "ping"})
        async for event in generation.events(job, server.keepalive_seconds):
            if event is None:
                await sse.send_event("ping", {"type": "ping"})
            elif isinstance(event, Delta):
                delta = {"type": "text_delta", "text": event.text}
                await sse.send_event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                )
            elif isinstance(event, Finished):
                reason, sequence = stop_reason(event, req.stop_sequences)
                await sse.send_event(
                    "content_block_stop", {"type": "content_block_stop", "index": 0}
                )
                await sse.send_event(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": reason, "stop_sequence": sequence},
                        "usage": {"output_tokens": event.completion_tokens},
                    },
                )
                await sse.send_event("message_stop", {"type": "message_stop"})
            elif isinstance(event, Failed):
                await sse.send_event("error", error_for("anthropic", event.error))
        await sse.close()
    except ConnectionResetError:
        pass  # the client left; the caller cancels the job
    return sse.response


@routes.post("/v1/messages/count_tokens")
async def count_tokens(request: web.Request) -> web.Response:
    """The tokens of the prompt the request would send, rendered with the chat template."""
    req = CountTokensRequest.model_validate(await read_json(request))
    tokens = await count_chat_tokens(request.app[MANAGER], req.model, req.template_messages())
    return web.json_response({"input_tokens": tokens})
