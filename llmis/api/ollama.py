"""Ollama's API (``docs/api.md``) as a thin translation onto the serving layer.

``/api/chat`` and ``/api/generate`` become OpenAI requests (:mod:`llmis.api.ollama_protocol`)
served by :mod:`llmis.serving.generation`: the same limits, metrics, auth, request ids and
cancellation.
Streams are NDJSON (``application/x-ndjson``), one compact JSON object a line, the last with
``"done": true``, ``done_reason`` and the counts and durations (nanoseconds). Errors are
``{"error": "..."}`` (the error middleware picks the shape by path; :mod:`llmis.ops.families`);
an error after a stream started is sent as its last line. The model routes (tags, ps, show,
version, pull, delete) are in :mod:`llmis.api.ollama_models`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from aiohttp import web
from numpy.typing import NDArray

from llmis.api.embeddings import vectors_response
from llmis.api.middleware import read_json, request_policy
from llmis.api.ollama_protocol import (
    OllamaChatRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    keep_alive_seconds,
    task_fields,
)
from llmis.api.sse import ResponseStream, dumps
from llmis.engine.jobs import Delta, Failed, Finished
from llmis.errors import APIError, BadRequestError
from llmis.models.manager import ModelManager
from llmis.ops.app_keys import MANAGER, PRESETS, SETTINGS, task_services
from llmis.ops.families import error_for
from llmis.serving import embeddings as embedding
from llmis.serving.chunking import Pacing, coalesce, pacing
from llmis.serving.embeddings import Embeddings, lease_embedder, truncate_dimensions
from llmis.serving.formats import compile_grammar
from llmis.serving.generation import Generation, start_chat, start_completion
from llmis.serving.protocol import ChatCompletionRequest
from llmis.serving.toolcalls import ContentPiece, OutputParser, Piece
from llmis.tasks.plan import TaskPlan, plan_task

__all__ = ["OLLAMA_API_VERSION", "NdjsonStream", "routes"]

# The Ollama release whose API this follows (it added /v1/messages); clients gate on it.
OLLAMA_API_VERSION = "0.14.0"
NDJSON = "application/x-ndjson"

routes = web.RouteTableDef()
logger = logging.getLogger(__name__)


def timestamp(at: float | None = None) -> str:
    moment = dt.datetime.fromtimestamp(time.time() if at is None else at, dt.timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


class NdjsonStream(ResponseStream):
    """A prepared NDJSON response: one JSON object per line."""

    def __init__(self, request: web.Request) -> None:
        headers = {"Content-Type": NDJSON, "Cache-Control": "no-cache"}
        super().__init__(request, headers, request.app[SETTINGS].server.write_timeout_seconds)

    async def send(self, payload: dict[str, Any]) -> None:
        await self.write(dumps(payload) + b"\n")


# ----- models -----


def _keep_alive(manager: ModelManager, model: str, seconds: float | None) -> None:
    if seconds is not None:
        manager.keep_alive(model, seconds)


@routes.post("/api/chat")
async def chat(request: web.Request) -> web.StreamResponse:
    started = time.monotonic_ns()
    body = await read_json(request)
    req = OllamaChatRequest.model_validate(body)
    if not req.messages:
        return await _load_or_unload(request, req.model, req.keep_alive_seconds, "message")
    converted = req.to_openai()  # validated with Ollama's field names in errors
    planned = await plan_task(task_services(request.app), req.chat_body(), task_fields(body))
    converted, plan = planned if planned is not None else (converted, None)
    return await _generate(
        request, converted, req.stream, req.keep_alive_seconds, started, is_chat=True, plan=plan
    )


@routes.post("/api/generate")
async def generate(request: web.Request) -> web.StreamResponse:
    started = time.monotonic_ns()
    body = await read_json(request)
    req = OllamaGenerateRequest.model_validate(body)
    if not req.prompt and not req.system:
        return await _load_or_unload(request, req.model, req.keep_alive_seconds, "response")
    converted = req.to_openai()
    plan: TaskPlan | None = None
    if isinstance(converted, ChatCompletionRequest):
        planned = await plan_task(task_services(request.app), req.chat_body(), task_fields(body))
        if planned is not None:
            converted, plan = planned
    elif request.app[PRESETS].lookup(req.model, request.app[MANAGER]) is not None:
        raise BadRequestError(
            "raw: a preset renders the prompt with the chat template; send it without raw",
            param="raw",
        )
    return await _generate(
        request, converted, req.stream, req.keep_alive_seconds, started, is_chat=False, plan=plan
    )


async def _load_or_unload(
    request: web.Request, model: str, keep_alive: float | None, field: str
) -> web.Response:
    """Ollama's empty request: load the model (``done_reason: load``), or with
    ``keep_alive: 0`` unload it (``unload``)."""
    manager = request.app[MANAGER]
    found = request.app[PRESETS].lookup(model, manager)
    entry = manager.entry(found[1] if found is not None else model)  # a preset: its model
    if keep_alive == 0 and not entry.settings.pin:  # a model pinned in the config stays
        await manager.unload(entry.name)
        reason = "unload"
    else:
        async with manager.lease(entry.name) as worker:
            name, reason = worker.name, "load"
        _keep_alive(manager, name, keep_alive)
    body: dict[str, Any] = {"model": model, "created_at": timestamp()}
    body[field] = {"role": "assistant", "content": ""} if field == "message" else ""
    body.update(done=True, done_reason=reason)
    return web.json_response(body)


class _Clock:
    """Ollama's durations, in nanoseconds."""

    def __init__(self, started: int) -> None:
        self.started = started
        self.queued = time.monotonic_ns()  # the job was queued (model ready, prompt read)
        self.first: int | None = None

    def tick(self) -> None:
        if self.first is None:
            self.first = time.monotonic_ns()

    def final(self, event: Finished) -> dict[str, Any]:
        end = time.monotonic_ns()
        first = self.first or end
        return {
            "done_reason": event.finish_reason,
            "total_duration": end - self.started,
            "load_duration": self.queued - self.started,
            "prompt_eval_count": event.prompt_tokens,
            "prompt_eval_duration": first - self.queued,
            "eval_count": event.completion_tokens,
            "eval_duration": end - first,
        }


async def _generate(
    request: web.Request,
    req: Any,
    stream: bool,
    keep_alive: float | None,
    started: int,
    *,
    is_chat: bool,
    plan: TaskPlan | None = None,
) -> web.StreamResponse:
    """Serve ``req``; ``is_chat``: answer as /api/chat (``message``), else ``response``.
    ``plan``: a preset's task, whose result goes on the last object as ``task``."""
    manager = request.app[MANAGER]
    await compile_grammar(req)
    templated = isinstance(req, ChatCompletionRequest)
    guard = request_policy(request, req.model)
    generation = await (
        start_chat(manager, req, guard) if templated else start_completion(manager, req, guard)
    )
    served = generation.model
    if plan is not None:  # a preset: the response names it
        generation = dataclasses.replace(generation, model=plan.model_id)
    clock = _Clock(started)
    try:
        if stream:
            pace = pacing(request.app[SETTINGS].streaming, req.stream_options)
            return await _stream(request, generation, is_chat, clock, pace, plan)
        parser = generation.parser()
        parts: list[str] = []
        async for event in generation.events(generation.jobs[0]):
            if isinstance(event, Delta):
                clock.tick()
                parser.feed(event.text)
                parts.append(event.text)
            elif isinstance(event, Failed):
                raise event.error
            elif isinstance(event, Finished):
                parser.finish()
                calls = ollama_tool_calls(parser)
                content = "" if calls and not parser.content.strip() else parser.content
                body = _piece(generation.model, is_chat, content, done=True, tool_calls=calls)
                body.update(clock.final(event))
                if plan is not None:
                    body.update(await plan.result("".join(parts)))
                return web.json_response(body)
        raise APIError("generation ended without a result")
    finally:
        generation.cancel()
        _keep_alive(manager, served, keep_alive)


def ollama_tool_calls(parser: OutputParser) -> list[dict[str, Any]] | None:
    """``message.tool_calls`` as Ollama sends them: ``arguments`` an object, not a string."""
    if not parser.calls:
        return None
    out = []
    for call in parser.calls:
        try:
            arguments = json.loads(call.arguments) if call.arguments.strip() else {}
        except ValueError:
            arguments = {}  # never sent: the grammar or the parser keeps arguments JSON
        out.append({"function": {"name": call.name, "arguments": arguments}})
    return out


def _piece(
    model: str,
    is_chat: bool,
    text: str,
    *,
    done: bool,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "created_at": timestamp()}
    if is_chat:
        body["message"] = {"role": "assistant", "content": text}
        if tool_calls:
            body["message"]["tool_calls"] = tool_calls
    else:
        body["response"] = text
    body["done"] = done
    return body


async def _stream(
    request: web.Request,
    generation: Generation,
    is_chat: bool,
    clock: _Clock,
    pace: Pacing,
    plan: TaskPlan | None = None,
) -> web.StreamResponse:
    out = NdjsonStream(request)
    parts: list[str] = []
    try:
        await out.prepare()
        parser = generation.parser()
        async for event in coalesce(generation.events(generation.jobs[0]), pace):
            if isinstance(event, Delta):
                clock.tick()
                parts.append(event.text)
                text = _content(parser.feed(event.text))
                if text:
                    await out.send(_piece(generation.model, is_chat, text, done=False))
            elif isinstance(event, Finished):
                text = _content(parser.finish())
                calls = ollama_tool_calls(parser)
                if text or calls:  # as Ollama: the calls in one line, once complete
                    piece = _piece(generation.model, is_chat, text, done=False, tool_calls=calls)
                    await out.send(piece)
                final = _piece(generation.model, is_chat, "", done=True)
                final.update(clock.final(event))
                if plan is not None:
                    final.update(await plan.result("".join(parts)))
                await out.send(final)
            elif isinstance(event, Failed):
                await out.send(error_for("ollama", event.error))
        await out.close()
    except ConnectionResetError:
        pass  # the client left; the caller cancels the job
    return out.response


def _content(pieces: list[Piece]) -> str:
    """The content text of ``pieces`` (tool calls go out whole, at the end)."""
    return "".join(p.text for p in pieces if isinstance(p, ContentPiece))


# ----- embeddings -----


async def _embed(
    request: web.Request, model: str, inputs: Sequence[str], truncate: bool
) -> tuple[str, list[NDArray[np.float32]], int]:
    manager = request.app[MANAGER]
    async with lease_embedder(manager, model) as (embedder, pooling):
        # the model's embedding scheduler batches the inputs (and other requests') itself
        result: Embeddings = await embedding.embed(
            embedder, list(inputs), pooling=pooling, truncate=truncate
        )
        name = embedder.name
    return name, [result.vectors], result.prompt_tokens


@routes.post("/api/embed")
async def embed(request: web.Request) -> web.Response:
    started = time.monotonic_ns()
    req = OllamaEmbedRequest.model_validate(await read_json(request))
    keep_alive = keep_alive_seconds(req.keep_alive)
    inputs = [req.input] if isinstance(req.input, str) else req.input
    name, chunks, tokens = await _embed(request, req.model, inputs, req.truncate)
    rows = [truncate_dimensions(chunk, req.dimensions) for chunk in chunks]
    _keep_alive(request.app[MANAGER], name, keep_alive)
    return vectors_response(
        {
            "model": req.model,
            "embeddings": np.concatenate(rows) if rows else [],
            "total_duration": time.monotonic_ns() - started,
            "load_duration": 0,
            "prompt_eval_count": tokens,
        }
    )


@routes.post("/api/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    """The legacy route: one ``prompt``, one ``embedding`` (normalised, as ``/api/embed``)."""
    req = OllamaEmbeddingsRequest.model_validate(await read_json(request))
    keep_alive = keep_alive_seconds(req.keep_alive)
    name, chunks, _ = await _embed(request, req.model, [req.prompt], True)
    _keep_alive(request.app[MANAGER], name, keep_alive)
    return vectors_response({"embedding": chunks[0][0]})


# ----- pull and delete (admin) -----
