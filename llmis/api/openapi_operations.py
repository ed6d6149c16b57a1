"""The table of operations ``GET /openapi.json`` describes: every method and path the app
registers, with its request model, the statuses it can give and its 200 content.

``tests/test_openapi.py`` checks the table against the router: a route added without an entry
here fails the suite. The document itself is built by :mod:`llmis.api.openapi`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

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
from llmis.api.responses_protocol import ResponsesRequest
from llmis.api.search import SearchRequest
from llmis.api.simple import InferBody, LoadModelBody
from llmis.serving.protocol import ChatCompletionRequest, CompletionRequest

__all__ = ["JSON_OBJECT", "OPERATIONS", "REQUEST_MODELS", "Operation"]

# Statuses any route can give, from the middlewares (auth, host/origin checks, draining).
_ANY_ROUTE = (401, 403, 503)
# What routes under /v1/ can give besides: the rate limits.
_V1 = (429,)
# What every route with a JSON body can give: bad JSON or fields, too large, not JSON.
_BODY = (400, 413, 415)

_NDJSON: dict[str, Any] = {
    "type": "object",
    "description": "One line of an NDJSON stream (a JSON object); the last has `done: true` "
    "(or `status: success` for a pull), or is an `{error}` object.",
}

JSON_OBJECT: dict[str, Any] = {"type": "object"}
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
        ok={"application/json": {"schema": JSON_OBJECT}, "text/event-stream": {"schema": _SSE}},
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
        ok={"application/json": {"schema": JSON_OBJECT}, "text/event-stream": {"schema": _SSE}},
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
        ok={"application/json": {"schema": JSON_OBJECT}, "text/event-stream": {"schema": _SSE}},
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
        ok={"application/json": {"schema": JSON_OBJECT}, "text/event-stream": {"schema": _SSE}},
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
    "application/json": {"schema": JSON_OBJECT},
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
        ok={"application/json": {"schema": JSON_OBJECT}, "text/event-stream": {"schema": _SSE}},
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

REQUEST_MODELS: tuple[type[BaseModel], ...] = tuple(
    op.body for op in OPERATIONS if op.body is not None
)
