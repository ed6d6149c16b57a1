"""Tool calling through the real openai SDK (and a WebSocket client) against SmolLM2.

SmolLM2-135M's template does not render tools, so these run llama-server's "generic" format:
``required`` and named choices are grammar-constrained, and every call must validate against
its function's schema on every seed. ``auto`` is judged by the shape of the answer only.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import jsonschema
import openai
import pytest

from tests.conftest import RunningServer, bad_chat_param

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 40}},
    "required": ["timezone"],
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Get the current time in a timezone",
            "parameters": TIME,
        },
    },
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
ASK_POEM = [{"role": "user", "content": "Write a two-line poem about the sea."}]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def check_call(call: Any, allowed: set[str]) -> dict[str, Any]:
    """A call of a declared function whose arguments validate against its schema."""
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name in allowed
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments  # type: ignore[no-any-return]


async def seeded_runs(server: RunningServer, seeds: int, **kwargs: Any) -> list[Any]:
    """``seeds`` requests at once (seeds 0..n-1): the scheduler batches them."""
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    try:
        return list(
            await asyncio.gather(
                *(
                    client.chat.completions.create(model="smollm2", seed=seed, **kwargs)
                    for seed in range(seeds)
                )
            )
        )
    finally:
        await client.close()


async def test_required_is_always_a_valid_call(server: RunningServer) -> None:
    outs = await seeded_runs(
        server,
        20,
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=150,
    )
    for seed, out in enumerate(outs):
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", (seed, choice)
        assert choice.message.content is None
        calls = choice.message.tool_calls or []
        assert len(calls) == 1
        check_call(calls[0], {"get_weather", "get_time"})


async def test_named_choice_calls_that_function(server: RunningServer) -> None:
    outs = await seeded_runs(
        server,
        20,
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=150,
    )
    for seed, out in enumerate(outs):
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", (seed, choice)
        calls = choice.message.tool_calls or []
        assert len(calls) == 1
        check_call(calls[0], {"get_time"})


def test_parallel_calls_are_each_valid(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="smollm2",
        messages=ASK_WEATHER,  # type: ignore[arg-type]
        tools=TOOLS,
        tool_choice="required",
        seed=3,
        max_tokens=300,
    )
    choice = out.choices[0]
    calls = choice.message.tool_calls or []
    assert calls
    if choice.finish_reason == "tool_calls":
        for call in calls:
            check_call(call, {"get_weather", "get_time"})
        assert len({c.id for c in calls}) == len(calls)
    else:  # the budget ran out in a later call: the earlier ones are whole
        assert choice.finish_reason == "length"
        for call in calls[:-1]:
            check_call(call, {"get_weather", "get_time"})


@pytest.mark.parametrize("messages", [ASK_WEATHER, ASK_POEM], ids=["tool-prompt", "poem"])
async def test_auto_gives_a_call_or_text(server: RunningServer, messages: list[Any]) -> None:
    outs = await seeded_runs(
        server,
        4,
        messages=messages,
        tools=TOOLS,
        tool_choice="auto",
        parallel_tool_calls=False,
        max_tokens=150,
    )
    for out in outs:
        choice = out.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
            assert choice.message.content is None
            if choice.finish_reason == "tool_calls":
                check_call(choice.message.tool_calls[0], {"get_weather", "get_time"})
        else:
            assert choice.finish_reason in ("stop", "length")
            assert isinstance(choice.message.content, str)
            assert not choice.message.content.lstrip().startswith('{"tool_call')


def test_none_never_calls(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="smollm2",
        messages=ASK_WEATHER,  # type: ignore[arg-type]
        tools=TOOLS,
        tool_choice="none",
        temperature=0,
        max_tokens=30,
    )
    assert out.choices[0].message.tool_calls is None
    assert out.choices[0].finish_reason in ("stop", "length")


def test_streamed_call_rebuilt_by_the_sdk_equals_the_whole_one(
    client: openai.OpenAI, server: RunningServer
) -> None:
    kwargs: dict[str, Any] = dict(
        model="smollm2",
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice="required",
        seed=7,
        max_tokens=150,
    )
    whole = client.chat.completions.create(**kwargs)
    with client.chat.completions.stream(**kwargs) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()
    expected = [
        (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls or []
    ]
    rebuilt = [
        (c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls or []
    ]
    assert rebuilt == expected and expected
    assert final.choices[0].finish_reason == "tool_calls"
    # OpenAI's delta shape: index, id, type and name once, then argument pieces only
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].index == 0 and deltas[0].id and deltas[0].type == "function"
    assert deltas[0].function is not None
    assert deltas[0].function.name == expected[0][0]
    for delta in deltas[1:]:
        assert delta.index == 0 and delta.id is None and delta.type is None
        assert delta.function is not None and delta.function.name is None
    assert len(deltas) > 2  # the arguments came in pieces
    assert "".join(d.function.arguments or "" for d in deltas if d.function) == expected[0][1]


def test_multi_turn_with_a_tool_result(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model="smollm2",
        messages=ASK_WEATHER,  # type: ignore[arg-type]
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        seed=1,
        max_tokens=150,
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    messages: list[Any] = [
        *ASK_WEATHER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "clear"}'},
    ]
    out = client.chat.completions.create(
        model="smollm2", messages=messages, tools=TOOLS, seed=1, max_tokens=120
    )
    choice = out.choices[0]
    assert out.usage is not None and out.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]
    assert choice.message.tool_calls or isinstance(choice.message.content, str)
    # and without tools in the follow-up, the history still renders
    plain = client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=20
    )
    assert plain.choices[0].message.content


async def test_websocket_streams_the_same_call(server: RunningServer) -> None:
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    body: dict[str, Any] = dict(
        model="smollm2",
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice="required",
        seed=5,
        max_tokens=150,
    )
    whole = await client.chat.completions.create(**body)
    expected = whole.choices[0].message.tool_calls or []
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{server.url}/v1/ws") as ws:
        await ws.send_json({"type": "chat", "id": "t1", **body})
        pieces: list[dict[str, Any]] = []
        while True:
            event = await ws.receive_json(timeout=120)
            if event["type"] == "delta":
                pieces.extend(event.get("tool_calls", []))
            else:
                break
    assert event["type"] == "done" and event["finish_reason"] == "tool_calls"
    assert pieces[0]["function"]["name"] == expected[0].function.name
    arguments = "".join(p["function"]["arguments"] for p in pieces if p["index"] == 0)
    assert arguments == expected[0].function.arguments
    await client.close()


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"a": {"type": 5}}},
                        },
                    }
                ]
            },
            "tools.0.function.parameters",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "string"}},
                    }
                ]
            },
            "tools.0.function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools.0.function.name",
        ),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name"),
    ],
    ids=["unknown-name", "choice-without-tools", "bad-schema", "not-object", "bad-name", "twice"],
)
def test_bad_tool_requests_are_400_with_param(
    client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    assert bad_chat_param(client, extra) == param
