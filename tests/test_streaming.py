"""SSE framing on the wire, keep-alive comments, cancellation on disconnect, queue bounds."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from tests.conftest import RunningServer, smollm_config

EOS_BAN = {"2": -100}


def body(model: str = "smollm2", max_tokens: int = 8, stream: bool = True, **extra: Any) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": EOS_BAN,
        "stream": stream,
        **extra,
    }


async def test_sse_wire_format(server: RunningServer) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.url + "/v1/chat/completions",
            json=body(max_tokens=5, stream_options={"include_usage": True}),
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Accel-Buffering"] == "no"
        raw = await resp.read()
    assert raw.endswith(b"\n\ndata: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    payloads = [e for e in events[:-1] if not e.startswith(b":")]
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in payloads)
    chunks = [json.loads(e[6:]) for e in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["object"] == "chat.completion.chunk"
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert 1 <= len(content) <= 5
    final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(final) == 1 and final[0]["choices"][0]["finish_reason"] == "length"
    assert final[0]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert all(c["usage"] is None for c in chunks[:-1])


async def first_content(resp: aiohttp.ClientResponse) -> float:
    """Read SSE lines until the first content delta; return the time it arrived."""
    async for line in resp.content:
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                return time.monotonic()
    raise AssertionError("stream ended without content")


async def test_disconnect_cancels_stream_and_frees_worker(server: RunningServer) -> None:
    async with aiohttp.ClientSession() as session:
        resp = await session.post(server.url + "/v1/chat/completions", json=body(max_tokens=1500))
        start = await first_content(resp)
        tokens = 1
        async for line in resp.content:
            if line.startswith(b"data: {"):
                tokens += 1
                if tokens == 10:
                    break
        rate = tokens / max(time.monotonic() - start, 1e-3)  # tokens/s of this very stream
        resp.close()  # the client goes away mid-stream
        cancelled_at = time.monotonic()
        async with session.post(
            server.url + "/v1/chat/completions", json=body(max_tokens=3)
        ) as nxt:
            ttft = await first_content(nxt) - cancelled_at
    remaining = (1500 - tokens) / rate  # how long the cancelled stream still had to run
    assert ttft < remaining / 5, (ttft, remaining)


async def stream_rate(session: aiohttp.ClientSession, url: str, tokens: int = 12) -> float:
    """Tokens/s of a short reference stream: how fast this server generates right now."""
    async with session.post(url, json=body(max_tokens=tokens)) as resp:
        start = await first_content(resp)
        seen = 1
        async for line in resp.content:
            if line.startswith(b"data: {") and b'"content"' in line:
                seen += 1
        return (seen - 1) / max(time.monotonic() - start, 1e-3)


async def test_disconnect_cancels_non_stream_request(server: RunningServer) -> None:
    url = server.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        rate = await stream_rate(session, url)
        started = time.monotonic()
        task = asyncio.create_task(session.post(url, json=body(max_tokens=1500, stream=False)))
        await asyncio.sleep(1.0)
        task.cancel()  # closes the connection before the answer
        cancelled_at = time.monotonic()
        async with session.post(url, json=body(max_tokens=3)) as nxt:
            ttft = await first_content(nxt) - cancelled_at
    # Had it not been cancelled, the 1500-token job would still hold the worker this long:
    remaining = 1500 / rate - (cancelled_at - started)
    assert ttft < remaining / 5, (ttft, remaining)


async def test_keepalive_comments_while_queued_and_queued_job_dropped(
    server: RunningServer,
) -> None:
    """smollm2-q1 holds one running job and one waiting; its config pings every 0.5 s."""
    url = server.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        running = await session.post(url, json=body("smollm2-q1", max_tokens=1500))
        await first_content(running)
        queued = await session.post(url, json=body("smollm2-q1", max_tokens=3))
        assert queued.status == 200
        first_line = await asyncio.wait_for(queued.content.readline(), 10)
        assert first_line.startswith(b"data: ")  # role chunk goes out at once
        assert (await queued.content.readline()) == b"\n"
        ping = await asyncio.wait_for(queued.content.readline(), 10)
        assert ping == b": ping\n"
        # A third request does not fit (1 running + 1 queued) ...
        async with session.post(url, json=body("smollm2-q1", stream=False)) as full:
            assert full.status == 429
        # ... until the queued client leaves: its job is dropped from the queue at once.
        queued.close()
        await asyncio.sleep(0.3)
        third = await session.post(url, json=body("smollm2-q1", max_tokens=3))
        assert third.status == 200
        running.close()
        await first_content(third)
        third.close()


async def test_queue_bound_gives_429_and_others_complete(server: RunningServer) -> None:
    url = server.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        running = await session.post(url, json=body("smollm2-q1", max_tokens=40))
        await first_content(running)

        async def one() -> tuple[int, Any, str | None]:
            async with session.post(url, json=body("smollm2-q1", max_tokens=4, stream=False)) as r:
                return r.status, await r.json(), r.headers.get("Retry-After")

        results = await asyncio.gather(*(one() for _ in range(4)))
        rest = (await running.read()).decode()
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 429, 429, 429], results
    for status, payload, retry_after in results:
        if status == 429:
            assert retry_after is not None and int(retry_after) >= 1
            assert payload["error"]["type"] == "rate_limit_error"
            assert payload["error"]["code"] == "queue_full"
        else:
            assert payload["usage"]["completion_tokens"] == 4
    assert rest.endswith("data: [DONE]\n\n")


async def test_server_on_the_plain_asyncio_loop(start_server: Callable[..., RunningServer]) -> None:
    plain = start_server(smollm_config(extra_server='event_loop = "asyncio"'))
    async with (
        aiohttp.ClientSession() as session,
        session.post(plain.url + "/v1/chat/completions", json=body(max_tokens=4)) as resp,
    ):
        raw = await resp.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    assert raw.count(b'"content":"') >= 2  # the role chunk and at least one token
