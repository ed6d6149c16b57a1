"""Anthropic Messages API request schemas and their translation to llmis's chat requests.

A ``/v1/messages`` request becomes a :class:`~llmis.protocol.ChatCompletionRequest` (system
prompt first, text blocks joined), so the same validation, ranges and serving path apply.
Content blocks other than text (images, documents, ``tool_use`` / ``tool_result``) and
``tools`` are refused with a 400 until the server can act on them, rather than answered as
if they were not there. ``metadata``, ``service_tier``, ``tool_choice`` without tools and a
disabled ``thinking`` are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from llmis.api.translate import validate_as
from llmis.protocol import MAX_TOKENS, ChatCompletionRequest, ChatMessage, LenientModel

__all__ = ["CountTokensRequest", "MessagesRequest", "TextBlock"]


class TextBlock(LenientModel):
    type: Literal["text"]
    text: str


def _text_blocks(value: object, where: str) -> object:
    """One clear 400 for a block type this server cannot read."""
    if isinstance(value, list):
        for block in value:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind != "text":
                what = "tool_use and tool_result" if kind in ("tool_use", "tool_result") else kind
                raise ValueError(
                    f"{where}: content blocks of type {what!r} are not supported by this "
                    "server; only text blocks are"
                )
    return value


class InputMessage(LenientModel):
    role: Literal["user", "assistant"]
    content: str | list[TextBlock]

    @field_validator("content", mode="before")
    @classmethod
    def _only_text(cls, value: object) -> object:
        return _text_blocks(value, "content")

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(block.text for block in self.content)


class _Conversation(LenientModel):
    model: str = Field(min_length=1, max_length=256)
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Any] | None = None
    thinking: dict[str, Any] | None = None

    @field_validator("system", mode="before")
    @classmethod
    def _system_text(cls, value: object) -> object:
        return _text_blocks(value, "system")

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tools are not supported by this server yet (tool calling)")
        return value

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

    def chat_messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_text}] if self.system_text else []
        return system + [{"role": m.role, "content": m.text} for m in self.messages]

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

    def to_openai(self) -> ChatCompletionRequest:
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
        return validate_as(ChatCompletionRequest, body, {"stop": "stop_sequences"})


class CountTokensRequest(_Conversation):
    """``POST /v1/messages/count_tokens``: the prompt's tokens, nothing generated."""
