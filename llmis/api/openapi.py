"""``GET /openapi.json``: an OpenAPI 3.1 document of every route the app registers.

Request bodies are the pydantic request models' own JSON schemas (``model_json_schema``), so a
change to a model changes the document. Each operation lists the statuses it can give; every
error is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (``#/components/schemas/
Error``). Statuses the middlewares can give are listed on each operation they apply to: 401
and 403 (API keys, a foreign ``Host`` or ``Origin``), 503 while draining, 415 for a browser's
body that is not JSON, 429 from the rate limits under ``/v1/``.

The table of operations is checked against the router by ``tests/test_openapi.py``: a route
added without an entry here fails the suite.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from llmis import __version__
from llmis.api.admin import LoadBody, SwapBody, UnloadBody
from llmis.api.anthropic_protocol import CountTokensRequest, MessagesRequest
from llmis.api.embeddings import EmbeddingRequest
from llmis.api.ollama_protocol import (
    OllamaChatRequest,
    OllamaDeleteRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaPullRequest,
    OllamaShowRequest,
)
from llmis.api.responses import ResponsesRequest
from llmis.api.search import SearchRequest
from llmis.api.simple import InferBody, LoadModelBody
from llmis.serving.protocol import ChatCompletionRequest, CompletionRequest

__all__ = ["DOCUMENT", "OPERATIONS", "Operation", "build_document", "routes", "setup"]

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"

DOCUMENT: web.AppKey[bytes] = web.AppKey("openapi_document", bytes)

routes = web.RouteTableDef()

_ERRORS: Mapping[int, str] = {
    400: "The request is malformed or a parameter is out of range; `param` names it.",
    401: "A missing or unknown API key (only when API keys are configured).",
    403: "Not allowed: a user key on an admin route, a browser origin or host that is not "
    "allowed, or a model file outside the models dir.",
    404: "No such model, index, file or route.",
    409: "Conflicts with the server's state (a model name bound to another file, an index "
    "built with another model file).",
    413: "The body is larger than `[server] max_body_bytes`.",
    415: "A browser request (one with `Origin`) whose body is not `application/json`.",
    429: "A rate limit or the model's queue is full; `Retry-After` says when to retry.",
    503: "The server is draining for shutdown, or the model cannot be served now (loading, "
    "failed, or it does not fit the RAM budget); `Retry-After` when a retry can help.",
    504: "The request ran past `[limits] request_timeout` or `idle_timeout` before it "
    "started answering.",
}

# Statuses any route can give, from the middlewares (auth, host/origin checks, draining).
_ANY_ROUTE = (401, 403, 503)
# What routes under /v1/ can give besides: the rate limits.
_V1 = (429,)
# What every route with a JSON body can give: bad JSON or fields, too large, not JSON.
_BODY = (400, 413, 415)

_ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "description": "OpenAI's error shape, used for every error this server gives.",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
                "request_id": {"type": "string"},
            },
        }
    },
}

_OLLAMA_ERROR_SCHEMA: dict[str, Any] = {
    "title": "OllamaError",
    "description": "Ollama's error shape, used on every /api/ route.",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}

_ANTHROPIC_ERROR_SCHEMA: dict[str, Any] = {
    "title": "AnthropicError",
    "description": "Anthropic's error shape, used on /v1/messages routes.",
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
        "request_id": {"type": "string"},
    },
}

_NDJSON: dict[str, Any] = {
    "type": "object",
    "description": "One line of an NDJSON stream (a JSON object); the last has `done: true` "
    "(or `status: success` for a pull), or is an `{error}` object.",
}

_JSON_OBJECT: dict[str, Any] = {"type": "object"}
# In OpenAPI 3.1 the schema of `text/event-stream` describes one event.
_SSE: dict[str, Any] = {
    "type": "object",
    "description": "One server-sent event: `data` is a JSON chunk (or an error object), and "
    "the last event's `data` is `[DONE]`.",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
}


@dataclass(frozen=True)
class Operation:
    """One method on one path, as the document describes it."""

    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    statuses: tuple[int, ...] = ()  # error statuses besides those of every route
    body: type[BaseModel] | None = None
    ok: Mapping[str, Mapping[str, Any]] | None = None  # 200 content; None = a JSON object
    ok_status: int = 200
    path_params: tuple[str, ...] = ()
    description: str = ""
    # Error statuses that can also come with another body than the JSON error, by media type.
    other_error_bodies: Mapping[int, Mapping[str, Any]] | None = None
    error_schema: str = "Error"  # the API family's error shape (OllamaError, AnthropicError)

    def error_statuses(self) -> list[int]:
        codes = set(_ANY_ROUTE) | set(self.statuses)
        if self.body is not None:
            codes |= set(_BODY)
        if self.path.startswith(("/v1/", "/api/")):
            codes |= set(_V1)
        return sorted(codes)


_GENERATION = (403, 404, 409, 429, 503)
_TEXT_GENERATION = (*_GENERATION, 504)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "get",
        "/healthz",
        "healthz",
        "Readiness: 200 when ready, 503 while loading or when no configured model is usable.",
        "health",
    ),
    Operation("get", "/health", "health", "Same as /healthz.", "health"),
    Operation("get", "/version", "version", "llmis and llama.cpp versions.", "health"),
    Operation("get", "/v1/models", "listModels", "Every model and alias.", "openai"),
    Operation(
        "get",
        "/v1/models/{name}",
        "getModel",
        "One model or alias.",
        "openai",
        statuses=(400, 404),
        path_params=("name",),
    ),
    Operation(
        "post",
        "/v1/chat/completions",
        "createChatCompletion",
        "A chat completion; with `stream: true`, server-sent events.",
        "openai",
        statuses=_TEXT_GENERATION,
        body=ChatCompletionRequest,
        ok={"application/json": {"schema": _JSON_OBJECT}, "text/event-stream": {"schema": _SSE}},
    ),
    Operation(
        "post",
        "/v1/completions",
        "createCompletion",
        "A text completion; with `stream: true`, server-sent events. `model` may name a task "
        "preset (`GET /v1/models`): the prompt is then its user text, task fields such as "
        "`labels` or `length` go top-level, and the reply has a `task` object.",
        "openai",
        statuses=_TEXT_GENERATION,
        body=CompletionRequest,
        ok={"application/json": {"schema": _JSON_OBJECT}, "text/event-stream": {"schema": _SSE}},
    ),
    Operation(
        "post",
        "/v1/responses",
        "createResponse",
        "A response (OpenAI's Responses API, stateless); with `stream: true`, typed "
        "server-sent events (`event:` lines, `sequence_number`).",
        "openai",
        statuses=_TEXT_GENERATION,
        body=ResponsesRequest,
        ok={"application/json": {"schema": _JSON_OBJECT}, "text/event-stream": {"schema": _SSE}},
    ),
    Operation("get", "/models", "simpleListModels", "Every model with its state.", "simple"),
    Operation(
        "post",
        "/load",
        "simpleLoadModel",
        "Load a model the server knows, now.",
        "simple",
        statuses=(404, 409, 429),
        body=LoadModelBody,
    ),
    Operation(
        "post",
        "/infer",
        "simpleInfer",
        "Generate from `prompt` or `messages`; `?stream=true` for server-sent events.",
        "simple",
        statuses=_TEXT_GENERATION,
        body=InferBody,
        ok={"application/json": {"schema": _JSON_OBJECT}, "text/event-stream": {"schema": _SSE}},
        description=(
            "Any parameter of /v1/completions or /v1/chat/completions is accepted. The "
            "stream sends `{text}` events, then `{finish_reason, usage}` and `[DONE]`."
        ),
    ),
    Operation(
        "post",
        "/v1/embeddings",
        "createEmbedding",
        "Embeddings of one or more inputs.",
        "openai",
        statuses=_GENERATION,
        body=EmbeddingRequest,
    ),
    Operation(
        "post",
        "/v1/search",
        "search",
        "Semantic search over an index built with `llmis index`.",
        "search",
        statuses=_GENERATION,
        body=SearchRequest,
    ),
    Operation("get", "/v1/indexes", "listIndexes", "Every index.", "search"),
    Operation(
        "get",
        "/v1/ws",
        "chatSocket",
        "Chat completions over a WebSocket.",
        "openai",
        statuses=(400,),
        ok_status=101,
        ok={},
        description=(
            "Upgrade to a WebSocket (400 without the upgrade headers). Each text message is a "
            "JSON object: `{type: chat, id, ...}` with the fields of `ChatCompletionRequest` "
            "(and `trim`), `{type: cancel, id}` or `{type: ping}`. The server answers with "
            "`delta` events, then one `done` or `error` per chat id."
        ),
    ),
    Operation("get", "/admin/models", "adminListModels", "Every model with its state.", "admin"),
    Operation(
        "post",
        "/admin/models/load",
        "adminLoadModel",
        "Load a model now.",
        "admin",
        statuses=(404, 409),
        body=LoadBody,
    ),
    Operation(
        "post",
        "/admin/models/unload",
        "adminUnloadModel",
        "Drain, then free a model.",
        "admin",
        statuses=(404, 409),
        body=UnloadBody,
    ),
    Operation(
        "post",
        "/admin/models/swap",
        "adminSwapModel",
        "Load a version, then repoint an alias at it.",
        "admin",
        statuses=(404, 409),
        body=SwapBody,
    ),
    Operation(
        "get",
        "/metrics",
        "metrics",
        "Prometheus metrics.",
        "ops",
        ok={"text/plain": {"schema": {"type": "string"}}},
    ),
    Operation(
        "get",
        "/openapi.json",
        "openapi",
        "This document.",
        "ops",
    ),
    Operation(
        "get",
        "/",
        "chatPage",
        "The chat page.",
        "ui",
        ok={"text/html": {"schema": {"type": "string"}}},
    ),
    Operation(
        "get",
        "/static/{name}",
        "staticFile",
        "The chat page's assets (only the files shipped with it; anything else is a 404).",
        "ui",
        statuses=(404,),
        ok={"*/*": {"schema": {"type": "string"}}},
        path_params=("name",),
    ),
)

_OLLAMA_GENERATION = {
    "application/json": {"schema": _JSON_OBJECT},
    "application/x-ndjson": {"schema": _NDJSON},
}

OPERATIONS += (
    Operation(
        "get",
        "/api/tags",
        "ollamaTags",
        "Ollama: every model.",
        "ollama",
        error_schema="OllamaError",
    ),
    Operation(
        "get",
        "/api/ps",
        "ollamaPs",
        "Ollama: the loaded models.",
        "ollama",
        error_schema="OllamaError",
    ),
    Operation(
        "get",
        "/api/version",
        "ollamaVersion",
        "Ollama: the API version.",
        "ollama",
        error_schema="OllamaError",
    ),
    Operation(
        "post",
        "/api/show",
        "ollamaShow",
        "Ollama: one model's details.",
        "ollama",
        statuses=(404,),
        body=OllamaShowRequest,
        error_schema="OllamaError",
    ),
    Operation(
        "post",
        "/api/chat",
        "ollamaChat",
        "Ollama: a chat reply; NDJSON unless `stream: false`. `model` may name a task preset; "
        "its fields (`labels`, `length`...) go top-level or in `options`, and the last object "
        "has a `task` object.",
        "ollama",
        statuses=_TEXT_GENERATION,
        body=OllamaChatRequest,
        ok=_OLLAMA_GENERATION,
        error_schema="OllamaError",
    ),
    Operation(
        "post",
        "/api/generate",
        "ollamaGenerate",
        "Ollama: a completion of a prompt; NDJSON unless `stream: false`. `model` may name a "
        "task preset (not with `raw`), as on /api/chat.",
        "ollama",
        statuses=_TEXT_GENERATION,
        body=OllamaGenerateRequest,
        ok=_OLLAMA_GENERATION,
        error_schema="OllamaError",
    ),
    Operation(
        "post",
        "/api/embed",
        "ollamaEmbed",
        "Ollama: embeddings of one or more inputs.",
        "ollama",
        statuses=_GENERATION,
        body=OllamaEmbedRequest,
        error_schema="OllamaError",
    ),
    Operation(
        "post",
        "/api/embeddings",
        "ollamaEmbeddings",
        "Ollama (legacy): one embedding.",
        "ollama",
        statuses=_GENERATION,
        body=OllamaEmbeddingsRequest,
        error_schema="OllamaError",
    ),
    Operation(
        "post",
        "/api/pull",
        "ollamaPull",
        "Ollama: pull a model (`llmis pull`); admin only; NDJSON progress unless `stream: false`.",
        "ollama",
        body=OllamaPullRequest,
        ok=_OLLAMA_GENERATION,
        error_schema="OllamaError",
    ),
    Operation(
        "delete",
        "/api/delete",
        "ollamaDelete",
        "Ollama: unload and delete a model file of the models dir; admin only.",
        "ollama",
        statuses=(404,),
        body=OllamaDeleteRequest,
        ok={},
        error_schema="OllamaError",
    ),
)

OPERATIONS += (
    Operation(
        "post",
        "/v1/messages",
        "anthropicMessages",
        "Anthropic Messages API: a reply; with `stream: true`, Anthropic's typed events. "
        "`model` may name a task preset; its fields (`labels`, `length`...) go top-level, and "
        "the reply (streamed: `message_start` and `message_delta`) has a `task` object.",
        "anthropic",
        statuses=_TEXT_GENERATION,
        body=MessagesRequest,
        ok={"application/json": {"schema": _JSON_OBJECT}, "text/event-stream": {"schema": _SSE}},
        error_schema="AnthropicError",
    ),
    Operation(
        "post",
        "/v1/messages/count_tokens",
        "anthropicCountTokens",
        "Anthropic Messages API: the tokens of a request's prompt.",
        "anthropic",
        statuses=_GENERATION,
        body=CountTokensRequest,
        error_schema="AnthropicError",
    ),
)

_REQUEST_MODELS: tuple[type[BaseModel], ...] = tuple(
    op.body for op in OPERATIONS if op.body is not None
)


def _schemas() -> tuple[dict[type[BaseModel], dict[str, Any]], dict[str, Any]]:
    """Each request model's ``$ref`` and every schema they need, keyed for ``components``."""
    keyed, top = models_json_schema(
        [(model, "validation") for model in _REQUEST_MODELS], ref_template=REF
    )
    refs = {model: keyed[(model, "validation")] for model in _REQUEST_MODELS}
    return refs, {
        **top.get("$defs", {}),
        "Error": _ERROR_SCHEMA,
        "OllamaError": _OLLAMA_ERROR_SCHEMA,
        "AnthropicError": _ANTHROPIC_ERROR_SCHEMA,
    }


def _error_response(
    status: int, other: Mapping[str, Any] | None, schema: str = "Error"
) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": REF.format(model=schema)}}}
    if other:
        content.update(other)
    return {"description": _ERRORS[status], "content": content}


def _operation(op: Operation, refs: Mapping[type[BaseModel], Mapping[str, Any]]) -> dict[str, Any]:
    content = op.ok if op.ok is not None else {"application/json": {"schema": _JSON_OBJECT}}
    ok: dict[str, Any] = {"description": "Switching protocols" if op.ok_status == 101 else "OK"}
    if content:
        ok["content"] = {kind: dict(media) for kind, media in content.items()}
    out: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "responses": {
            str(op.ok_status): ok,
            **{
                str(s): _error_response(s, (op.other_error_bodies or {}).get(s), op.error_schema)
                for s in op.error_statuses()
            },
        },
    }
    if op.description:
        out["description"] = op.description
    if op.path_params:
        out["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in op.path_params
        ]
    if op.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": dict(refs[op.body])}},
        }
    return out


def build_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document, built from :data:`OPERATIONS` and the request models."""
    refs, schemas = _schemas()
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op, refs)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "llmis",
            "version": __version__,
            "description": "A local LLM inference server with an OpenAI-compatible API.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        # Keys are optional: auth is off unless keys are configured.
        "security": [{}, {"apiKey": []}],
    }


@routes.get("/openapi.json")
async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DOCUMENT], content_type="application/json")


def setup(app: web.Application) -> None:
    """Build the document once and add ``GET /openapi.json``."""
    app[DOCUMENT] = json.dumps(build_document(), separators=(",", ":")).encode()
    app.add_routes(routes)
