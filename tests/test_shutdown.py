"""SIGTERM during a stream: it finishes within the grace (or ends saying why once the grace
is over), new requests are refused, and the process exits 0."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from llmis.engine.jobs import Job
from llmis.engine.sampling import SamplingParams
from llmis.errors import APIError
from llmis.ops.shutdown import ServerShuttingDownError, Shutdown
from tests.conftest import RunningServer, smollm_config
from tests.ops_helpers import chat, finish_reasons, sse_payloads, stream_text


async def sigterm_mid_stream(
    server: RunningServer, max_tokens: int
) -> tuple[list[object], str | None]:
    """Start a stream, SIGTERM the server at its first token, try a new request meanwhile;
    return the stream's payloads and what happened to the new request."""
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            server.url + "/v1/chat/completions", json=chat(max_tokens=max_tokens, stream=True)
        )
        assert resp.status == 200
        raw = b""
        async for line in resp.content:
            raw += line
            if b'"content":"' in line and b'"content":""' not in line:
                break
        server.process.send_signal(signal.SIGTERM)
        while "shutting down:" not in server.log():  # the listening socket is closed by now
            await asyncio.sleep(0.05)
        refused: str | None = None
        try:
            async with (
                aiohttp.ClientSession() as other,
                other.get(server.url + "/v1/models", timeout=aiohttp.ClientTimeout(10)) as late,
            ):
                refused = f"status {late.status}" if late.status == 503 else None
        except aiohttp.ClientConnectionError as exc:
            refused = type(exc).__name__
        raw += await resp.read()
    return sse_payloads(raw), refused


def exit_code(server: RunningServer) -> int:
    try:
        return server.process.wait(120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"llmis did not exit after SIGTERM:\n{server.log()[-3000:]}")


async def test_stream_finishes_within_grace(start_server: Callable[..., RunningServer]) -> None:
    server = start_server(smollm_config(extra_server="shutdown_grace_seconds = 120"))
    payloads, refused = await sigterm_mid_stream(server, max_tokens=6)
    assert refused is not None, "a request after SIGTERM was served"
    assert finish_reasons(payloads) == ["length"]
    assert stream_text(payloads)
    assert not any("error" in p for p in payloads)  # type: ignore[operator]
    assert exit_code(server) == 0
    assert "shutdown: requests drained" in server.log()


async def test_stream_past_grace_ends_saying_why(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(smollm_config(extra_server="shutdown_grace_seconds = 1"))
    payloads, refused = await sigterm_mid_stream(server, max_tokens=1500)
    assert refused is not None
    assert finish_reasons(payloads) == []
    error = payloads[-1]["error"]  # type: ignore[index]
    assert error["code"] == "server_shutting_down"
    assert "grace period of 1s" in error["message"]
    assert exit_code(server) == 0


async def test_drain_stops_what_outlives_the_grace() -> None:
    """Unit: requests in flight are counted, the grace is waited, then generations stopped."""
    shutdown = Shutdown(grace=0.2)
    seen: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(shutdown.inflight)
        return web.Response()

    await shutdown.middleware(make_mocked_request("GET", "/v1/models"), handler)
    assert seen == [1] and shutdown.inflight == 0
    job = Job([1], SamplingParams(max_tokens=1), asyncio.get_running_loop())
    stopped: list[APIError] = []

    def stop(error: APIError) -> None:
        stopped.append(error)
        job.done = True

    shutdown.watch(job, stop)
    await shutdown.drain(web.Application())
    assert shutdown.draining and shutdown.expired
    assert [e.code for e in stopped] == ["server_shutting_down"]
    with pytest.raises(ServerShuttingDownError) as exc:
        await shutdown.middleware(make_mocked_request("GET", "/v1/models"), handler)
    assert exc.value.status == 503 and exc.value.headers["Connection"] == "close"
