"""Validating a translated request (Ollama, Anthropic) as the OpenAI request it became,
with a 400 that names the field the client sent, not the OpenAI one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from llmis.api.middleware import validation_error
from llmis.errors import BadRequestError

__all__ = ["validate_as"]

M = TypeVar("M", bound=BaseModel)


def validate_as(model: type[M], body: dict[str, Any], names: Mapping[str, str]) -> M:
    """``body`` validated as ``model``; ``names`` maps an OpenAI field to the client's."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = validation_error(exc)
        param = err.param or ""
        head, _, rest = param.partition(".")
        named = names.get(head, head) + (f".{rest}" if rest else "")
        message = err.message.replace(f"{param}:", f"{named}:", 1) if param else err.message
        raise BadRequestError(message, param=named or None, code=err.code) from None
