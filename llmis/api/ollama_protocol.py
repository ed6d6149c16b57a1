"""Ollama request schemas (``docs/api.md``) and their translation to llmis's OpenAI requests.

Every Ollama generation request becomes a :class:`~llmis.serving.protocol.ChatCompletionRequest` or
:class:`~llmis.serving.protocol.CompletionRequest`, so the same validation, ranges, grammar and
serving path apply. A violation found there is reported under the Ollama field's name
(``options.num_predict``, ``format``...).

``options``: ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``num_predict`` (-1 and -2:
until the context is full), ``stop``, ``seed``, ``repeat_penalty``, ``presence_penalty``,
``frequency_penalty`` are honoured; ``num_ctx`` is accepted and ignored (a model's context is
fixed when it loads and shared by every client); other options are ignored, as Ollama
ignores unknown ones.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator

from llmis.api.translate import validate_as
from llmis.errors import BadRequestError
from llmis.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LenientModel,
    StreamOptions,
)
from llmis.tasks.plan import TASK_FIELDS

__all__ = [
    "OllamaChatRequest",
    "OllamaDeleteRequest",
    "OllamaEmbedRequest",
    "OllamaEmbeddingsRequest",
    "OllamaGenerateRequest",
    "OllamaMessage",
    "OllamaOptions",
    "OllamaPullRequest",
    "OllamaShowRequest",
    "keep_alive_seconds",
    "task_fields",
]

_DURATION = re.compile(r"(-?[0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_MAX_KEEP_ALIVE = 10 * 365 * 86400.0  # longer than this is "forever"

# OpenAI field -> the Ollama field a client sent, for error messages
_PARAMS = {
    "max_tokens": "options.num_predict",
    "temperature": "options.temperature",
    "top_p": "options.top_p",
    "top_k": "options.top_k",
    "min_p": "options.min_p",
    "stop": "options.stop",
    "seed": "options.seed",
    "repeat_penalty": "options.repeat_penalty",
    "presence_penalty": "options.presence_penalty",
    "frequency_penalty": "options.frequency_penalty",
    "response_format": "format",
    "prompt": "prompt",
    "messages": "messages",
    "model": "model",
}


def keep_alive_seconds(value: float | str | None) -> float | None:
    """Ollama's ``keep_alive``: seconds (a number) or a Go duration (``"5m"``, ``"1h30m"``);
    negative = forever. ``None`` when absent."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text.replace("+", ""):
                raise BadRequestError(
                    f"keep_alive: {value[:40]!r} is not a duration (say 300, '5m' or '-1')",
                    param="keep_alive",
                ) from None
            seconds = sum(float(n) * _UNIT[u] for n, u in parts)
    else:
        seconds = float(value)
    return -1.0 if seconds < 0 or seconds > _MAX_KEEP_ALIVE else seconds


def _no_images(value: list[str] | None) -> list[str] | None:
    if value:
        raise ValueError("images are not supported: the models this server runs read text")
    return value


# Ollama's ``images`` (chat messages and generate): accepted only when empty
NoImages = Annotated[list[str] | None, AfterValidator(_no_images)]


class OllamaOptions(LenientModel):
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    num_predict: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: int | None = Field(default=None, ge=1, description="accepted and ignored")

    @field_validator("num_predict")
    @classmethod
    def _predict(cls, value: int | None) -> int | None:
        if value is not None and value < -2:
            raise ValueError("num_predict must be positive, -1 (no limit) or -2 (fill the context)")
        return value

    def sampling_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            name: getattr(self, name)
            for name in (
                "temperature",
                "top_p",
                "top_k",
                "min_p",
                "stop",
                "seed",
                "repeat_penalty",
                "presence_penalty",
                "frequency_penalty",
            )
            if getattr(self, name) is not None
        }
        if self.num_predict is not None and self.num_predict > 0:
            out["max_tokens"] = self.num_predict
        elif self.num_predict == 0:
            raise BadRequestError(
                "options.num_predict must be positive, -1 or -2", param="options.num_predict"
            )
        return out


Format = Literal["", "json"] | dict[str, Any] | None


def _format_field(value: Format) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}


class _Generating(LenientModel):
    model: str = Field(min_length=1, max_length=256)
    stream: bool = True
    options: OllamaOptions | None = None
    format: Format = None
    keep_alive: float | str | None = None
    think: bool | str | None = None
    # llmis: tokens per NDJSON line and pacing, as OpenAI's stream_options (llmis.serving.chunking)
    stream_options: StreamOptions | None = None

    @field_validator("think")
    @classmethod
    def _no_thinking(cls, value: bool | str | None) -> bool | str | None:
        if value not in (None, False, "false", ""):
            raise ValueError("thinking is not supported by the models this server runs")
        return value

    def _openai_fields(self) -> dict[str, Any]:
        fields = self.options.sampling_fields() if self.options is not None else {}
        fields["model"] = self.model
        if self.stream_options is not None:
            fields["stream_options"] = self.stream_options.model_dump(exclude_none=True)
        response_format = _format_field(self.format)
        if response_format is not None:
            fields["response_format"] = response_format
        return fields

    @property
    def keep_alive_seconds(self) -> float | None:
        return keep_alive_seconds(self.keep_alive)


class OllamaFunctionCall(LenientModel):
    name: str = Field(min_length=1, max_length=256)
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class OllamaToolCall(LenientModel):
    """A call in an assistant message of the history: ``{"function": {"name", "arguments"}}``
    with ``arguments`` an object (a JSON string is taken too)."""

    function: OllamaFunctionCall


class OllamaMessage(LenientModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: NoImages = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = Field(default=None, max_length=256)
    thinking: str | None = None


def _openai_messages(messages: list[OllamaMessage]) -> list[dict[str, Any]]:
    """Ollama's history as OpenAI messages: calls get ids (Ollama has none), and a ``tool``
    message answers the oldest unanswered call (of its ``tool_name``, if given)."""
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (id, name) of calls not answered yet
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.role == "assistant" and m.tool_calls:
            calls: list[dict[str, Any]] = []
            for call in m.tool_calls:
                args = call.function.arguments
                call_id = f"call_{len(out)}_{len(calls)}"
                calls.append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": call.function.name,
                            "arguments": args if isinstance(args, str) else json.dumps(args),
                        },
                    }
                )
                pending.append((call_id, call.function.name))
            message["tool_calls"] = calls
        elif m.role == "tool":
            match = next((p for p in pending if m.tool_name in (None, p[1])), None)
            if match is not None:
                pending.remove(match)
                message["tool_call_id"] = match[0]
            name = m.tool_name or (match[1] if match is not None else None)
            if name is not None:
                message["name"] = name
        out.append(message)
    return out


class OllamaChatRequest(_Generating):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[Any] | None = None

    def chat_body(self) -> dict[str, Any]:
        """The OpenAI chat body this request becomes (not validated yet)."""
        body = self._openai_fields()
        body["messages"] = _openai_messages(self.messages)
        if self.tools:
            body["tools"] = self.tools
        return body

    def to_openai(self) -> ChatCompletionRequest:
        request: ChatCompletionRequest = validate_as(
            ChatCompletionRequest, self.chat_body(), _PARAMS
        )
        return request


class OllamaGenerateRequest(_Generating):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: NoImages = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None

    @field_validator("suffix", "template")
    @classmethod
    def _unsupported_text(cls, value: str | None, info: Any) -> str | None:
        if value:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value

    @field_validator("context")
    @classmethod
    def _no_context(cls, value: list[int] | None) -> list[int] | None:
        if value:
            raise ValueError("context is not supported; send the conversation to /api/chat")
        return value

    def to_openai(self) -> ChatCompletionRequest | CompletionRequest:
        """``raw``: the prompt as is (a completion); otherwise through the chat template."""
        if self.raw:
            body = self._openai_fields()
            body["prompt"] = self.prompt
            completion: CompletionRequest = validate_as(CompletionRequest, body, _PARAMS)
            if "max_tokens" not in body:
                completion.max_tokens = None  # Ollama's default: until the context is full
            return completion
        chat: ChatCompletionRequest = validate_as(ChatCompletionRequest, self.chat_body(), _PARAMS)
        return chat

    def chat_body(self) -> dict[str, Any]:
        """The OpenAI chat body a templated (not ``raw``) request becomes: ``system``, then
        ``prompt`` as the user message."""
        body = self._openai_fields()
        messages = [{"role": "system", "content": self.system}] if self.system else []
        body["messages"] = [*messages, {"role": "user", "content": self.prompt}]
        return body


def task_fields(body: Any) -> dict[str, Any]:
    """A preset's task fields (``labels``, ``length``...) in an Ollama body: top-level, or
    in ``options`` (where the ``ollama`` client lets a caller add any key); top-level wins."""
    if not isinstance(body, dict):
        return {}
    options = body.get("options")
    found = {k: options[k] for k in TASK_FIELDS if isinstance(options, dict) and k in options}
    found.update({k: body[k] for k in TASK_FIELDS if k in body})
    return found


class OllamaEmbedRequest(LenientModel):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] = Field(min_length=1, max_length=2048)
    truncate: bool = True
    dimensions: int | None = Field(default=None, ge=1)
    keep_alive: float | str | None = None
    options: dict[str, Any] | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        items = [value] if isinstance(value, str) else value
        if any(not item for item in items):
            raise ValueError("input texts must not be empty")
        return value


class OllamaEmbeddingsRequest(LenientModel):
    """The legacy ``/api/embeddings``: one ``prompt``, one ``embedding``."""

    model: str = Field(min_length=1, max_length=256)
    prompt: str = Field(min_length=1)
    keep_alive: float | str | None = None
    options: dict[str, Any] | None = None


class OllamaShowRequest(LenientModel):
    model: str = Field(min_length=1, max_length=256)
    verbose: bool = False


class OllamaPullRequest(LenientModel):
    model: str = Field(
        min_length=1,
        max_length=512,
        description="hf.co/owner/repo[:QUANT], owner/repo[:QUANT|:FILE], or a package "
        "resource dist-name:path/in/dist.gguf",
    )
    stream: bool = True
    insecure: bool = False


class OllamaDeleteRequest(LenientModel):
    model: str = Field(min_length=1, max_length=256)
