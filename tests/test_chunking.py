"""Stream chunking (``stream_options.chunk_tokens``, ``min_interval_ms`` and ``[streaming]``):
exact SSE bytes and WebSocket events from a real server on SmolLM2, and the coalescer alone."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from llmis.engine.jobs import Delta, Finished, JobEvent
from llmis.serving.chunking import Pacing, coalesce
from tests.conftest import SMOLLM_RESOURCE, RunningServer

NO_EOS = {str(t): -100 for t in (0, 1, 2, 4)}  # SmolLM2's end tokens: runs to max_tokens
N = 10


def body(stream_options: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": N,
        "temperature": 0,
        "logit_bias": NO_EOS,
        "stream": True,
        **extra,
    }
    if stream_options is not None:
        out["stream_options"] = stream_options
    return out


async def sse(server: RunningServer, payload: dict[str, Any]) -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{server.url}/v1/chat/completions", json=payload) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return await resp.read()


def frames(raw: bytes) -> list[str]:
    """The events, checked to be exactly ``data: ...\\n\\n`` each (pings left out)."""
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n")
    parts = [p for p in text.split("\n\n")[:-1] if p != ": ping"]
    assert all(p.startswith("data: ") and "\n" not in p for p in parts), parts
    return [p[6:] for p in parts]


def contents(raw: bytes) -> tuple[list[str], list[dict[str, Any]]]:
    events = [json.loads(f) for f in frames(raw)[:-1]]
    texts = [
        e["choices"][0]["delta"]["content"]
        for e in events
        if e["choices"] and e["choices"][0]["delta"].get("content")
    ]
    return texts, events


@pytest.fixture(scope="module")
def stream_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server(
        f"""
[server]
host = "127.0.0.1"
threads = 2

[streaming]
chunk_tokens = 3

[[models]]
name = "smollm2"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 1024
"""
    )


async def one_token_events(server: RunningServer) -> list[str]:
    texts, _ = contents(await sse(server, body({"chunk_tokens": 1})))
    assert len(texts) == N  # every token of this greedy reply has text of its own
    return texts


async def test_chunk_tokens_groups_n_tokens_per_event_and_flushes_the_rest(
    stream_server: RunningServer,
) -> None:
    singles = await one_token_events(stream_server)
    raw = await sse(stream_server, body({"chunk_tokens": 4, "include_usage": True}))
    texts, events = contents(raw)
    assert texts == ["".join(singles[0:4]), "".join(singles[4:8]), "".join(singles[8:10])]
    # framing otherwise unchanged: role chunk first, then content, finish, usage, [DONE]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["finish_reason"] for e in events[1:-1]] == [None] * 3 + ["length"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == N
    assert len(events) == 1 + 3 + 1 + 1


async def test_config_default_and_a_large_interval(stream_server: RunningServer) -> None:
    singles = await one_token_events(stream_server)
    texts, _ = contents(await sse(stream_server, body()))  # [streaming] chunk_tokens = 3
    assert texts == ["".join(singles[i : i + 3]) for i in range(0, N, 3)]
    # an interval longer than the generation: the first token at once, the rest at the end
    texts, _ = contents(
        await sse(stream_server, body({"chunk_tokens": 1, "min_interval_ms": 60000}))
    )
    assert texts == [singles[0], "".join(singles[1:])]


async def test_completions_and_websocket_chunk_too(stream_server: RunningServer) -> None:
    singles = await one_token_events(stream_server)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{stream_server.url}/v1/ws") as ws:
            message = {k: v for k, v in body({"chunk_tokens": 4}).items() if k != "stream"}
            await ws.send_json({"type": "chat", "id": 7, "trim": False, **message})
            deltas = []
            while True:
                event = await ws.receive_json(timeout=120)
                if event["type"] != "delta":
                    break
                deltas.append(event["content"])
            assert event["type"] == "done" and event["finish_reason"] == "length"
            assert deltas == ["".join(singles[0:4]), "".join(singles[4:8]), "".join(singles[8:])]
        payload = {
            "model": "smollm2",
            "prompt": "The sea is",
            "max_tokens": N,
            "temperature": 0,
            "logit_bias": NO_EOS,
            "stream": True,
            "stream_options": {"chunk_tokens": 5},
        }
        async with session.post(f"{stream_server.url}/v1/completions", json=payload) as resp:
            raw = await resp.read()
    events = [json.loads(f) for f in frames(raw)[:-1]]
    texts = [e["choices"][0]["text"] for e in events if e["choices"][0]["text"]]
    assert 1 <= len(texts) <= 2  # ten tokens in chunks of five (fewer if a token held text back)


@pytest.mark.parametrize(
    "options", [{"chunk_tokens": 0}, {"chunk_tokens": "x"}, {"min_interval_ms": -1}]
)
async def test_bad_stream_options_are_400(
    stream_server: RunningServer, options: dict[str, Any]
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{stream_server.url}/v1/chat/completions", json=body(options)) as resp,
    ):
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error" and "stream_options" in error["param"]


async def events_of(items: list[JobEvent | None]) -> AsyncIterator[JobEvent | None]:
    for item in items:
        yield item


async def test_coalesce_counts_tokens_not_deltas() -> None:
    # a delta can carry several tokens (text held back for a stop string): counted by tokens
    source: list[JobEvent | None] = [
        Delta("a", completion_tokens=1),
        None,
        Delta("bc", completion_tokens=3),
        Delta("d", completion_tokens=4),
        Delta("e", completion_tokens=5),
        Finished("stop", 2, 5),
    ]
    out = [e async for e in coalesce(events_of(source), Pacing(chunk_tokens=2))]
    assert out == [
        None,
        Delta("abc", completion_tokens=3),
        Delta("de", completion_tokens=5),
        Finished("stop", 2, 5),
    ]
    same = [e async for e in coalesce(events_of(source), Pacing())]
    assert same == source  # the defaults change nothing


async def test_ollama_and_anthropic_streams_chunk_too(stream_server: RunningServer) -> None:
    """The same grouping on Ollama's NDJSON lines and Anthropic's text deltas: the config's
    default through the official clients, ``stream_options`` per request on the wire."""
    import anthropic
    import ollama

    singles = await one_token_events(stream_server)
    groups3 = ["".join(singles[i : i + 3]) for i in range(0, N, 3)]
    groups4 = ["".join(singles[0:4]), "".join(singles[4:8]), "".join(singles[8:])]
    messages = body()["messages"]
    client = ollama.AsyncClient(host=stream_server.url)
    options = {"temperature": 0, "num_predict": N}
    parts = [
        part.message.content
        async for part in await client.chat("smollm2", messages, stream=True, options=options)
        if not part.done and part.message.content
    ]
    # logit_bias is not an Ollama option: the reply may end early, on the same greedy tokens
    assert (
        parts == groups3[: len(parts)] and "".join(parts) == "".join(singles)[: len("".join(parts))]
    )
    lines: list[dict[str, Any]] = []
    wire = {
        "model": "smollm2",
        "messages": messages,
        "options": options,
        "stream_options": {"chunk_tokens": 4},
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{stream_server.url}/api/chat", json=wire) as resp,
    ):
        assert resp.status == 200
        async for line in resp.content:
            lines.append(json.loads(line))
    texts = [x["message"]["content"] for x in lines if not x["done"] and x["message"]["content"]]
    assert texts == groups4[: len(texts)] and lines[-1]["done"]

    claude = anthropic.AsyncAnthropic(base_url=stream_server.url, api_key="unused")
    deltas: list[str] = []
    async with claude.messages.stream(
        model="smollm2",
        max_tokens=N,
        messages=messages,
        extra_body={"temperature": 0, "stream_options": {"chunk_tokens": 4}},
    ) as stream:
        async for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                deltas.append(event.delta.text)
    assert deltas == groups4[: len(deltas)] and deltas
