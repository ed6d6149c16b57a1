"""OpenAI request schemas (pydantic) and the response / stream-chunk shapes llmis sends.

Requests are validated with pydantic; a violation becomes a 400 naming the field. Unknown
request fields are ignored, as llama-server and Ollama do, so clients that send extra
OpenAI options keep working. ``null`` means the field's default everywhere.

Every sampling parameter is bounded to a range where llama.cpp's samplers are safe (no
division by zero, no overflow to infinity in float32, no int32 wrap-around); the ranges are
in :data:`SAMPLING_RANGES` and in the README.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from llmis.errors import BadRequestError, shown

# Why a choice ended, as OpenAI's finish_reason reports it.
FinishReason = Literal["stop", "length", "content_filter", "tool_calls"]

__all__ = [
    "GREEDY_BELOW",
    "MAX_SCHEMA_BYTES",
    "MAX_STOPS",
    "MAX_STOP_CHARS",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "FinishReason",
    "LenientModel",
    "ResponseFormat",
    "StreamOptions",
    "as_batch",
]


MAX_STOPS = 16  # stop strings per request (OpenAI allows 4; each is checked at every token)
MAX_STOP_CHARS = 256  # characters per stop string
MAX_SCHEMA_BYTES = 64 * 1024  # a response_format JSON schema, serialized
MAX_LOGIT_BIAS = 1024  # entries in logit_bias
MAX_TOKEN_ID = 2**31 - 1  # llama.cpp token ids are int32
MAX_NAME_CHARS = 256  # a model name
MAX_TOP_LOGPROBS = 20  # alternatives per token in logprobs (OpenAI's limit)
# A temperature above 0 but below this samples greedily: dividing logits by a tiny float32
# overflows to infinity, and the limit of sampling as the temperature goes to 0 is argmax.
GREEDY_BELOW = 0.01


class LenientModel(BaseModel):
    """Unknown fields are ignored; ``null`` for a field with a non-null default is the default;
    NaN and infinities are refused."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _null_is_default(cls, value: object, info: ValidationInfo) -> object:
        """Some clients send null for options they leave unset: null means the default."""
        if value is None and info.field_name is not None:
            field = cls.model_fields[info.field_name]
            if not field.is_required() and field.default is not None:
                return field.get_default(call_default_factory=True)
        return value


_Lenient = LenientModel


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


MAX_TOOLS = 128  # functions per request
TOOL_NAME = r"^[A-Za-z0-9_.-]{1,64}$"  # OpenAI's rule for a function name


class FunctionCall(_Lenient):
    name: str = Field(min_length=1, max_length=256)
    arguments: str = ""


class AssistantToolCall(_Lenient):
    """A tool call in an assistant message of the history (``message.tool_calls[i]``)."""

    id: str = Field(default="", max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(_Lenient):
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Lenient):
    name: str = Field(min_length=1, max_length=256)


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = Field(default=None, max_length=256)

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
        message: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            message["name"] = self.name
        return message


class JsonSchemaSpec(_Lenient):
    name: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    """OpenAI's ``response_format``: JSON output is enforced with a llama.cpp grammar.

    Validation only checks the schema's size (at most :data:`MAX_SCHEMA_BYTES` as JSON);
    turning it into a grammar is CPU work, done once by
    :func:`llmis.serving.formats.compile_grammar` in a thread (the handlers call it), or on
    first use if that was skipped, so a request is never served unconstrained.
    """

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None
    _schema_text: str | None = PrivateAttr(default=None)
    _grammar: str | None = PrivateAttr(default=None)
    _compiled: bool = PrivateAttr(default=False)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _bounded(self) -> ResponseFormat:
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("type 'json_schema' needs a 'json_schema' object with a 'schema'")
            try:
                text = json.dumps(self.json_schema.json_schema, separators=(",", ":"))
            except (RecursionError, ValueError):
                raise ValueError("the JSON schema is nested too deeply") from None
            if len(text.encode()) > MAX_SCHEMA_BYTES:
                raise ValueError(
                    f"the JSON schema is {len(text.encode())} bytes as JSON; "
                    f"at most {MAX_SCHEMA_BYTES} are accepted"
                )
            self._schema_text = text
        return self

    @classmethod
    def from_grammar(cls, grammar: str) -> ResponseFormat:
        """A format whose output follows the GBNF ``grammar`` (server-made, e.g. a preset's)."""
        made = cls(type="text")
        made._grammar, made._compiled = grammar, True
        return made

    @property
    def schema_text(self) -> str | None:
        """The ``json_schema`` type's schema, serialised (``None`` for the other types)."""
        return self._schema_text

    def grammar_with(self, build: Callable[[ResponseFormat], str | None]) -> str | None:
        """The grammar ``build`` makes of this format, built once (blocking). Idempotent."""
        with self._lock:
            if not self._compiled:
                self._grammar = build(self)
                self._compiled = True
            return self._grammar


class StreamOptions(_Lenient):
    include_usage: bool = False
    # llmis: tokens per stream event, and coalescing of events closer than this
    # (llmis.serving.chunking)
    chunk_tokens: int | None = Field(default=None, ge=1, le=4096)
    min_interval_ms: float | None = Field(default=None, ge=0.0, le=60_000.0)


MAX_TOKENS = 1_048_576  # the largest n_ctx a model can be configured with

StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class _SamplingRequest(_Lenient):
    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=MAX_TOKEN_ID)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repeat_penalty: float | None = Field(default=None, ge=0.01, le=100.0)
    logit_bias: (
        Annotated[
            dict[
                Annotated[str, Field(pattern=r"^[0-9]{1,10}$")],
                Annotated[float, Field(ge=-100.0, le=100.0)],
            ],
            Field(max_length=MAX_LOGIT_BIAS),
        ]
        | None
    ) = None
    n: int = 1
    stream: bool = False

    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    functions: list[Any] | None = None

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError(
                "the deprecated 'functions' parameter is not supported; send 'tools' "
                "(chat completions) instead"
            )
        return value

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported; send separate requests for more choices")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stops_bounded(cls, value: object) -> object:
        """One clear message per problem instead of pydantic's union of two."""
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list):
            if len(items) > MAX_STOPS:
                raise ValueError(f"at most {MAX_STOPS} stop strings are accepted, got {len(items)}")
            for item in items:
                if isinstance(item, str) and not item:
                    raise ValueError("stop strings must not be empty")
                if isinstance(item, str) and len(item) > MAX_STOP_CHARS:
                    raise ValueError(
                        f"stop strings may have at most {MAX_STOP_CHARS} characters, "
                        f"got one of {len(item)}"
                    )
        return value

    @field_validator("stop")
    @classmethod
    def _no_empty_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        return value or None

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _token_ids(cls, value: object) -> object:
        if isinstance(value, dict):
            for key in value:
                if not (isinstance(key, str) and key.isascii() and key.isdigit()) or (
                    int(key) > MAX_TOKEN_ID
                ):
                    raise ValueError(
                        f"logit_bias keys must be token ids (0 to {MAX_TOKEN_ID}), "
                        f"got {str(key)[:40]!r}"
                    )
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    tools: Annotated[list[ToolDef], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        if self.tool_choice is not None and not self.tools and self.tool_choice != "none":
            raise BadRequestError(
                "tool_choice: tool_choice is only allowed when tools are specified",
                param="tool_choice",
                code="invalid_value",
            )
        names = [tool.function.name for tool in self.tools or ()]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise BadRequestError(
                    f"tools: the function name {name!r} is declared twice",
                    param=f"tools.{i}.function.name",
                    code="invalid_value",
                )
        if isinstance(self.tool_choice, NamedToolChoice):
            wanted = self.tool_choice.function.name
            if wanted not in names:
                raise BadRequestError(
                    f"tool_choice: no function named {shown(wanted)!r} is in tools",
                    param="tool_choice",
                    code="invalid_value",
                )
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequestError(
                "top_logprobs: top_logprobs needs logprobs set to true",
                param="top_logprobs",
                code="invalid_value",
            )
        return self

    @property
    def n_logprobs(self) -> int | None:
        """How many alternatives per token the job reports (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1, le=MAX_TOKENS)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tools are supported on /v1/chat/completions, not on completions")
        return value

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
