"""Anthropic Messages API request schemas and their translation to llmis's chat requests.

A ``/v1/messages`` request becomes a :class:`~llmis.serving.protocol.ChatCompletionRequest` (system
prompt first, text blocks joined), so the same validation, ranges and serving path apply.
``tools`` and ``tool_choice`` become OpenAI tools (``any``: ``required``, ``tool``: a named
choice); ``tool_use`` blocks of the history become the assistant's ``tool_calls`` and
``tool_result`` blocks ``tool`` messages. Other content blocks (images, documents) are
refused with a 400 rather than answered as if they were not there. ``metadata``,
``service_tier``, ``tool_choice`` without tools and a disabled ``thinking`` are accepted
and ignored.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator

from llmis.api.translate import validate_as
from llmis.errors import BadRequestError
from llmis.serving.protocol import (
    MAX_TOKENS,
    ChatCompletionRequest,
    ChatMessage,
    LenientModel,
    StreamOptions,
)

__all__ = ["CountTokensRequest", "MessagesRequest", "TextBlock", "ToolResultBlock", "ToolUseBlock"]


class TextBlock(LenientModel):
    type: Literal["text"]
    text: str


class ToolUseBlock(LenientModel):
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(LenientModel):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: str | list[TextBlock] | None = None
    is_error: bool = False

    @field_validator("content", mode="before")
    @classmethod
    def _only_text(cls, value: object) -> object:
        return _text_blocks(value, "tool_result.content", ("text",))

    @property
    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(block.text for block in self.content)


Block = TextBlock | ToolUseBlock | ToolResultBlock


def _text_blocks(value: object, where: str, kinds: tuple[str, ...]) -> object:
    """One clear 400 for a block type this server cannot read."""
    if isinstance(value, list):
        for block in value:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind not in kinds:
                raise ValueError(
                    f"{where}: content blocks of type {kind!r} are not supported by this "
                    f"server; only {', '.join(kinds)} blocks are"
                )
    return value


class InputMessage(LenientModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    @field_validator("content", mode="before")
    @classmethod
    def _only_text(cls, value: object) -> object:
        return _text_blocks(value, "content", ("text", "tool_use", "tool_result"))

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(block.text for block in self.content if isinstance(block, TextBlock))

    def openai_messages(self) -> list[dict[str, Any]]:
        """Tool results first (OpenAI ``tool`` messages), then the text and calls."""
        blocks = [] if isinstance(self.content, str) else self.content
        out: list[dict[str, Any]] = [
            {
                "role": "tool",
                "tool_call_id": b.tool_use_id,
                "content": f"Error: {b.text}" if b.is_error else b.text,
            }
            for b in blocks
            if isinstance(b, ToolResultBlock)
        ]
        calls = [
            {
                "id": b.id,
                "type": "function",
                "function": {"name": b.name, "arguments": json.dumps(b.input)},
            }
            for b in blocks
            if isinstance(b, ToolUseBlock)
        ]
        message: dict[str, Any] = {"role": self.role, "content": self.text}
        if calls and self.role == "assistant":
            message["tool_calls"] = calls
        if self.text or calls or not out:
            out.append(message)
        return out


class AnthropicTool(LenientModel):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    input_schema: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "parameters": self.input_schema}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


class AnthropicToolChoice(LenientModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(default=None, max_length=256)
    disable_parallel_tool_use: bool = False

    def openai(self) -> str | dict[str, Any]:
        if self.type == "tool":
            if not self.name:
                raise ValueError("tool_choice: type 'tool' needs a name")
            return {"type": "function", "function": {"name": self.name}}
        return "required" if self.type == "any" else self.type


class _Conversation(LenientModel):
    model: str = Field(min_length=1, max_length=256)
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: dict[str, Any] | None = None

    @field_validator("system", mode="before")
    @classmethod
    def _system_text(cls, value: object) -> object:
        return _text_blocks(value, "system", ("text",))

    @field_validator("thinking")
    @classmethod
    def _no_thinking(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value and value.get("type") not in (None, "disabled"):
            raise ValueError("extended thinking is not supported by the models this server runs")
        return value

    @field_validator("messages")
    @classmethod
    def _no_prefill(cls, value: list[InputMessage]) -> list[InputMessage]:
        if value and value[-1].role == "assistant":
            raise ValueError(
                "the last message must be the user's: continuing an assistant prefill is "
                "not supported by this server"
            )
        return value

    @property
    def system_text(self) -> str:
        if self.system is None or isinstance(self.system, str):
            return self.system or ""
        return "".join(block.text for block in self.system)

    def chat_messages(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.system_text:
            out.append({"role": "system", "content": self.system_text})
        for m in self.messages:
            out.extend(m.openai_messages())
        return out

    def template_messages(self) -> list[ChatMessage]:
        return [ChatMessage.model_validate(m) for m in self.chat_messages()]


class MessagesRequest(_Conversation):
    max_tokens: int = Field(ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    # llmis: tokens per text delta and pacing, as OpenAI's stream_options (llmis.serving.chunking)
    stream_options: StreamOptions | None = None

    def to_openai(self) -> ChatCompletionRequest:
        return validate_as(ChatCompletionRequest, self.chat_body(), {"stop": "stop_sequences"})

    def chat_body(self) -> dict[str, Any]:
        """The OpenAI chat body this request becomes (not validated yet)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self.chat_messages(),
            "max_tokens": self.max_tokens,
        }
        for name in ("temperature", "top_p", "top_k"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.stop_sequences:
            body["stop"] = self.stop_sequences
        if self.stream_options is not None:
            body["stream_options"] = self.stream_options.model_dump(exclude_none=True)
        if self.tools:
            body["tools"] = [tool.openai() for tool in self.tools]
        if self.tool_choice is not None and (self.tools or self.tool_choice.type == "none"):
            try:
                body["tool_choice"] = self.tool_choice.openai()
            except ValueError as exc:
                raise BadRequestError(str(exc), param="tool_choice") from None
            if self.tool_choice.disable_parallel_tool_use:
                body["parallel_tool_calls"] = False
        return body


class CountTokensRequest(_Conversation):
    """``POST /v1/messages/count_tokens``: the prompt's tokens, nothing generated."""
