"""``GET /openapi.json``: an OpenAPI 3.1 document of every route the app registers.

Request bodies are the pydantic request models' own JSON schemas (``model_json_schema``), so a
change to a model changes the document. Each operation lists the statuses it can give; every
error is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (``#/components/schemas/
Error``). Statuses the middlewares can give are listed on each operation they apply to: 401
and 403 (API keys, a foreign ``Host`` or ``Origin``), 503 while draining, 415 for a browser's
body that is not JSON, 429 from the rate limits under ``/v1/``.

The table of operations is in :mod:`llmis.api.openapi_operations`; ``tests/test_openapi.py``
checks it against the router.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from llmis import __version__
from llmis.api.openapi_operations import JSON_OBJECT, OPERATIONS, REQUEST_MODELS, Operation

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


def _schemas() -> tuple[dict[type[BaseModel], dict[str, Any]], dict[str, Any]]:
    """Each request model's ``$ref`` and every schema they need, keyed for ``components``."""
    keyed, top = models_json_schema(
        [(model, "validation") for model in REQUEST_MODELS], ref_template=REF
    )
    refs = {model: keyed[(model, "validation")] for model in REQUEST_MODELS}
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
    content = op.ok if op.ok is not None else {"application/json": {"schema": JSON_OBJECT}}
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
