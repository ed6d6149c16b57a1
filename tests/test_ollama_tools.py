"""Tool calling on Ollama's ``/api/chat`` with the official ``ollama`` client, on SmolLM2.

Ollama has no ``tool_choice``: the model decides, so a prompt asks for the tool and the tests
judge the shape of whatever comes back (a call: a declared name and arguments that validate)."""

from __future__ import annotations

from typing import Any

import jsonschema
import ollama
import pytest

from llmis.api.ollama_protocol import OllamaChatRequest
from llmis.errors import BadRequestError
from tests.test_ollama import client, ollama_server  # noqa: F401  (fixtures)
from tests.test_tools import ASK_WEATHER, SCHEMAS, TOOLS

OPTIONS = {"temperature": 0, "num_predict": 120}
ASK = [{"role": "user", "content": "Call the get_weather tool for Paris, in celsius."}]


def check_calls(message: ollama.Message) -> None:
    for call in message.tool_calls or []:
        assert call.function.name in SCHEMAS
        assert isinstance(call.function.arguments, dict)  # an object, not a JSON string
        jsonschema.validate(dict(call.function.arguments), SCHEMAS[call.function.name])


def test_chat_with_tools_gives_a_valid_call_or_text(client: ollama.Client) -> None:  # noqa: F811
    out = client.chat(model="smollm2", messages=ASK, tools=TOOLS, options=OPTIONS)
    assert out.done and out.done_reason in ("stop", "length")
    if out.message.tool_calls:
        assert out.done_reason == "stop" and out.message.content == ""
        check_calls(out.message)
    else:
        assert isinstance(out.message.content, str) and out.message.content


def test_streamed_calls_come_whole_and_match(client: ollama.Client) -> None:  # noqa: F811
    whole = client.chat(model="smollm2", messages=ASK, tools=TOOLS, options=OPTIONS)
    chunks = list(
        client.chat(model="smollm2", messages=ASK, tools=TOOLS, options=OPTIONS, stream=True)
    )
    assert chunks[-1].done and all(not c.done for c in chunks[:-1])
    with_calls = [c for c in chunks if c.message.tool_calls]
    assert len(with_calls) == (1 if whole.message.tool_calls else 0)
    if with_calls:
        streamed = with_calls[0].message
        check_calls(streamed)
        assert [c.model_dump() for c in streamed.tool_calls or []] == [
            c.model_dump() for c in whole.message.tool_calls or []
        ]
    text = "".join(c.message.content or "" for c in chunks)
    assert text.strip() == (whole.message.content or "").strip()


def test_multi_turn_with_a_tool_result(client: ollama.Client) -> None:  # noqa: F811
    messages: list[Any] = [
        *ASK_WEATHER,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "function": {
                        "name": "get_weather",
                        "arguments": {"city": "Paris", "unit": "celsius"},
                    }
                }
            ],
        },
        {"role": "tool", "tool_name": "get_weather", "content": '{"temperature": 18}'},
    ]
    out = client.chat(model="smollm2", messages=messages, tools=TOOLS, options=OPTIONS)
    assert out.done and out.prompt_eval_count
    check_calls(out.message)
    assert out.message.tool_calls or out.message.content
    plain = client.chat(
        model="smollm2", messages=messages, options={"temperature": 0, "num_predict": 10}
    )
    assert plain.done and plain.message.content


def test_history_translates_to_openai_calls_and_results() -> None:
    req = OllamaChatRequest.model_validate(
        {
            "model": "m",
            "tools": TOOLS,
            "messages": [
                *ASK_WEATHER,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                        {"function": {"name": "get_time", "arguments": {"timezone": "CET"}}},
                    ],
                },
                {"role": "tool", "tool_name": "get_time", "content": "12:00"},
                {"role": "tool", "content": "sunny"},
            ],
        }
    )
    openai = req.to_openai()
    assert [t.function.name for t in openai.tools or []] == ["get_weather", "get_time"]
    calls = openai.messages[1].tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert calls[0].function.arguments == '{"city": "Paris"}'
    assert openai.messages[2].tool_call_id == calls[1].id and openai.messages[2].name == "get_time"
    assert (
        openai.messages[3].tool_call_id == calls[0].id and openai.messages[3].name == "get_weather"
    )


@pytest.mark.parametrize(
    "tools",
    [[{"type": "function", "function": {"name": "bad name!"}}], [{"type": "nope"}]],
)
def test_bad_tools_are_400(client: ollama.Client, tools: list[Any]) -> None:  # noqa: F811
    with pytest.raises(BadRequestError):
        OllamaChatRequest.model_validate(
            {"model": "m", "messages": ASK_WEATHER, "tools": tools}
        ).to_openai()
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="smollm2", messages=ASK_WEATHER, tools=tools)
    assert err.value.status_code == 400 and "tools" in err.value.error
