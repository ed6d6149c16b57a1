"""OpenAI's response bodies and stream chunks for chat and completions.

Plain dicts, not pydantic models: they are built per token on the hot path.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from llmis.serving.protocol import FinishReason

__all__ = [
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "new_id",
    "now",
    "usage",
    "usage_chunk",
]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _envelope(id_: str, obj: str, model: str, created: int) -> dict[str, Any]:
    return {
        "id": id_,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": "llmis",
    }


def chat_response(
    id_: str,
    model: str,
    created: int,
    content: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    tool_calls: list[dict[str, Any]] | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["content"] = content or None
        message["tool_calls"] = tool_calls
    return {
        **_envelope(id_, "chat.completion", model, created),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def chat_chunk(
    id_: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    include_usage: bool = False,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    chunk = {
        **_envelope(id_, "chat.completion.chunk", model, created),
        "choices": [
            {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def completion_response(
    id_: str,
    model: str,
    created: int,
    choices: list[tuple[str, FinishReason]],
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    logprobs: list[dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    return {
        **_envelope(id_, "text_completion", model, created),
        "choices": [
            {
                "index": i,
                "text": text,
                "logprobs": logprobs[i] if logprobs else None,
                "finish_reason": reason,
            }
            for i, (text, reason) in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def completion_chunk(
    id_: str,
    model: str,
    created: int,
    index: int,
    text: str,
    finish_reason: FinishReason | None = None,
    include_usage: bool = False,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    chunk = {
        **_envelope(id_, "text_completion", model, created),
        "choices": [
            {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(
    id_: str,
    obj: str,
    model: str,
    created: int,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
) -> dict[str, Any]:
    return {
        **_envelope(id_, obj, model, created),
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def now() -> int:
    return int(time.time())
