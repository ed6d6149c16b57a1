"""Typed exceptions, each carrying its HTTP status and OpenAI error fields.

:func:`error_body` is the one OpenAI-shaped error body (each API family's shape of an
:class:`APIError` is made by :func:`llmis.ops.families.error_for`):
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "APIError",
    "BadRequestError",
    "ContextOverflowError",
    "ModelFileError",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "QueueFullError",
    "error_body",
    "shown",
]


def shown(text: str, limit: int = 200) -> str:
    """A client's value for an error message: cut to ``limit`` characters."""
    return text if len(text) <= limit else text[:limit] + "..."


def error_body(
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error body; ``request_id`` (the request's id) is added when given."""
    error: dict[str, Any] = {"message": message, "type": type_, "param": param, "code": code}
    if request_id is not None:
        error["request_id"] = request_id
    return {"error": error}


class APIError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    @property
    def error_type(self) -> str:
        """OpenAI's ``type``: a 4xx raised as a plain ``APIError`` (a 409 conflict, a 404)
        is the client's ``invalid_request_error``, never a ``server_error``."""
        if self.type == "server_error" and 400 <= self.status < 500:
            return "invalid_request_error"
        return self.type


class BadRequestError(APIError):
    status = 400
    type = "invalid_request_error"


class ContextOverflowError(BadRequestError):
    code = "context_length_exceeded"


class ModelNotFoundError(APIError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(
            f"The model '{shown(name)}' does not exist. "
            "GET /v1/models lists the models served here.",
            param="model",
        )


class ModelFileError(APIError):
    """A model file that cannot be found, is outside the models dir, or is not GGUF."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_model_file"


class ModelUnavailableError(APIError):
    status = 503
    type = "server_error"
    code = "model_unavailable"


class QueueFullError(APIError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, model: str, capacity: int, retry_after: int = 1) -> None:
        super().__init__(
            f"The queue for model '{model}' is full ({capacity} requests waiting); "
            f"retry after {retry_after}s.",
            headers={"Retry-After": str(retry_after)},
        )
