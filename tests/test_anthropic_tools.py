"""Tool use on Anthropic's ``/v1/messages`` with the official ``anthropic`` client, on SmolLM2.

``tool_choice: {"type": "any"}`` is grammar-constrained, so a call always comes back; the tests
judge its shape (a declared name, an ``input`` that validates against the tool's schema)."""

from __future__ import annotations

from typing import Any

import anthropic
import jsonschema
import pytest

from tests.conftest import RunningServer
from tests.test_tools import ASK_WEATHER, SCHEMAS, TOOLS

ANTHROPIC_TOOLS: list[Any] = [
    {
        "name": t["function"]["name"],
        "description": t["function"]["description"],
        "input_schema": t["function"]["parameters"],
    }
    for t in TOOLS
]
ANY: Any = {"type": "any"}


@pytest.fixture
def client(server: RunningServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def tool_uses(message: anthropic.types.Message) -> list[anthropic.types.ToolUseBlock]:
    uses = [b for b in message.content if b.type == "tool_use"]
    for block in uses:
        assert block.name in SCHEMAS and block.id
        assert isinstance(block.input, dict)
        jsonschema.validate(block.input, SCHEMAS[block.name])
    return uses


def test_any_gives_a_valid_tool_use(client: anthropic.Anthropic) -> None:
    out = client.messages.create(
        model="smollm2",
        max_tokens=150,
        messages=ASK_WEATHER,
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    assert out.stop_reason == "tool_use"
    assert len(tool_uses(out)) == 1


def test_named_tool_choice(client: anthropic.Anthropic) -> None:
    out = client.messages.create(
        model="smollm2",
        max_tokens=150,
        messages=ASK_WEATHER,
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
    )
    uses = tool_uses(out)
    assert [u.name for u in uses] == ["get_time"] and out.stop_reason == "tool_use"


def test_streamed_tool_use_rebuilt_by_the_sdk(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="smollm2",
        max_tokens=150,
        messages=ASK_WEATHER,
        tools=ANTHROPIC_TOOLS,
        tool_choice=ANY,
        extra_body={"temperature": 0},
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds  # the arguments came as input_json_delta pieces
    assert final.stop_reason == "tool_use"
    uses = tool_uses(final)
    assert uses and all(b.type == "tool_use" for b in final.content)
    whole = client.messages.create(
        model="smollm2",
        max_tokens=150,
        messages=ASK_WEATHER,
        tools=ANTHROPIC_TOOLS,
        tool_choice=ANY,
        extra_body={"temperature": 0},
    )
    assert [(u.name, u.input) for u in tool_uses(whole)] == [(u.name, u.input) for u in uses]


def test_multi_turn_with_a_tool_result(client: anthropic.Anthropic) -> None:
    first = client.messages.create(
        model="smollm2",
        max_tokens=150,
        messages=ASK_WEATHER,
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    use = tool_uses(first)[0]
    messages: list[Any] = [
        *ASK_WEATHER,
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": '{"temperature": 18}'},
                {"type": "text", "text": "Thanks, so what should I wear?"},
            ],
        },
    ]
    out = client.messages.create(
        model="smollm2", max_tokens=40, messages=messages, tools=ANTHROPIC_TOOLS
    )
    assert out.usage.input_tokens > first.usage.input_tokens
    assert out.content and out.stop_reason in ("end_turn", "max_tokens", "tool_use")
    tool_uses(out)
    counted = client.messages.count_tokens(model="smollm2", messages=messages)
    assert counted.input_tokens > 10


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": [{"name": "bad name!", "input_schema": {"type": "object"}}]},
        {"tools": [{"name": "f"}]},
        {"tools": ANTHROPIC_TOOLS, "tool_choice": {"type": "maybe"}},
        {"tools": ANTHROPIC_TOOLS, "tool_choice": {"type": "tool"}},
    ],
)
def test_bad_tools_are_400(client: anthropic.Anthropic, extra: dict[str, Any]) -> None:
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(
            model="smollm2", max_tokens=4, messages=ASK_WEATHER, extra_body=extra
        )
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_unanswered_or_unknown_results_do_not_fail(client: anthropic.Anthropic) -> None:
    result = {"type": "tool_result", "tool_use_id": "toolu_unknown", "content": "42"}
    out = client.messages.create(
        model="smollm2",
        max_tokens=4,
        messages=[{"role": "user", "content": [result, {"type": "text", "text": "Hi"}]}],  # type: ignore[list-item]
    )
    assert out.content
