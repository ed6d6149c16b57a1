"""OpenAI request schemas (pydantic) and the response / stream-chunk shapes llmis sends.

Requests are validated with pydantic; a violation becomes a 400 naming the field. Unknown
request fields are ignored, as llama-server and Ollama do, so clients that send extra
OpenAI options keep working.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from llmis.engine import FinishReason, SamplingParams

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "StreamOptions",
    "as_batch",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "new_id",
    "usage",
]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: object) -> object:
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(
                        f"content parts of type {kind!r} are not supported; "
                        "only text parts ({'type': 'text', 'text': ...}) are"
                    )
        return value

    def as_template_message(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class JsonSchemaSpec(_Lenient):
    name: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    """OpenAI's ``response_format``: JSON output is enforced with a llama.cpp grammar."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None
    _grammar: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _to_grammar(self) -> ResponseFormat:
        if self.type == "json_object":
            self._grammar = JSON_GBNF
        elif self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("type 'json_schema' needs a 'json_schema' object with a 'schema'")
            try:
                self._grammar = json_schema_to_gbnf(json.dumps(self.json_schema.json_schema))
            except Exception as exc:  # the converter raises bare exceptions on bad schemas
                raise ValueError(f"this JSON schema cannot be enforced: {exc}") from None
        return self

    @property
    def grammar(self) -> str | None:
        return self._grammar


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingRequest(_Lenient):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    n: int = 1
    stream: bool = False

    @field_validator("n", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, value: object, info: ValidationInfo) -> object:
        """Some clients send null for options they leave unset: null means the default."""
        if value is None and info.field_name is not None:
            return cls.model_fields[info.field_name].default
        return value

    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError(
                "tool and function calling are not supported by this server; "
                "use response_format with a JSON schema for structured output"
            )
        return value

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported; send separate requests for more choices")
        return value

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value or None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling(self, max_tokens: int) -> SamplingParams:
        defaults = SamplingParams(max_tokens=max_tokens)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

        def pick(value: float | None, default: float) -> float:
            return default if value is None else value

        return SamplingParams(
            max_tokens=max_tokens,
            temperature=pick(self.temperature, defaults.temperature),
            top_p=pick(self.top_p, defaults.top_p),
            top_k=self.top_k if self.top_k is not None else defaults.top_k,
            min_p=pick(self.min_p, defaults.min_p),
            repeat_penalty=pick(self.repeat_penalty, defaults.repeat_penalty),
            presence_penalty=pick(self.presence_penalty, defaults.presence_penalty),
            frequency_penalty=pick(self.frequency_penalty, defaults.frequency_penalty),
            seed=self.seed,
            stop=stop,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            grammar=self.response_format.grammar if self.response_format else None,
        )


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _not_empty(
        cls, value: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The batch: one entry (text or token ids) per choice."""
        return as_batch(self.prompt)


def as_batch(value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """OpenAI's text-or-tokens input (``prompt``, embeddings ``input``) as a list of items."""
    if isinstance(value, str):
        return [value]
    if all(isinstance(v, int) for v in value):
        return [[int(v) for v in value]]  # type: ignore[arg-type]
    return list(value)  # type: ignore[arg-type]


# ----- responses (plain dicts: they are built per token on the hot path) -----


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
    finish_reason: FinishReason,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
) -> dict[str, Any]:
    return {
        **_envelope(id_, "chat.completion", model, created),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def chat_chunk(
    id_: str,
    model: str,
    created: int,
    delta: dict[str, str],
    finish_reason: FinishReason | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    chunk = {
        **_envelope(id_, "chat.completion.chunk", model, created),
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
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
) -> dict[str, Any]:
    return {
        **_envelope(id_, "text_completion", model, created),
        "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
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
) -> dict[str, Any]:
    chunk = {
        **_envelope(id_, "text_completion", model, created),
        "choices": [
            {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
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
