"""Every bad input gets its status and OpenAI's error shape, and the server keeps serving."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from tests.conftest import RunningServer

CHAT = "/v1/chat/completions"


def assert_error_shape(body: Any) -> dict[str, Any]:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    return error  # type: ignore[no-any-return]


async def call(
    server: RunningServer, method: str, path: str, data: bytes | None = None
) -> tuple[int, Any, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            server.url + path,
            data=data,
            headers={"Content-Type": "application/json"},
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None), dict(resp.headers)


def chat(**overrides: Any) -> bytes:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    body.update(overrides)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


@pytest.mark.parametrize(
    ("data", "status", "param", "code"),
    [
        (b'{"model": "smollm2", "messages": [', 400, None, "invalid_json"),
        (b"\xff\xfe", 400, None, "invalid_json"),
        (chat(messages=None), 400, "messages", "missing_required_parameter"),
        (chat(messages=[]), 400, "messages", "invalid_value"),
        (chat(temperature=7), 400, "temperature", "invalid_value"),
        (chat(max_tokens=0), 400, "max_tokens", "invalid_value"),
        (chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role", None),
        (chat(n=2), 400, "n", "invalid_value"),
        (
            chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
            400,
            "messages.0.content",
            "invalid_value",
        ),
        (chat(stop=[""]), 400, "stop", "invalid_value"),
        (chat(logit_bias={"abc": 1}), 400, "logit_bias", "invalid_value"),
        (chat(model="no-such-model"), 404, "model", "model_not_found"),
        (chat(max_tokens=5000), 400, "max_tokens", "context_length_exceeded"),
        (b"[1, 2]", 400, None, None),
    ],
)
async def test_bad_chat_requests(
    server: RunningServer, data: bytes, status: int, param: str | None, code: str | None
) -> None:
    got, body, _ = await call(server, "POST", CHAT, data)
    assert got == status, body
    error = assert_error_shape(body)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code


async def test_context_overflow_names_the_arithmetic(server: RunningServer) -> None:
    _, body, _ = await call(server, "POST", CHAT, chat(max_tokens=5000))
    message = body["error"]["message"]
    assert "2048 tokens" in message
    assert "5000 for the completion" in message


async def test_prompt_longer_than_context(server: RunningServer) -> None:
    data = json.dumps({"model": "smollm2", "prompt": "hello " * 3000, "max_tokens": 1}).encode()
    status, body, _ = await call(server, "POST", "/v1/completions", data)
    assert status == 400
    error = assert_error_shape(body)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "prompt"


async def test_bad_token_ids(server: RunningServer) -> None:
    data = json.dumps({"model": "smollm2", "prompt": [1, 99999999], "max_tokens": 1}).encode()
    status, body, _ = await call(server, "POST", "/v1/completions", data)
    assert status == 400
    assert assert_error_shape(body)["param"] == "prompt"


async def test_wrong_method_unknown_route_and_large_body(server: RunningServer) -> None:
    status, body, headers = await call(server, "GET", CHAT)
    assert status == 405
    assert_error_shape(body)
    assert "POST" in headers["Allow"]

    status, body, _ = await call(server, "GET", "/v1/nothing-here")
    assert status == 404
    assert_error_shape(body)

    huge = chat(messages=[{"role": "user", "content": "x" * 100_000}])
    status, body, _ = await call(server, "POST", CHAT, huge)
    assert status == 413
    error = assert_error_shape(body)
    assert "65536" in error["message"]
    assert error["type"] == "invalid_request_error"


async def test_server_still_serves_after_bad_input(server: RunningServer) -> None:
    for data in (b"{", chat(model="nope"), chat(max_tokens=-1)):
        await call(server, "POST", CHAT, data)
    status, body, _ = await call(server, "POST", CHAT, chat())
    assert status == 200
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert server.process.poll() is None
    assert "Traceback" not in server.log()


async def test_null_for_unset_options_means_default(server: RunningServer) -> None:
    data = chat(n=None, stream=None, temperature=None, stop=None, seed=None)
    raw = json.loads(data)
    raw.update({"n": None, "stream": None, "stop": None, "logit_bias": None, "user": None})
    status, body, _ = await call(server, "POST", CHAT, json.dumps(raw).encode())
    assert status == 200, body
    assert body["object"] == "chat.completion"
