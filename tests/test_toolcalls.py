"""The tool-call output parser on its own: streamed pieces always add up to the whole answer."""

from __future__ import annotations

import json

import pytest

from llmis.serving.protocol import ChatCompletionRequest
from llmis.serving.toolcalls import CallPiece, ContentPiece, OutputParser
from llmis.serving.tools import ToolPlan, plan_tools

TOOL = {
    "type": "function",
    "function": {
        "name": "f",
        "parameters": {"type": "object", "properties": {"a": {"type": "string"}}},
    },
}
HERMES_TEMPLATE = "{% for t in tools %}{{ t }}{% endfor %}<tool_call>"


def plan(choice: str = "auto", template: str | None = None) -> ToolPlan:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [TOOL],
            "tool_choice": choice,
        }
    )
    result = plan_tools(request, template)
    assert result is not None
    return result


def run(parser: OutputParser, text: str) -> tuple[str, dict[int, list[str]]]:
    """Feed ``text`` one character at a time; return the content and each call's pieces."""
    content = ""
    calls: dict[int, list[str]] = {}
    pieces = [p for ch in text for p in parser.feed(ch)] + parser.finish()
    for piece in pieces:
        if isinstance(piece, ContentPiece):
            content += piece.text
        else:
            assert isinstance(piece, CallPiece)
            if piece.name is not None:
                assert piece.index not in calls  # the header goes out once
                calls[piece.index] = [piece.name]
            calls[piece.index].append(piece.arguments)
    return content, calls


def test_generic_response_is_unescaped_content() -> None:
    parser = OutputParser(plan())
    content, calls = run(parser, '{"response": "a \\"b\\" \\u00e9\\n\\ud83d\\ude00"}')
    assert content == 'a "b" \u00e9\n\U0001f600' and not calls
    assert parser.finish_reason("stop") == "stop"


@pytest.mark.parametrize(
    "text",
    [
        '{"tool_call": {"name": "f", "arguments": {"a": "x}{"}}}',
        '{"tool_calls": [{"name": "f", "arguments": {"a": "1"}}, {"name": "f", "arguments": {}}]}',
    ],
)
def test_generic_calls_stream_in_pieces(text: str) -> None:
    parser = OutputParser(plan("required"))
    content, calls = run(parser, text)
    assert content == ""
    whole = json.loads(text)
    expected = whole.get("tool_calls") or [whole["tool_call"]]
    assert [c[0] for c in calls.values()] == [e["name"] for e in expected]
    assert [json.loads("".join(c[1:])) for c in calls.values()] == [
        e["arguments"] for e in expected
    ]
    assert parser.finish_reason("stop") == "tool_calls"
    assert [c.arguments for c in parser.calls] == ["".join(c[1:]) for c in calls.values()]


def test_hermes_sends_text_then_whole_calls() -> None:
    p = plan("auto", HERMES_TEMPLATE)
    assert p.format == "hermes" and p.native and p.grammar is None
    parser = OutputParser(p)
    content, calls = run(
        parser, 'Let me look.\n<tool_call>\n{"name": "f", "arguments": {"a": "1"}}\n</tool_call>'
    )
    assert content == "Let me look.\n"
    assert calls == {0: ["f", "", '{"a": "1"}']}
    assert parser.finish_reason("stop") == "tool_calls"


def test_hermes_invalid_call_is_content() -> None:
    parser = OutputParser(plan("auto", HERMES_TEMPLATE))
    text = "Sure <tool_call>{not json}</tool_call>"
    content, calls = run(parser, text)
    assert content == text and not calls


def test_hermes_required_grammar_wraps_the_call() -> None:
    grammar = plan("required", HERMES_TEMPLATE).grammar
    assert grammar is not None and "<tool_call>" in grammar and "tool-call-body ::=" in grammar


def test_generic_prompt_renders_history() -> None:
    p = plan()
    messages = p.prepare(
        [
            {"role": "user", "content": "x"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"a": "1"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ]
    )
    assert messages[0]["role"] == "system" and '"name": "f"' in messages[0]["content"]
    assert json.loads(messages[2]["content"]) == {
        "tool_calls": [{"name": "f", "arguments": {"a": "1"}}]
    }
    assert messages[3]["role"] == "user" and "tool_response" in messages[3]["content"]
