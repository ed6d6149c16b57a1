"""Tool calling: how a request's ``tools`` reach the model, and the grammar its answer follows.

A :class:`ToolPlan` is built per request (in a thread: compiling schemas to grammars is CPU
work) from the request's ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` and the model's
chat template:

* **Prompting.** A template that references ``tools`` gets them (``tools=`` in the render, the
  history's ``tool_calls`` and ``role: tool`` messages as they are): the model sees them in
  the form it was trained on. Other templates get a system message describing the tools and
  the answer format, as llama-server's "generic" format does, and the history's calls and
  results are rendered as that JSON.
* **Output format.** ``hermes`` when the template writes calls as
  ``<tool_call>{"name", "arguments"}</tool_call>`` (Qwen 2.5/3, Hermes and friends);
  otherwise ``generic``: one JSON object, ``{"tool_call": {"name", "arguments"}}`` (or
  ``{"tool_calls": [...]}`` when parallel calls are allowed) or ``{"response": "..."}``.
* **Decoding.** ``required`` and a named function are grammar-constrained to a call of a
  declared function whose ``arguments`` match its JSON schema (llama.cpp's
  json-schema-to-grammar). ``auto`` in the generic format is constrained to a call *or* a
  ``response`` (the model chooses with its first key); in the hermes format ``auto`` is
  free text and a call counts only once its block is complete and valid.
  ``none`` renders no tools at all.

Parsing what the model wrote back into calls is :mod:`llmis.serving.toolcalls`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import jsonschema

from llmis.engine.grammar import GrammarError, SchemaTooDeepError, schema_grammar
from llmis.errors import BadRequestError
from llmis.serving.protocol import MAX_SCHEMA_BYTES, ChatCompletionRequest, NamedToolChoice, ToolDef

__all__ = ["ToolFormat", "ToolPlan", "plan_tools", "template_supports_tools"]

ToolFormat = Literal["generic", "hermes"]
Choice = Literal["auto", "required", "named"]

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
# json-schema-to-grammar lets up to 20 spaces or newlines between tokens; a small model can
# spend its whole budget there. One optional space keeps the JSON valid and short.
_SPACE_RULE = re.compile(r"^space ::= .*$", re.MULTILINE)
_CHAR_RULE = re.compile(r'^char ::= \[\^"\\\\\]', re.MULTILINE)
_JSON_CHAR = r'char ::= [^"\\\x00-\x1F\x7F]'
_TOOLS_IN_TEMPLATE = re.compile(r"\btools\b")


def template_supports_tools(template: str | None) -> bool:
    """Whether a Jinja chat template renders a ``tools`` list it is given."""
    return bool(template) and _TOOLS_IN_TEMPLATE.search(template or "") is not None


@dataclass(frozen=True)
class ToolPlan:
    """How one request's tools are prompted, constrained and parsed."""

    tools: tuple[ToolDef, ...]
    choice: Choice
    parallel: bool
    format: ToolFormat
    native: bool  # the template renders the tools itself
    grammar: str | None  # GBNF, root rule 'root'
    names: frozenset[str]

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The ``tools`` given to a template that renders them."""
        if not self.native:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def prepare(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The history as the template should see it (see the module docstring)."""
        if self.format == "hermes":
            return [_native_message(m) for m in messages]
        out: list[dict[str, Any]] = []
        for message in messages:
            if message.get("tool_calls"):
                out.append({"role": "assistant", "content": self._generic_calls(message)})
            elif message["role"] == "tool":
                result = {
                    "tool_response": {
                        "tool_call_id": message.get("tool_call_id"),
                        "content": message["content"],
                    }
                }
                text = json.dumps(result, ensure_ascii=False)
                if out and out[-1].get("_tool_results"):
                    out[-1]["content"] += "\n" + text  # consecutive results: one user turn
                else:
                    out.append({"role": "user", "content": text, "_tool_results": True})
            else:
                out.append(message)
        for message in out:
            message.pop("_tool_results", None)
        system = self._generic_instructions()
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
        return out

    def _generic_calls(self, message: dict[str, Any]) -> str:
        calls = [
            {"name": c["function"]["name"], "arguments": _as_json(c["function"]["arguments"])}
            for c in message["tool_calls"]
        ]
        if self.parallel:
            return json.dumps({"tool_calls": calls}, ensure_ascii=False)
        return json.dumps({"tool_call": calls[0]}, ensure_ascii=False)

    def _generic_instructions(self) -> str:
        described = [
            {
                "name": t.function.name,
                **({"description": t.function.description} if t.function.description else {}),
                "parameters": t.function.parameters or _EMPTY_PARAMETERS,
            }
            for t in self.tools
        ]
        call = '{"name": "<tool name>", "arguments": {<arguments>}}'
        call_form = f'{{"tool_calls": [{call}]}}' if self.parallel else f'{{"tool_call": {call}}}'
        text = (
            "You can call the following tools:\n"
            + json.dumps(described, ensure_ascii=False)
            + "\n\n"
        )
        if self.choice == "auto":
            return text + (
                "Answer with one JSON object: either a tool call, "
                f"{call_form}, when a tool can do what the user asks, or else your reply "
                'to the user, {"response": "<what you say to the user>"}.'
            )
        return text + f"Answer with one JSON object calling a tool: {call_form}."


def _as_json(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _native_message(message: dict[str, Any]) -> dict[str, Any]:
    """HF templates read ``tool_call.function.arguments`` as an object, not a string."""
    if not message.get("tool_calls"):
        return message
    calls = [
        {**c, "function": {**c["function"], "arguments": _as_json(c["function"]["arguments"])}}
        for c in message["tool_calls"]
    ]
    return {**message, "tool_calls": calls}


def _check_parameters(index: int, parameters: dict[str, Any]) -> None:
    param = f"tools.{index}.function.parameters"
    try:
        text = json.dumps(parameters, separators=(",", ":"))
    except (RecursionError, ValueError):
        raise BadRequestError(
            f"{param}: the JSON schema is nested too deeply", param=param, code="invalid_value"
        ) from None
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise BadRequestError(
            f"{param}: the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes",
            param=param,
            code="invalid_value",
        )
    if parameters.get("type", "object") != "object":
        raise BadRequestError(
            f"{param}: a function's parameters must be a JSON schema of type 'object'",
            param=param,
            code="invalid_value",
        )
    try:
        jsonschema.validators.validator_for(parameters).check_schema(parameters)
    except jsonschema.SchemaError as exc:
        raise BadRequestError(
            f"{param}: not a valid JSON schema: {exc.message[:200]}",
            param=param,
            code="invalid_value",
        ) from None
    except RecursionError:
        raise BadRequestError(
            f"{param}: the JSON schema is nested too deeply", param=param, code="invalid_value"
        ) from None


def _call_schema(tool: ToolDef) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.function.name},
            "arguments": tool.function.parameters or _EMPTY_PARAMETERS,
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _to_gbnf(schema: dict[str, Any], param: str) -> str:
    try:
        grammar = schema_grammar(schema)
    except SchemaTooDeepError:
        raise BadRequestError(
            f"{param}: the JSON schema is nested too deeply to be enforced",
            param=param,
            code="invalid_value",
        ) from None
    except GrammarError as exc:
        raise BadRequestError(
            f"{param}: this JSON schema cannot be enforced: {exc}",
            param=param,
            code="invalid_value",
        ) from None
    grammar = _SPACE_RULE.sub('space ::= " "?', grammar)
    # JSON strings cannot hold raw control characters; the converter's char rule allows them
    return _CHAR_RULE.sub(lambda _: _JSON_CHAR, grammar)


def _schema_param(tools: tuple[ToolDef, ...], request: ChatCompletionRequest) -> str:
    return "tools" if len(tools) != 1 else f"tools.{(request.tools or []).index(tools[0])}"


def _generic_grammar(
    tools: tuple[ToolDef, ...], choice: Choice, parallel: bool, request: ChatCompletionRequest
) -> str:
    calls = [_call_schema(t) for t in tools]
    call: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if parallel:
        wrapped: dict[str, Any] = {
            "type": "object",
            "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 1}},
            "required": ["tool_calls"],
            "additionalProperties": False,
        }
    else:
        wrapped = {
            "type": "object",
            "properties": {"tool_call": call},
            "required": ["tool_call"],
            "additionalProperties": False,
        }
    schema = wrapped
    if choice == "auto":
        response = {
            "type": "object",
            "properties": {"response": {"type": "string"}},
            "required": ["response"],
            "additionalProperties": False,
        }
        schema = {"anyOf": [wrapped, response]}
    return _to_gbnf(schema, _schema_param(tools, request))


def _hermes_grammar(
    tools: tuple[ToolDef, ...], parallel: bool, request: ChatCompletionRequest
) -> str:
    calls = [_call_schema(t) for t in tools]
    call: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    body = _to_gbnf(call, _schema_param(tools, request))
    body = re.sub(r"^root ::=", "tool-call-body ::=", body, flags=re.MULTILINE)
    block = f'"{HERMES_OPEN}\\n" tool-call-body "\\n{HERMES_CLOSE}"'
    root = f'root ::= {block} ("\\n" {block})*' if parallel else f"root ::= {block}"
    return body + "\n" + root + "\n"


def plan_tools(request: ChatCompletionRequest, template: str | None) -> ToolPlan | None:
    """The request's tool plan, or None when no tool can be called (no tools, or ``none``).

    Blocking (schema checks and grammar compilation): run it in a thread. Bad schemas are a
    400 naming ``tools.<i>.function.parameters``.
    """
    if not request.tools or request.tool_choice == "none":
        return None
    for i, tool in enumerate(request.tools):
        _check_parameters(i, tool.function.parameters or _EMPTY_PARAMETERS)
    tools = tuple(request.tools)
    choice: Choice = "auto"
    if isinstance(request.tool_choice, NamedToolChoice):
        wanted = request.tool_choice.function.name
        tools = tuple(t for t in tools if t.function.name == wanted)
        choice = "named"
    elif request.tool_choice == "required":
        choice = "required"
    native = template_supports_tools(template)
    fmt: ToolFormat = "hermes" if native and HERMES_OPEN in (template or "") else "generic"
    parallel = request.parallel_tool_calls and choice != "named"
    if fmt == "generic":
        grammar: str | None = _generic_grammar(tools, choice, parallel, request)
    elif choice == "auto":
        grammar = None  # free text; a call counts once its block is complete and valid
    else:
        grammar = _hermes_grammar(tools, parallel, request)
    # the model sees every declared tool; a named choice constrains which one it calls
    return ToolPlan(
        tuple(request.tools),
        choice,
        parallel,
        fmt,
        native,
        grammar,
        frozenset(t.function.name for t in tools),
    )
