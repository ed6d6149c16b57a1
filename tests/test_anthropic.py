"""Anthropic's Messages API with the official ``anthropic`` client against a real server on
the bundled SmolLM2 (the shared ``server``; ``ops_server`` for API keys)."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import anthropic
import pytest

from tests.conftest import OPS_USER_KEY, RunningServer

MESSAGES: list[Any] = [{"role": "user", "content": "Tell me a story about a lighthouse."}]


@pytest.fixture
def client(server: RunningServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def test_create(client: anthropic.Anthropic) -> None:
    reply = client.messages.create(
        model="smollm2",
        max_tokens=6,
        system="You are terse.",
        messages=MESSAGES,
        extra_body={"temperature": 0},
        metadata={"user_id": "someone"},
    )
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("msg_")
    assert reply.model == "smollm2"
    assert len(reply.content) == 1 and reply.content[0].type == "text"
    assert reply.content[0].text
    assert reply.stop_reason == "max_tokens" and reply.stop_sequence is None
    assert reply.usage.output_tokens == 6 and reply.usage.input_tokens > 10
    # system as blocks and text-block content are the same prompt
    blocks = client.messages.create(
        model="smollm2",
        max_tokens=6,
        system=[{"type": "text", "text": "You are terse."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": MESSAGES[0]["content"]}]}],
        extra_body={"temperature": 0},
    )
    assert blocks.content[0].text == reply.content[0].text
    assert blocks.usage.input_tokens == reply.usage.input_tokens


def test_stop_sequence_and_end_turn(client: anthropic.Anthropic) -> None:
    free = client.messages.create(
        model="smollm2",
        max_tokens=200,
        messages=[{"role": "user", "content": "Say hi."}],
        extra_body={"temperature": 0},
    )
    assert free.stop_reason == "end_turn"
    text = free.content[0].text
    assert len(text) > 3
    cut = text[2:4]  # a piece the same greedy answer produces after its start
    stopped = client.messages.create(
        model="smollm2",
        max_tokens=200,
        messages=[{"role": "user", "content": "Say hi."}],
        extra_body={"temperature": 0},
        stop_sequences=[cut],
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == cut
    assert stopped.content[0].text == text[: text.index(cut)]


def test_stream_deltas_join_to_the_final_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="smollm2", max_tokens=8, messages=MESSAGES, extra_body={"temperature": 0}
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) >= 2
    assert "".join(pieces) == final.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8
    whole = client.messages.create(
        model="smollm2", max_tokens=8, messages=MESSAGES, extra_body={"temperature": 0}
    )
    assert whole.content[0].text == final.content[0].text


def test_count_tokens(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model="smollm2", messages=MESSAGES, system="Be brief.")
    reply = client.messages.create(
        model="smollm2", max_tokens=1, messages=MESSAGES, system="Be brief."
    )
    assert counted.input_tokens == reply.usage.input_tokens > 10


def test_errors(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="nope", max_tokens=4, messages=MESSAGES)
    assert missing.value.status_code == 404
    body = missing.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "not_found_error" and "nope" in body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(
            model="smollm2",
            max_tokens=4,
            messages=MESSAGES,
            tools=[{"name": "f", "input_schema": {"type": "object"}}],
            tool_choice={"type": "tool", "name": "g"},
        )
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "tool_choice" in bad.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(
            model="smollm2", max_tokens=4, messages=MESSAGES, extra_body={"temperature": 1.5}
        )
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(
            model="smollm2", max_tokens=4, messages=[{"role": "user", "content": [image]}]
        )


def test_x_api_key(ops_server: RunningServer) -> None:
    good = anthropic.Anthropic(base_url=ops_server.url, api_key=OPS_USER_KEY, max_retries=0)
    reply = good.messages.create(model="smollm2", max_tokens=2, messages=MESSAGES)
    assert reply.usage.output_tokens >= 1
    bad = anthropic.Anthropic(base_url=ops_server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        bad.messages.create(model="smollm2", max_tokens=2, messages=MESSAGES)
    assert err.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


def _event(name: str, data: dict[str, Any]) -> bytes:
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {name}\ndata: {text}\n\n".encode()


async def test_sse_wire_format(server: RunningServer) -> None:
    request = {
        "model": "smollm2",
        "max_tokens": 5,
        "messages": MESSAGES,
        "temperature": 0,
        "stream": True,
    }
    headers = {"anthropic-version": "2023-06-01", "x-api-key": "unused"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.url + "/v1/messages", json=request, headers=headers) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        raw = await resp.read()
    frames = raw.split(b"\n\n")
    assert frames[-1] == b""
    parsed = []
    for frame in frames[:-1]:
        event, data = frame.split(b"\n")
        assert event.startswith(b"event: ") and data.startswith(b"data: ")
        parsed.append((event[7:].decode(), json.loads(data[6:])))
    names = [name for name, _ in parsed]
    deltas = [data for name, data in parsed if name == "content_block_delta"]
    # pings may also come while the model is slow (keepalive_seconds), never inside a frame
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert [n for n in names[3:] if n != "ping"] == [
        *["content_block_delta"] * len(deltas),
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = parsed[0][1]["message"]
    assert start["id"].startswith("msg_") and start["usage"]["input_tokens"] > 10
    frames_expected = {
        "message_start": {
            "type": "message_start",
            "message": {
                "id": start["id"],
                "type": "message",
                "role": "assistant",
                "model": "smollm2",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": start["usage"]["input_tokens"], "output_tokens": 0},
            },
        },
        "content_block_start": {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": ""},
        },
        "ping": {"type": "ping"},
        "content_block_stop": {"type": "content_block_stop", "index": 0},
        "message_delta": {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
            "usage": {"output_tokens": 5},
        },
        "message_stop": {"type": "message_stop"},
    }
    expected = b""
    for name, data in parsed:
        if name == "content_block_delta":
            text = data["delta"]["text"]
            assert isinstance(text, str) and text
            delta = {"type": "text_delta", "text": text}
            expected += _event(name, {"type": name, "index": 0, "delta": delta})
        else:
            expected += _event(name, frames_expected[name])
    assert raw == expected
