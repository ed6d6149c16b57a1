"""``POST /v1/responses``: OpenAI's Responses API, stateless, on the chat-completion path.

A request (``input`` as a string or as message / ``function_call`` / ``function_call_output``
items, ``instructions``, ``max_output_tokens``, ``temperature``, ``top_p``, function ``tools``,
``tool_choice``, ``text.format``) becomes a
:class:`~llmis.serving.protocol.ChatCompletionRequest`, so validation, prompting, tool calling
and JSON-schema output are the chat completion's own (the schema:
:mod:`llmis.api.responses_protocol`). Nothing is stored: ``store`` is accepted and ignored, and
``previous_response_id`` is a 400 (send the history as ``input`` items).

The answer is a ``response`` object whose ``output`` holds one ``message`` item (its text as
one ``output_text`` part) and/or ``function_call`` items. ``status`` is ``completed``, or
``incomplete`` with ``incomplete_details.reason = "max_output_tokens"`` when the budget ran
out. With ``stream: true`` the typed event stream is sent as server-sent events with an
``event:`` line and a ``sequence_number``: ``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta`` ..., ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done`` (and for a call
``response.function_call_arguments.delta`` / ``.done``), then ``response.completed`` or
``response.incomplete`` (no ``[DONE]``, as OpenAI). An error after the stream started is an
``error`` event.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from llmis.api.middleware import read_json, request_policy
from llmis.api.openai_bodies import now
from llmis.api.responses_protocol import FunctionChoice, ResponsesRequest
from llmis.api.sse import EventStream
from llmis.engine.jobs import Delta, Failed, Finished
from llmis.errors import APIError
from llmis.ops.app_keys import MANAGER, SETTINGS
from llmis.serving.formats import compile_grammar
from llmis.serving.generation import Generation, start_chat
from llmis.serving.toolcalls import ContentPiece, OutputParser, Piece

__all__ = ["ResponsesRequest", "routes"]

routes = web.RouteTableDef()


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Builder:
    """The response object and its output items, built as the parser's pieces arrive."""

    def __init__(self, req: ResponsesRequest, model: str) -> None:
        self.req = req
        self.id = _item_id("resp")
        self.model = model
        self.created = now()
        self.output: list[dict[str, Any]] = []
        self.message: dict[str, Any] | None = None
        self.calls: dict[int, dict[str, Any]] = {}  # parser call index -> item

    def response(self, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        req = self.req
        fmt = req.text.format if req.text is not None and req.text.format else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": self.output if status != "in_progress" else [],
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or ()],
            "tool_choice": (
                req.tool_choice.model_dump()
                if isinstance(req.tool_choice, FunctionChoice)
                else req.tool_choice or "auto"
            ),
            "parallel_tool_calls": req.parallel_tool_calls,
            "text": {
                "format": fmt.model_dump(by_alias=True, exclude_none=True)
                if fmt
                else {"type": "text"}
            },
            "previous_response_id": None,
            "store": False,
            "metadata": req.metadata or {},
            "error": None,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "usage": usage,
        }

    # each method returns the (event type, payload) pairs to send, in order
    def apply(self, piece: Piece) -> list[tuple[str, dict[str, Any]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        if isinstance(piece, ContentPiece):
            if self.message is None:
                self.message = {
                    "type": "message",
                    "id": _item_id("msg"),
                    "status": "in_progress",
                    "role": "assistant",
                    "content": [],
                }
                self.output.append(self.message)
                index = len(self.output) - 1
                events.append(("response.output_item.added", self._item_event(index)))
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                self.message["content"].append(part)
                events.append(
                    (
                        "response.content_part.added",
                        {
                            "item_id": self.message["id"],
                            "output_index": index,
                            "content_index": 0,
                            "part": dict(part),
                        },
                    )
                )
            self.message["content"][0]["text"] += piece.text
            events.append(
                (
                    "response.output_text.delta",
                    {
                        "item_id": self.message["id"],
                        "output_index": self.output.index(self.message),
                        "content_index": 0,
                        "delta": piece.text,
                        "logprobs": [],
                    },
                )
            )
            return events
        item = self.calls.get(piece.index)
        if item is None:
            item = {
                "type": "function_call",
                "id": _item_id("fc"),
                "call_id": piece.id,
                "name": piece.name,
                "arguments": "",
                "status": "in_progress",
            }
            self.calls[piece.index] = item
            self.output.append(item)
            events.append(("response.output_item.added", self._item_event(len(self.output) - 1)))
        if piece.arguments:
            item["arguments"] += piece.arguments
            events.append(
                (
                    "response.function_call_arguments.delta",
                    {
                        "item_id": item["id"],
                        "output_index": self.output.index(item),
                        "delta": piece.arguments,
                    },
                )
            )
        return events

    def _item_event(self, index: int) -> dict[str, Any]:
        item = self.output[index]
        snapshot = {**item, "content": []} if item["type"] == "message" else dict(item)
        return {"output_index": index, "item": snapshot}

    def close(self, status: str) -> list[tuple[str, dict[str, Any]]]:
        """Finish every item (``completed`` or ``incomplete``)."""
        events: list[tuple[str, dict[str, Any]]] = []
        for index, item in enumerate(self.output):
            item["status"] = status
            if item["type"] == "message":
                part = item["content"][0]
                events.append(
                    (
                        "response.output_text.done",
                        {
                            "item_id": item["id"],
                            "output_index": index,
                            "content_index": 0,
                            "text": part["text"],
                            "logprobs": [],
                        },
                    )
                )
                events.append(
                    (
                        "response.content_part.done",
                        {
                            "item_id": item["id"],
                            "output_index": index,
                            "content_index": 0,
                            "part": dict(part),
                        },
                    )
                )
            else:
                events.append(
                    (
                        "response.function_call_arguments.done",
                        {
                            "item_id": item["id"],
                            "output_index": index,
                            "name": item["name"],
                            "arguments": item["arguments"],
                        },
                    )
                )
            events.append(("response.output_item.done", {"output_index": index, "item": item}))
        return events


def _usage(event: Finished) -> dict[str, Any]:
    return {
        "input_tokens": event.prompt_tokens,
        "input_tokens_details": {"cached_tokens": event.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": event.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


def _status(parser: OutputParser, finish_reason: str) -> str:
    return "incomplete" if parser.finish_reason(finish_reason) == "length" else "completed"


@routes.post("/v1/responses")
async def create_response(request: web.Request) -> web.StreamResponse:
    req = ResponsesRequest.model_validate(await read_json(request))
    chat = req.chat_request()
    await compile_grammar(chat)
    generation = await start_chat(request.app[MANAGER], chat, request_policy(request, chat.model))
    try:
        if req.stream:
            return await _stream(request, req, generation)
        builder = _Builder(req, generation.model)
        parser = generation.parser()
        async for event in generation.events(generation.jobs[0]):
            if isinstance(event, Delta):
                for piece in parser.feed(event.text):
                    builder.apply(piece)
            elif isinstance(event, Finished):
                for piece in parser.finish():
                    builder.apply(piece)
                status = _status(parser, event.finish_reason)
                builder.close(status)
                return web.json_response(builder.response(status, _usage(event)))
            elif isinstance(event, Failed):
                raise event.error
        raise APIError("generation ended without a result")
    finally:
        generation.cancel()


async def _stream(
    request: web.Request, req: ResponsesRequest, generation: Generation
) -> web.StreamResponse:
    server = request.app[SETTINGS].server
    sse = EventStream(request, write_timeout=server.write_timeout_seconds)
    builder = _Builder(req, generation.model)
    parser = generation.parser()
    sequence = 0

    async def send(kind: str, payload: dict[str, Any]) -> None:
        nonlocal sequence
        await sse.send_event(kind, {"type": kind, "sequence_number": sequence, **payload})
        sequence += 1

    try:
        await sse.prepare()
        await send("response.created", {"response": builder.response("in_progress")})
        await send("response.in_progress", {"response": builder.response("in_progress")})
        async for event in generation.events(generation.jobs[0], server.keepalive_seconds):
            if event is None:
                await sse.ping()
            elif isinstance(event, Delta):
                for piece in parser.feed(event.text):
                    for kind, payload in builder.apply(piece):
                        await send(kind, payload)
            elif isinstance(event, Finished):
                for piece in parser.finish():
                    for kind, payload in builder.apply(piece):
                        await send(kind, payload)
                status = _status(parser, event.finish_reason)
                for kind, payload in builder.close(status):
                    await send(kind, payload)
                final = builder.response(status, _usage(event))
                await send(f"response.{status}", {"response": final})
            elif isinstance(event, Failed):
                error = event.error
                await send(
                    "error", {"code": error.code, "message": error.message, "param": error.param}
                )
        await sse.response.write_eof()
    except ConnectionResetError:
        pass  # the client left; the caller cancels the job
    return sse.response
