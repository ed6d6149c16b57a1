"""The plain routes a user types by hand, as thin aliases of the OpenAI serving code.

* ``GET /models``: every model with its state (``available``, ``loading``, ``loaded``,
  ``unloading``, ``failed``) and its aliases.
* ``POST /load {"model"}``: load a model the server knows (configured, or a file in the
  models dir) now; 200 once loaded. It cannot name a new file: that is ``/admin/models/load``.
* ``POST /infer {"model", "prompt" | "messages", ...}``: ``prompt`` is a text completion,
  ``messages`` a chat; any parameter of ``/v1/completions`` / ``/v1/chat/completions``
  (``max_tokens``, ``temperature``, ``seed``, ``stop``...) is accepted. The answer is
  ``{"model", "text", "finish_reason", "usage"}``.
* ``POST /infer?stream=true`` (or ``"stream": true``): server-sent events, one
  ``data: {"text": ...}`` per piece, then ``data: {"finish_reason", "usage"}`` and
  ``data: [DONE]``.

Errors are OpenAI's error shape, as everywhere.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ConfigDict, Field

from llmis.api.middleware import read_json, request_policy
from llmis.api.openai_bodies import usage
from llmis.api.sse import EventStream
from llmis.engine.jobs import Delta, Failed, Finished
from llmis.errors import BadRequestError
from llmis.ops.app_keys import MANAGER, SETTINGS
from llmis.ops.families import error_for
from llmis.serving.formats import compile_grammar
from llmis.serving.generation import Generation, start_chat, start_completion
from llmis.serving.protocol import (
    MAX_NAME_CHARS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    LenientModel,
)

__all__ = ["InferBody", "LoadModelBody", "routes"]

routes = web.RouteTableDef()


class LoadModelBody(LenientModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)


class InferBody(LenientModel):
    """The documented fields; every other sampling parameter of the OpenAI routes works too."""

    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False


@routes.get("/models")
async def list_models(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    await manager.refresh()
    aliases = manager.aliases()
    return web.json_response(
        {
            "models": [
                {
                    "name": entry.name,
                    "state": entry.state.value,
                    "aliases": sorted(a for a, t in aliases.items() if t == entry.name),
                    "n_ctx": entry.settings.n_ctx,
                    "error": entry.error,
                }
                for entry in manager.entries()
            ]
        }
    )


@routes.post("/load")
async def load(request: web.Request) -> web.Response:
    body = LoadModelBody.model_validate(await read_json(request))
    manager = request.app[MANAGER]
    name = manager.entry(body.model).name  # 404 for a model the server does not know
    entry = await manager.load(name)
    return web.json_response({"model": entry.name, "state": entry.state.value})


def _stream_requested(request: web.Request, body: InferBody) -> bool:
    value = request.query.get("stream")
    if value is None:
        return body.stream
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise BadRequestError("stream: use stream=true or stream=false", param="stream")


@routes.post("/infer")
async def infer(request: web.Request) -> web.StreamResponse:
    raw = await read_json(request)
    body = InferBody.model_validate(raw)
    if not isinstance(raw, dict):  # InferBody accepted it, so it is one
        raise BadRequestError("the body must be a JSON object")
    if (body.prompt is None) == (body.messages is None):
        raise BadRequestError(
            "send either 'prompt' (a text completion) or 'messages' (a chat), not both",
            param="prompt" if body.prompt is not None else "messages",
            code="invalid_value",
        )
    stream = _stream_requested(request, body)
    fields: dict[str, Any] = {k: v for k, v in raw.items() if k != "stream"}
    generation: Generation
    manager = request.app[MANAGER]
    if body.messages is not None:
        chat = ChatCompletionRequest.model_validate(fields)
        await compile_grammar(chat)
        generation = await start_chat(manager, chat, request_policy(request, chat.model))
    else:
        completion = CompletionRequest.model_validate(fields)
        if fields.get("max_tokens") is None:  # the rest of the context, not OpenAI's 16
            completion = completion.model_copy(update={"max_tokens": None})
        await compile_grammar(completion)
        generation = await start_completion(
            manager, completion, request_policy(request, completion.model)
        )
    try:
        if stream:
            return await _stream(request, generation)
        result = await generation.collect(generation.jobs[0])
        return web.json_response(
            {
                "model": generation.model,
                "text": result.text,
                "finish_reason": result.finish_reason,
                "usage": usage(result.prompt_tokens, result.completion_tokens),
            }
        )
    finally:
        generation.cancel()


async def _stream(request: web.Request, generation: Generation) -> web.StreamResponse:
    server = request.app[SETTINGS].server
    sse = EventStream(request, write_timeout=server.write_timeout_seconds)
    try:
        await sse.prepare()
        async for event in generation.events(generation.jobs[0], server.keepalive_seconds):
            if event is None:
                await sse.ping()
            elif isinstance(event, Delta):
                if event.text:
                    await sse.send({"text": event.text})
            elif isinstance(event, Finished):
                await sse.send(
                    {
                        "model": generation.model,
                        "finish_reason": event.finish_reason,
                        "usage": usage(event.prompt_tokens, event.completion_tokens),
                    }
                )
            elif isinstance(event, Failed):
                await sse.send(error_for("openai", event.error))
        await sse.done()
    except ConnectionResetError:
        pass
    return sse.response
