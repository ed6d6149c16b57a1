"""Issue 12: nothing a client sends gets a 500, reaches the server from another origin, or
leaks internals; operators get one-line failures and clean forced exits.

Each reproducer from the issue runs against a real server with the real SmolLM2 model and
checks the status, the error shape, and that the server still serves afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from llmis.api.sse import EventStream
from llmis.config import CorsSettings, ServerSettings
from llmis.hub.client import HubError, RemoteFile, RepoListing, checked_sha256, download
from llmis.ops.cors import Cors
from llmis.ops.origin import OriginPolicy, split_host
from llmis.serving.formats import compile_grammar, request_grammar
from llmis.serving.protocol import ChatCompletionRequest
from tests.conftest import (
    OPS_USER_KEY,
    REPO,
    SMOLLM_RESOURCE,
    RunningServer,
    smollm_config,
    smollm_path,
)
from tests.ops_helpers import EOS_BAN, bearer, sse_payloads

CHAT = "/v1/chat/completions"
USER, ADMIN, WS_KEY, HOSTS_KEY = "hk-user", "hk-admin", "hk-ws", "hk-hosts"
NEST_KEY = "hk-admin-nest"  # an admin key of its own: the rate limit counts per key
SAY_HI = [{"role": "user", "content": "hi"}]


def assert_error(
    body: Any, status: int | set[int], got: int, code: str | None, param: str | None
) -> None:
    assert got in (status if isinstance(status, set) else {status}), body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"] and "Errno" not in error["message"]
    if code is not None:
        assert error["code"] == code, error
    assert error["param"] == param, error


async def send(
    server: RunningServer,
    method: str,
    path: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, server.url + path, data=data, headers=headers or {}) as resp,
    ):
        raw = await resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw


def as_json(body: object) -> bytes:
    return json.dumps(body).encode()


JSON = {"Content-Type": "application/json"}


async def still_serves(server: RunningServer, key: str | None = None) -> None:
    body = {"model": "smollm2", "messages": SAY_HI, "max_tokens": 2, "temperature": 0}
    status, reply = await send(server, "POST", CHAT, as_json(body), {**JSON, **bearer(key)})
    assert status == 200, reply
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")


# ----- 4xx for every bad input, on the shared server -----

LONG = "0" * 251


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code", "param"),
    [
        ("GET", f"/v1/models/{LONG}", None, 404, "model_not_found", "model"),
        ("GET", "/v1/models/a%00b", None, 404, "model_not_found", "model"),
        ("POST", CHAT, {"model": LONG, "messages": SAY_HI}, 404, "model_not_found", "model"),
        ("POST", CHAT, {"model": "0" * 300, "messages": SAY_HI}, 400, "invalid_value", "model"),
        ("POST", CHAT, {"model": "a\u0000b", "messages": SAY_HI}, 404, "model_not_found", "model"),
        (
            "POST",
            "/v1/completions",
            {"model": LONG, "prompt": "x"},
            404,
            "model_not_found",
            "model",
        ),
        ("POST", "/v1/embeddings", {"model": LONG, "input": "x"}, 404, "model_not_found", "model"),
        ("POST", "/admin/models/load", {"name": LONG[:200]}, 404, "model_not_found", "model"),
        ("POST", "/admin/models/unload", {"name": LONG[:200]}, 404, "model_not_found", "model"),
        (
            "POST",
            "/admin/models/swap",
            {"alias": "chat", "to": LONG[:200]},
            404,
            "model_not_found",
            "model",
        ),
        (
            "POST",
            "/admin/models/load",
            {"name": "x", "path": "0" * 256},
            {400, 404},  # ENAMETOOLONG: 400 where the OS call raises, 404 where is_file() hides it
            "invalid_model_file",
            None,
        ),
        (
            "POST",
            "/admin/models/load",
            {"name": "x", "path": "d/" * 40 + "0" * 300},
            {400, 404},
            "invalid_model_file",
            None,
        ),
        ("POST", "/admin/models/load", {"name": "x", "path": "a\u0000b"}, 400, None, "path"),
    ],
)
async def test_names_and_paths_the_os_refuses_are_4xx(
    server: RunningServer,
    method: str,
    path: str,
    body: object,
    status: int | set[int],
    code: str | None,
    param: str | None,
) -> None:
    got, reply = await send(server, method, path, as_json(body) if body else None, JSON)
    assert_error(reply, status, got, code, param)
    assert "/tmp" not in reply["error"]["message"] and str(REPO) not in reply["error"]["message"]
    await still_serves(server)


@pytest.mark.parametrize("path", [CHAT, "/v1/completions", "/v1/embeddings", "/admin/models/load"])
async def test_json_nested_100000_deep_is_a_400(hardened: RunningServer, path: str) -> None:
    headers = {**JSON, **bearer(NEST_KEY)}
    got, reply = await send(hardened, "POST", path, b"[" * 100_000, headers)
    assert_error(reply, 400, got, "invalid_json", None)
    assert "nested too deeply" in reply["error"]["message"]


async def test_json_nested_deep_on_the_websocket_is_an_error_event(server: RunningServer) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{server.url}/v1/ws") as ws,
    ):
        await ws.send_str("[" * 60_000)
        event = await ws.receive_json(timeout=30)
        assert event["type"] == "error" and event["status"] == 400, event
        assert event["error"]["code"] == "invalid_json"
        await ws.send_json({"type": "ping", "id": 1})
        assert (await ws.receive_json(timeout=30)) == {"type": "pong", "id": 1}
    await still_serves(server)


async def test_nan_is_not_json(server: RunningServer) -> None:
    data = b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "top_p": NaN}'
    got, reply = await send(server, "POST", CHAT, data, JSON)
    assert_error(reply, 400, got, "invalid_json", None)


def chat_body(**overrides: Any) -> dict[str, Any]:
    return {"model": "smollm2", "messages": SAY_HI, "max_tokens": 2, **overrides}


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        # the reproducer: a native abort in llama.cpp's grammar sampler
        (
            {"repeat_penalty": 5e-324, "seed": 2, "response_format": {"type": "json_object"}},
            "repeat_penalty",
        ),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"repeat_penalty": 101}, "repeat_penalty"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.01}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2**31}, "top_k"),
        ({"min_p": -0.5}, "min_p"),
        ({"min_p": 1.01}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"logit_bias": {str(2**31): 1}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"n": 3}, "n"),
        ({"max_tokens": 2**40}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"stop": "x" * 257}, "stop"),
        ({"stop": ["ok", "y" * 257]}, "stop"),
    ],
)
async def test_sampling_parameters_out_of_range_are_400(
    server: RunningServer, overrides: dict[str, Any], param: str
) -> None:
    got, reply = await send(server, "POST", CHAT, as_json(chat_body(**overrides)), JSON)
    assert_error(reply, 400, got, "invalid_value", param)
    await still_serves(server)


async def test_sampling_parameters_at_their_bounds_are_served(server: RunningServer) -> None:
    edges = [
        {"repeat_penalty": 0.01, "temperature": 2.0, "top_p": 1e-300, "top_k": 0, "min_p": 1},
        {"repeat_penalty": 100, "temperature": 1e-300, "presence_penalty": -2, "seed": -1},
        {"frequency_penalty": 2, "seed": 2**64 - 1, "stop": ["z" * 256] * 16, "min_p": 0},
        {"logit_bias": {"2147483647": 100, "0": -100}, "temperature": 0.005},
    ]
    for overrides in edges:
        for fmt in (None, {"type": "json_object"}):
            body = chat_body(max_tokens=8, response_format=fmt, **overrides)
            got, reply = await send(server, "POST", CHAT, as_json(body), JSON)
            assert got == 200, (overrides, reply)
    await still_serves(server)


async def test_null_means_the_openai_default(server: RunningServer) -> None:
    body = {
        "model": "smollm2",
        "prompt": "Once upon a time",
        "max_tokens": None,
        "temperature": 0,
        "logit_bias": EOS_BAN,
        "n": None,
        "stream": None,
        "stop": None,
    }
    got, reply = await send(server, "POST", "/v1/completions", as_json(body), JSON)
    assert got == 200, reply
    assert reply["usage"]["completion_tokens"] == 16  # OpenAI's default for completions


async def test_a_json_schema_over_64_kib_is_a_400(
    hardened: RunningServer,
) -> None:
    schema = {"type": "object", "description": "x" * (64 * 1024)}
    fmt = {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}}
    body = as_json(chat_body(response_format=fmt))
    got, reply = await send(hardened, "POST", CHAT, body, {**JSON, **bearer(USER)})
    assert_error(reply, 400, got, "invalid_value", "response_format")
    assert "65536" in reply["error"]["message"]
    await still_serves(hardened, USER)


async def test_a_json_schema_is_compiled_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads: list[int] = []

    def converter(schema: str) -> str:
        threads.append(threading.get_ident())
        return 'root ::= "{}"'

    monkeypatch.setattr("llmis.engine.grammar.json_schema_to_gbnf", converter)
    fmt = {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}
    request = ChatCompletionRequest.model_validate(chat_body(response_format=fmt))
    assert threads == []  # validation (on the loop) does not compile
    await compile_grammar(request)
    assert threads and threads[0] != threading.get_ident()
    assert request.response_format is not None
    assert request_grammar(request) == 'root ::= "{}"'
    assert len(threads) == 1  # compiled once


# ----- browser-origin safety -----


async def test_host_header_must_be_loopback_ip_or_allowed(server: RunningServer) -> None:
    port = server.port
    for host in (
        f"localhost:{port}",
        f"127.0.0.1:{port}",
        f"[::1]:{port}",
        f"app.localhost:{port}",
    ):
        got, _ = await send(server, "GET", "/v1/models", headers={"Host": host})
        assert got == 200, host
    for host in (f"evil.example:{port}", "rebind.attacker.test", "evil.example:x"):
        got, reply = await send(server, "GET", "/v1/models", headers={"Host": host})
        assert_error(reply, 403, got, "host_not_allowed", None)
    got, reply = await send(server, "GET", "/", headers={"Host": "evil.example"})
    assert got == 403


async def test_allowed_hosts_extends_the_host_check(hardened: RunningServer) -> None:
    key = bearer(HOSTS_KEY)
    for host, status in [("llm.example", 200), ("a.b.corp.example", 200), ("other.example", 403)]:
        got, _ = await send(hardened, "GET", "/v1/models", headers={"Host": host, **key})
        assert got == status, host


async def test_cross_origin_posts_are_refused(server: RunningServer) -> None:
    same = f"http://127.0.0.1:{server.port}"
    body = as_json(chat_body())
    cases: list[tuple[dict[str, str], int, str | None]] = [
        ({"Origin": "http://evil.example", **JSON}, 403, "origin_not_allowed"),
        ({"Origin": "null", **JSON}, 403, "origin_not_allowed"),
        ({"Origin": f"http://127.0.0.1:{server.port + 1}", **JSON}, 403, "origin_not_allowed"),
        # the cross-site form POST of the issue
        ({"Origin": "http://evil.example", "Content-Type": "text/plain"}, 403, None),
        ({"Origin": same, "Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ]
    for headers, status, code in cases:
        got, reply = await send(server, "POST", CHAT, body, headers)
        assert_error(reply, status, got, code, None)
        got, reply = await send(server, "POST", "/admin/models/unload", b'{"name":"x"}', headers)
        assert got == status, reply
    # same-origin pages, and clients that send no Origin, with or without Content-Type
    for headers in (
        {"Origin": same, **JSON},
        {"Origin": f"http://localhost:{server.port}", "Host": f"localhost:{server.port}", **JSON},
        {"Content-Type": "text/plain"},
        {},
    ):
        got, reply = await send(server, "POST", CHAT, body, headers)
        assert got == 200, (headers, reply)


async def test_cors_allowed_origins_pass_the_origin_check(ops_server: RunningServer) -> None:
    headers = {"Origin": "http://app.example", **JSON, **bearer(OPS_USER_KEY)}
    got, reply = await send(ops_server, "POST", CHAT, as_json(chat_body()), headers)
    assert got == 200, reply
    headers["Origin"] = "http://evil.example"
    got, reply = await send(ops_server, "POST", CHAT, as_json(chat_body()), headers)
    assert_error(reply, 403, got, "origin_not_allowed", None)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            f"{ops_server.url}/v1/ws", origin="http://app.example", headers=bearer(OPS_USER_KEY)
        ) as ws,
    ):
        await ws.send_json({"type": "ping", "id": 1})
        assert (await ws.receive_json(timeout=30)) == {"type": "pong", "id": 1}


async def test_websocket_checks_origin(server: RunningServer) -> None:
    async with aiohttp.ClientSession() as session:
        for origin in ("http://evil.example", "null"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(f"{server.url}/v1/ws", origin=origin)
            assert info.value.status == 403
        for origin in (f"http://127.0.0.1:{server.port}", None):
            async with session.ws_connect(f"{server.url}/v1/ws", origin=origin) as ws:
                await ws.send_json({"type": "ping", "id": 1})
                assert (await ws.receive_json(timeout=30)) == {"type": "pong", "id": 1}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("localhost:8080", ("localhost", 8080)),
        ("[::1]:80", ("::1", 80)),
        ("Example.COM.", ("example.com", None)),
        ("[::1", None),
        ("host:port", None),
        ("a:1:2", None),
        ("", None),
    ],
)
def test_split_host(value: str, expected: tuple[str, int | None] | None) -> None:
    assert split_host(value) == expected


def test_origin_policy_host_rules() -> None:
    cors = Cors(CorsSettings())
    loopback = OriginPolicy(ServerSettings(), cors)
    assert loopback.host_allowed("localhost:1") and loopback.host_allowed("10.0.0.7")
    assert not loopback.host_allowed("example.com")
    named = OriginPolicy(ServerSettings(host="llm.lan", allowed_hosts=(".corp.example",)), cors)
    assert named.host_allowed("llm.lan:8080") and named.host_allowed("x.corp.example")
    assert named.host_allowed("corp.example") and not named.host_allowed("evilcorp.example")
    everywhere = OriginPolicy(ServerSettings(host="0.0.0.0"), cors)
    assert everywhere.host_allowed("anything.example")
    pinned = OriginPolicy(ServerSettings(host="0.0.0.0", allowed_hosts=("llm.example",)), cors)
    assert not pinned.host_allowed("anything.example")
    for bad in ("llm.example:8080", "http://llm.example", "a b", ""):
        with pytest.raises(ValueError, match="allowed_hosts"):
            ServerSettings(allowed_hosts=(bad,))
    assert OriginPolicy.same_origin("https://llm.example", "llm.example:443", "http")
    assert not OriginPolicy.same_origin("https://llm.example", "llm.example", "http")


# ----- rate limits per WebSocket message, health, 409 on re-pointing a name -----


@pytest.fixture(scope="session")
def hardened(
    start_server: Callable[..., RunningServer], tmp_path_factory: pytest.TempPathFactory
) -> RunningServer:
    """Auth on, a 3-request rate limit for one key, allowed hosts, a model that cannot load,
    and a models dir holding two copies of SmolLM2 (``a`` and ``b``)."""
    models = tmp_path_factory.mktemp("hardened-models")
    for name in ("a.gguf", "b.gguf"):
        os.link(smollm_path(), models / name)
    config = f"""
[server]
host = "127.0.0.1"
threads = 2
keepalive_seconds = 0.5
models_dir = "{models}"
max_body_bytes = 262144
allowed_hosts = ["llm.example", ".corp.example"]

[auth]
api_keys = ["{USER}", "{WS_KEY}", "{HOSTS_KEY}"]
admin_keys = ["{ADMIN}", "{NEST_KEY}"]

[limits]
rate_requests = 3  # per key, and each test uses its own key
rate_window_seconds = 3600

[[models]]
name = "smollm2"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 2048

[[models]]
name = "broken"
path = "missing.gguf"
"""
    return start_server(config)


async def test_rate_limits_apply_per_websocket_message(hardened: RunningServer) -> None:
    url = f"{hardened.url}/v1/ws"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers=bearer(WS_KEY)) as ws,  # request 1 of 3
    ):
        for id_ in (1, 2):  # requests 2 and 3
            await ws.send_json({"type": "chat", "id": id_, **chat_body(max_tokens=1)})
            while (event := await ws.receive_json(timeout=120))["type"] == "delta":
                pass
            assert event["type"] == "done", event
        await ws.send_json({"type": "chat", "id": 3, **chat_body(max_tokens=1)})
        event = await ws.receive_json(timeout=120)
        assert event["type"] == "error" and event["id"] == 3 and event["status"] == 429, event
        assert event["error"]["code"] == "rate_limit_exceeded"
        await ws.send_json({"type": "ping", "id": 4})  # the socket itself stays open
        assert (await ws.receive_json(timeout=30))["type"] == "pong"


async def test_health_is_degraded_and_reasons_are_for_admins(hardened: RunningServer) -> None:
    for key in (None, USER):
        got, body = await send(hardened, "GET", "/healthz", headers=bearer(key))
        assert (got, body) == (200, {"status": "degraded", "failed": ["broken"]})
    got, body = await send(hardened, "GET", "/healthz", headers=bearer(ADMIN))
    assert got == 200 and body["status"] == "degraded"
    assert set(body["failed"]) == {"broken"} and "missing.gguf" in body["failed"]["broken"]


async def test_health_is_503_when_no_configured_model_is_usable(
    start_server: Callable[..., RunningServer],
) -> None:
    dead = start_server(
        '[server]\nhost = "127.0.0.1"\n\n[[models]]\nname = "gone"\npath = "gone.gguf"\n',
        wait_ready=False,
    )
    deadline = time.monotonic() + 60
    while (reply := await send(dead, "GET", "/healthz"))[1].get("status") == "loading":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert reply == (503, {"status": "degraded", "failed": {"gone": reply[1]["failed"]["gone"]}})
    assert "gone.gguf" in reply[1]["failed"]["gone"]  # auth off: loopback clients are admins
    got, body = await send(dead, "GET", "/v1/models")
    assert got == 200 and body["data"][0]["state"] == "failed"


async def test_admin_load_does_not_silently_repoint_a_name(hardened: RunningServer) -> None:
    admin = {**JSON, **bearer(ADMIN)}

    async def load(body: dict[str, Any]) -> tuple[int, Any]:
        return await send(hardened, "POST", "/admin/models/load", as_json(body), admin)

    for name, path in (("a", "b.gguf"), ("smollm2", "a.gguf"), ("b", "a.gguf")):
        got, reply = await load({"name": name, "path": path})
        assert_error(reply, 409, got, "model_exists", "path")
        assert path in reply["error"]["message"] and "/" not in reply["error"]["message"]
    got, reply = await load({"name": "a", "path": "a.gguf"})  # the same file: fine
    assert got == 200 and reply["path"].endswith("/a.gguf"), reply
    got, reply = await load({"name": "b", "path": "a.gguf", "replace": True})
    assert got == 200 and reply["path"].endswith("/a.gguf"), reply
    got, reply = await send(hardened, "POST", "/admin/models/unload", b'{"name":"b"}', admin)
    assert got == 200
    got, reply = await send(hardened, "POST", "/admin/models/unload", b'{"name":"a"}', admin)
    assert got == 200
    await still_serves(hardened, ADMIN)


# ----- operators -----


def test_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "llmis.toml"
    config.write_text('[server]\nhost = "127.0.0.1"\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "llmis", "serve", "--config", str(config), "--port", str(port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("llmis: cannot")]
    assert lines == [f"llmis: cannot listen on 127.0.0.1:{port}: " + lines[0].split(": ", 2)[2]]
    assert "already in use" in lines[0]


async def test_second_sigint_forces_the_exit_and_ends_streams_with_an_error(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(smollm_config(extra_server="shutdown_grace_seconds = 120"))
    body = chat_body(max_tokens=1500, temperature=0, logit_bias=EOS_BAN, stream=True)
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.url + CHAT, json=body) as resp,
    ):
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")  # the role chunk
        await resp.content.readuntil(b"\n\n")  # a first token: generating
        server.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        while "shutting down:" not in server.log():
            assert time.monotonic() < deadline, server.log()[-2000:]
            await asyncio.sleep(0.05)
        server.process.send_signal(signal.SIGINT)
        raw = await asyncio.wait_for(resp.read(), 60)
    payloads = sse_payloads(raw)
    assert payloads[-1]["error"]["code"] == "server_shutting_down", payloads[-1]
    assert "second interrupt" in payloads[-1]["error"]["message"]
    assert server.process.wait(60) == 128 + signal.SIGINT
    assert "SIGINT again: forcing the exit" in server.log()
    assert "Traceback" not in server.log()


class _StalledResponse:
    async def write(self, data: bytes) -> None:
        await asyncio.Event().wait()  # a client that never reads: the write never completes


async def test_sse_write_times_out_for_a_stalled_reader() -> None:
    aborted: list[bool] = []
    # a write waits only while the transport is backed up
    transport = SimpleNamespace(abort=lambda: aborted.append(True), get_write_buffer_size=lambda: 1)
    request = SimpleNamespace(transport=transport)
    stream = EventStream(request, write_timeout=0.05)  # type: ignore[arg-type]
    stream.response = _StalledResponse()  # type: ignore[assignment]
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(stream.send({"x": 1}), 10)
    assert aborted == [True]


async def test_a_real_client_that_stops_reading_is_dropped_after_the_write_timeout() -> None:
    """On a real socket: writes go out untimed while nothing is backed up; once the client's
    buffers are full the next write waits at most ``write_timeout`` and the stream ends."""
    from aiohttp import web

    outcome: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()

    async def handler(request: web.Request) -> web.StreamResponse:
        stream = EventStream(request, write_timeout=0.3)
        await stream.prepare()
        sent = 0
        try:
            while sent < 100_000:  # 800 MB: far more than any socket buffer holds
                await stream.send({"pad": "x" * 8000})
                sent += 1
            outcome.set_result(("finished", sent))
        except ConnectionResetError:
            outcome.set_result(("dropped", sent))
        return stream.response

    app = web.Application()
    app.router.add_get("/s", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        client.connect(("127.0.0.1", port))
        client.sendall(b"GET /s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # and never reads
        what, sent = await asyncio.wait_for(outcome, 30)
    finally:
        client.close()
        await runner.cleanup()
    assert what == "dropped" and 0 < sent < 100_000


def test_release_free_heap_looks_up_libc_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes.util

    from llmis.models import budget as memory

    if not sys.platform.startswith("linux"):
        pytest.skip("malloc_trim is glibc's")
    calls: list[str] = []
    real = ctypes.util.find_library

    def counting(name: str) -> str | None:
        calls.append(name)
        return real(name)

    monkeypatch.setattr(ctypes.util, "find_library", counting)
    memory._malloc_trim.cache_clear()
    for _ in range(5):
        memory.release_free_heap()
    assert len(calls) <= 1  # at most once, and not at all when the process has it loaded
    assert memory._malloc_trim.cache_info().misses == 1


# ----- the hub's sha256 -----


def test_hub_sha256_is_validated_before_it_names_a_file(tmp_path: Path) -> None:
    good = "AB" * 32
    assert checked_sha256(good, "m.gguf") == good.lower()
    assert checked_sha256(None, "m.gguf") is None
    for bad in ("../../etc/passwd", "ab" * 31, "zz" * 32, "ab" * 32 + "/x", 7):
        with pytest.raises(HubError, match="malformed sha256"):
            checked_sha256(bad, "m.gguf")
    listing = RepoListing("org/repo", "c" * 40, ())
    partial = tmp_path / "partial"
    with pytest.raises(HubError):
        download(listing, RemoteFile("m.gguf", 10, "../../../x" + "0" * 54), partial)
    assert not partial.exists()
