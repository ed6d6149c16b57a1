"""OpenAI's Responses API request schema (``POST /v1/responses``) and its translation to a
chat-completion request; the route is :mod:`llmis.api.responses`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from llmis.errors import BadRequestError
from llmis.serving.protocol import MAX_NAME_CHARS, MAX_TOKENS, ChatCompletionRequest, LenientModel

__all__ = ["FunctionChoice", "ResponsesRequest"]


class InputText(LenientModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputItem(LenientModel):
    """A message (``type`` ``message`` or absent), a ``function_call`` or its output."""

    type: Literal["message", "function_call", "function_call_output"] = "message"
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: str | list[InputText] | None = None
    call_id: str | None = Field(default=None, max_length=256)
    name: str | None = Field(default=None, max_length=256)
    arguments: str | None = None
    output: str | None = None


class FunctionTool(LenientModel):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(LenientModel):
    type: Literal["function"]
    name: str


class TextFormat(LenientModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(LenientModel):
    format: TextFormat | None = None


class ResponsesRequest(LenientModel):
    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None

    def chat_request(self) -> ChatCompletionRequest:
        """The equivalent chat completion request (validated as one)."""
        if self.previous_response_id is not None:
            raise BadRequestError(
                "previous_response_id: this server does not store responses; send the "
                "conversation as input items instead",
                param="previous_response_id",
                code="unsupported_parameter",
            )
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self._messages(),
            "max_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        if self.tools:
            body["tools"] = [
                {"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                for t in self.tools
            ]
        if isinstance(self.tool_choice, FunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": fmt.name, "schema": fmt.schema_ or {}},
            }
        elif fmt is not None and fmt.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        return ChatCompletionRequest.model_validate(body)

    def _messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
            return messages
        for i, item in enumerate(self.input):
            if item.type == "function_call":
                if item.name is None or item.call_id is None:
                    raise BadRequestError(
                        f"input.{i}: a function_call item needs call_id and name",
                        param=f"input.{i}",
                        code="invalid_value",
                    )
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments or "{}"},
                }
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                    last["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif item.type == "function_call_output":
                messages.append(
                    {"role": "tool", "tool_call_id": item.call_id, "content": item.output or ""}
                )
            else:
                content = item.content
                if isinstance(content, list):
                    content = "".join(part.text for part in content)
                messages.append({"role": item.role or "user", "content": content or ""})
        if not messages:
            raise BadRequestError("input: the input is empty", param="input", code="invalid_value")
        return messages
