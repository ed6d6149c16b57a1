"""The API family a route belongs to, and an error in that family's own shape.

One server speaks three wire formats over the same serving layer: OpenAI (``/v1/...``),
Ollama (``/api/...``) and Anthropic's Messages API (``/v1/messages...``). Errors raised
anywhere (validation, auth, queues, the models) are typed :class:`~llmis.errors.APIError` s;
the error middleware turns them into the calling family's body:

- OpenAI: ``{"error": {"message", "type", "param", "code", "request_id"}}``;
- Ollama: ``{"error": "message"}``;
- Anthropic: ``{"type": "error", "error": {"type", "message"}, "request_id"}`` with
  Anthropic's error types, chosen by status.
"""

from __future__ import annotations

from typing import Any, Literal

from llmis.errors import APIError, error_body
from llmis.ops.request_context import current_request

__all__ = ["ANTHROPIC_TYPES", "Family", "api_family", "error_for", "family_error_body"]

Family = Literal["openai", "ollama", "anthropic"]

# Anthropic's error type for each status (docs "Errors"); other 5xx are api_error.
ANTHROPIC_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def api_family(path: str) -> Family:
    """Which API a request path belongs to."""
    if path == "/api" or path.startswith("/api/"):
        return "ollama"
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    return "openai"


def family_error_body(
    family: Family,
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """An error body in ``family``'s shape, naming the request being handled, if any."""
    request = current_request()
    if family == "ollama":
        return {"error": message}
    if family == "anthropic":
        kind = ANTHROPIC_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
        if request is not None:
            body["request_id"] = request.id
        return body
    return error_body(message, type_, param, code, request.id if request is not None else None)


def error_for(family: Family, exc: APIError) -> dict[str, Any]:
    """``exc`` as ``family`` shapes its errors."""
    return family_error_body(family, exc.status, exc.message, exc.error_type, exc.param, exc.code)
