"""``POST /v1/responses`` through the openai SDK's ``responses.create`` and ``responses.stream``."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import RunningServer

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def test_create_and_stream_agree(client: openai.OpenAI) -> None:
    kwargs = dict(
        model="smollm2",
        instructions="You are terse.",
        input="Say hello.",
        temperature=0,
        max_output_tokens=60,
    )
    whole = client.responses.create(**kwargs)  # type: ignore[call-overload]
    assert whole.object == "response" and whole.status in ("completed", "incomplete")
    assert whole.output[0].type == "message" and whole.output_text
    assert whole.usage is not None and whole.usage.output_tokens > 0
    with client.responses.stream(**kwargs) as stream:  # type: ignore[call-overload]
        events = list(stream)
        final = stream.get_final_response() if whole.status == "completed" else None
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{whole.status}",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    if final is not None:
        assert final.output_text == whole.output_text


def test_input_items_and_length(client: openai.OpenAI) -> None:
    out = client.responses.create(
        model="smollm2",
        input=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": [{"type": "input_text", "text": "Count to ten."}]},
        ],
        temperature=0,
        max_output_tokens=3,
    )
    assert out.status == "incomplete"
    assert out.incomplete_details is not None
    assert out.incomplete_details.reason == "max_output_tokens"
    assert out.usage is not None and out.usage.output_tokens == 3


def test_function_call_create_and_stream(client: openai.OpenAI) -> None:
    kwargs = dict(
        model="smollm2",
        input="What is the weather in Paris?",
        tools=[WEATHER_TOOL],
        tool_choice="required",
        temperature=0,
        max_output_tokens=80,
    )
    whole = client.responses.create(**kwargs)  # type: ignore[call-overload]
    calls = [o for o in whole.output if o.type == "function_call"]
    assert len(calls) >= 1 and whole.status == "completed"
    assert calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    with client.responses.stream(**kwargs) as stream:  # type: ignore[call-overload]
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    streamed = [o for o in final.output if o.type == "function_call"]
    assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in calls]
    # the call's result, sent back as input items
    follow = client.responses.create(
        model="smollm2",
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": "get_weather",
                "arguments": calls[0].arguments,
            },
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18C, sunny"},
        ],
        temperature=0,
        max_output_tokens=20,
    )
    assert follow.output and follow.output[0].type == "message"


def test_json_schema_format(client: openai.OpenAI) -> None:
    out = client.responses.create(
        model="smollm2",
        input="Pick a colour.",
        text={
            "format": {
                "type": "json_schema",
                "name": "colour",
                "schema": {
                    "type": "object",
                    "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}},
                    "required": ["colour"],
                },
            }
        },
        temperature=0,
        max_output_tokens=30,
    )
    assert json.loads(out.output_text)["colour"] in ("red", "blue")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        (
            {"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER_TOOL]},
            "tool_choice",
        ),
        ({"input": 5}, "input"),
    ],
)
def test_bad_input_is_400(client: openai.OpenAI, extra: dict[str, object], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="smollm2", input="hi", max_output_tokens=2, extra_body=extra)
    body = info.value.body
    assert isinstance(body, dict) and body["param"].split(".")[0] == param
