"""Ollama's API (``docs/api.md``) as a thin translation onto the serving layer.

``/api/chat`` and ``/api/generate`` become OpenAI requests (:mod:`llmis.api.ollama_protocol`)
served by :mod:`llmis.serving.generation`: the same limits, metrics, auth, request ids and
cancellation.
Streams are NDJSON (``application/x-ndjson``), one compact JSON object a line, the last with
``"done": true``, ``done_reason`` and the counts and durations (nanoseconds). Errors are
``{"error": "..."}`` (the error middleware picks the shape by path; :mod:`llmis.ops.families`);
an error after a stream started is sent as its last line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from numpy.typing import NDArray

from llmis import __version__
from llmis.api.middleware import read_json, request_policy
from llmis.api.ollama_protocol import (
    OllamaChatRequest,
    OllamaDeleteRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaPullRequest,
    OllamaShowRequest,
    keep_alive_seconds,
    task_fields,
)
from llmis.api.sse import within
from llmis.config import Settings
from llmis.engine.jobs import Delta, Failed, Finished
from llmis.errors import APIError, BadRequestError, ModelNotFoundError
from llmis.hub.pull import PARTIAL_DIR, PullError, pull_remote
from llmis.models.entry import ModelEntry, ModelState
from llmis.models.manager import ModelManager
from llmis.models.splits import split_part_paths
from llmis.ops.app_keys import MANAGER, PRESETS, SETTINGS, task_services
from llmis.ops.auth import KEYRING, PermissionDeniedError, is_admin_request
from llmis.ops.families import error_for
from llmis.serving import embeddings as embedding
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
_FOREVER = dt.datetime(2318, 1, 1, tzinfo=dt.timezone.utc)  # as Ollama shows keep_alive -1

routes = web.RouteTableDef()
logger = logging.getLogger(__name__)


def _timestamp(at: float | None = None) -> str:
    moment = dt.datetime.fromtimestamp(time.time() if at is None else at, dt.timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


class NdjsonStream:
    """A prepared NDJSON response; writes raise ``ConnectionResetError`` once the client left."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.write_timeout = request.app[SETTINGS].server.write_timeout_seconds
        self.response = web.StreamResponse(
            status=200, headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"}
        )

    async def prepare(self) -> None:
        await self.response.prepare(self.request)

    async def send(self, payload: dict[str, Any]) -> None:
        line = json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n"
        try:
            await within(self.response.write(line.encode()), self.write_timeout)
        except asyncio.TimeoutError:
            if self.request.transport is not None:
                self.request.transport.abort()
            raise ConnectionResetError("the client stopped reading") from None

    async def close(self) -> None:
        await self.response.write_eof()


# ----- models -----


def _details(entry: ModelEntry) -> dict[str, Any]:
    info = entry.info
    family = info.architecture if info is not None else ""
    size = ""
    if info is not None and info.parameters:
        n = info.parameters
        size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": size,
        "quantization_level": info.quant if info is not None else "",
    }


def _file_facts(entry: ModelEntry) -> tuple[str, str]:
    """``modified_at`` and ``digest``: the digest names the file version (sha256 of its path,
    size and mtime), not its bytes, which would mean hashing gigabytes per listing."""
    path = entry.path
    if path is None:
        return _timestamp(entry.created), ""
    try:
        stat = path.stat()
    except OSError:
        return _timestamp(entry.created), ""
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    return _timestamp(stat.st_mtime), hashlib.sha256(key).hexdigest()


def _named(manager: ModelManager) -> list[tuple[str, ModelEntry]]:
    """Every model and alias (whose target exists) with its entry."""
    out = [(e.name, e) for e in manager.entries()]
    entries = {e.name: e for e in manager.entries()}
    out += [(a, entries[t]) for a, t in manager.aliases().items() if t in entries]
    return out


def _model(name: str, entry: ModelEntry) -> dict[str, Any]:
    modified, digest = _file_facts(entry)
    return {
        "name": name,
        "model": name,
        "modified_at": modified,
        "size": entry.info.file_size if entry.info is not None else 0,
        "digest": digest,
        "details": _details(entry),
    }


@routes.get("/api/tags")
async def tags(request: web.Request) -> web.Response:
    """Every model the server can serve, loaded or not."""
    manager = request.app[MANAGER]
    await manager.refresh()
    models = [_model(n, e) for n, e in _named(manager)]
    for preset in request.app[PRESETS].openai_objects(manager):  # with their model's facts
        with contextlib.suppress(ModelNotFoundError):
            models.append(_model(preset["id"], manager.entry(preset["model"] or "")))
    return web.json_response({"models": models})


@routes.get("/api/ps")
async def ps(request: web.Request) -> web.Response:
    """The loaded models, their memory and when they unload (``keep_alive``)."""
    manager = request.app[MANAGER]
    running = []
    for name, entry in _named(manager):
        if entry.state is not ModelState.LOADED:
            continue
        expires = entry.expires_at
        item = _model(name, entry)
        item.update(
            size=entry.ram_bytes,
            expires_at=_timestamp(expires) if expires is not None else _FOREVER.isoformat(),
            size_vram=0,
            context_length=entry.settings.n_ctx,
        )
        running.append(item)
    return web.json_response({"models": running})


@routes.post("/api/show")
async def show(request: web.Request) -> web.Response:
    req = OllamaShowRequest.model_validate(await read_json(request))
    manager = request.app[MANAGER]
    await manager.refresh()
    found = request.app[PRESETS].lookup(req.model, manager)
    entry = manager.entry(found[1] if found is not None else req.model)  # a preset: its model
    info = entry.info
    model_info: dict[str, Any] = {}
    if info is not None:
        arch = info.architecture
        model_info = {
            "general.architecture": arch,
            "general.parameter_count": info.parameters,
            "general.file_type": info.quant,
        }
        if info.name:
            model_info["general.name"] = info.name
        for key, value in (
            ("context_length", info.context_length),
            ("block_count", info.block_count),
            ("embedding_length", info.embedding_length),
            ("attention.head_count", info.head_count),
            ("attention.head_count_kv", info.head_count_kv),
            ("vocab_size", info.vocab_size),
        ):
            if value is not None:
                model_info[f"{arch}.{key}"] = value
    if entry.settings.embedding:
        capabilities = ["embedding"]
    elif found is None and info is not None and info.has_chat_template:
        capabilities = ["completion", "tools"]  # /api/chat's tools go through the template
    else:
        capabilities = ["completion"]
    modified, _ = _file_facts(entry)
    body: dict[str, Any] = {
        "modelfile": "",
        "parameters": f"num_ctx {entry.settings.n_ctx}",
        "template": "",
        "details": _details(entry),
        "model_info": model_info,
        "capabilities": capabilities,
        "modified_at": modified,
    }
    if found is not None:
        preset, model = found
        body["system"] = preset.system or ""
        body["preset"] = {"name": preset.name, "task": preset.task, "model": model}
    return web.json_response(body)


@routes.get("/api/version")
async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_API_VERSION, "llmis_version": __version__})


# ----- generation -----


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
    body: dict[str, Any] = {"model": model, "created_at": _timestamp()}
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
            return await _stream(request, generation, is_chat, clock, plan)
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
    body: dict[str, Any] = {"model": model, "created_at": _timestamp()}
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
    plan: TaskPlan | None = None,
) -> web.StreamResponse:
    out = NdjsonStream(request)
    parts: list[str] = []
    try:
        await out.prepare()
        parser = generation.parser()
        async for event in generation.events(generation.jobs[0]):
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
    rows: list[list[float]] = []
    for chunk in chunks:
        rows.extend(truncate_dimensions(chunk, req.dimensions).tolist())
    _keep_alive(request.app[MANAGER], name, keep_alive)
    return web.json_response(
        {
            "model": req.model,
            "embeddings": rows,
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
    return web.json_response({"embedding": chunks[0][0].tolist()})


# ----- pull and delete (admin) -----


def _require_admin(request: web.Request, what: str) -> None:
    if not is_admin_request(request.app[KEYRING], request):
        raise PermissionDeniedError(f"{what} needs an admin API key.")


def _hub_source(name: str) -> str:
    """Ollama's ``hf.co/owner/repo:QUANT`` is ``owner/repo:QUANT`` for ``llmis pull``."""
    for prefix in ("https://", "http://"):
        name = name.removeprefix(prefix)
    for host in ("hf.co/", "huggingface.co/"):
        if name.startswith(host):
            return name[len(host) :]
    return name


def _partial_bytes(models_dir: Path) -> int:
    try:
        return sum(p.stat().st_size for p in (models_dir / PARTIAL_DIR).glob("*.part"))
    except OSError:
        return 0


def _pull(source: str, settings: Settings) -> list[Path]:
    """:func:`pull_remote` with its failures as 400s (blocking)."""
    try:
        return pull_remote(source, settings)[0]
    except PullError as exc:
        raise BadRequestError(str(exc), param="model", code="pull_failed") from None
    except Exception:
        logger.exception("pulling %r failed", source)
        raise APIError("The pull failed; the reason is in the server log.") from None


@routes.post("/api/pull")
async def pull(request: web.Request) -> web.StreamResponse:
    """``llmis pull`` over HTTP, with NDJSON progress; only with an admin key (it writes
    models to the server's disk)."""
    _require_admin(request, "Pulling models")
    req = OllamaPullRequest.model_validate(await read_json(request))
    settings = request.app[SETTINGS]
    manager = request.app[MANAGER]
    source = _hub_source(req.model)
    loop = asyncio.get_running_loop()
    task = loop.run_in_executor(None, _pull, source, settings)
    if not req.stream:
        await asyncio.shield(task)
        await manager.refresh()
        return web.json_response({"status": "success"})
    out = NdjsonStream(request)
    try:
        await out.prepare()
        await out.send({"status": "pulling manifest"})
        while not task.done():
            await asyncio.wait([task], timeout=settings.server.keepalive_seconds)
            if not task.done():
                partial = _partial_bytes(settings.server.models_dir)
                await out.send({"status": f"pulling {source}", "completed": partial})
        try:
            paths = task.result()
        except APIError as exc:
            await out.send({"error": exc.message})
        else:
            for path in paths:
                size = path.stat().st_size
                await out.send({"status": f"pulling {path.name}", "total": size, "completed": size})
            await out.send({"status": "verifying sha256 digest"})
            await manager.refresh()
            await out.send({"status": "writing manifest"})
            await out.send({"status": "success"})
        await out.close()
    except ConnectionResetError:
        pass  # the pull itself finishes in its thread
    return out.response


@routes.delete("/api/delete")
async def delete(request: web.Request) -> web.Response:
    """Unload and delete a model file of the models dir; only with an admin key. Models
    named in the config are not files of the API's to delete (400)."""
    _require_admin(request, "Deleting models")
    req = OllamaDeleteRequest.model_validate(await read_json(request))
    manager = request.app[MANAGER]
    entry = manager.entry(req.model)
    if req.model != entry.name:
        raise BadRequestError(
            f"'{req.model}' is an alias; delete the model it names ('{entry.name}')",
            param="model",
        )
    if entry.source != "models_dir":
        raise BadRequestError(
            f"model '{entry.name}' is defined in the server config; remove it there",
            param="model",
        )
    await manager.unload(entry.name)
    path = entry.path or manager.models_dir / f"{entry.name}.gguf"

    def remove() -> None:
        for part in split_part_paths(path):
            part.unlink(missing_ok=True)

    await asyncio.get_running_loop().run_in_executor(None, remove)
    await manager.refresh()
    return web.Response(status=200)
