"""Helpers shared by the operations tests (metrics, logs, auth, limits, filter, shutdown)."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningServer

EOS_BAN = {"0": -100, "2": -100}  # <|endoftext|>, <|im_end|>: generate exactly max_tokens
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def chat(max_tokens: int = 3, stream: bool = False, **extra: Any) -> dict[str, Any]:
    """A chat request that generates exactly ``max_tokens`` tokens at temperature 0."""
    return {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Count from one to twenty."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": EOS_BAN,
        "stream": stream,
        **extra,
    }


async def post(
    server: RunningServer,
    path: str,
    body: dict[str, Any],
    key: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.url + path, json=body, headers={**bearer(key), **(headers or {})}
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None), dict(resp.headers)


async def get(
    server: RunningServer, path: str, key: str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.url + path, headers={**bearer(key), **(headers or {})}) as resp,
    ):
        return resp.status, await resp.read(), dict(resp.headers)


def sse_payloads(raw: bytes) -> list[Any]:
    """The JSON payloads of an SSE body that ends with ``data: [DONE]``."""
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-300:]
    events = [e for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    return [json.loads(e[6:]) for e in events[:-1]]


async def stream_chat(
    server: RunningServer, body: dict[str, Any], key: str | None = None
) -> tuple[int, list[Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.url + "/v1/chat/completions", json=body, headers=bearer(key)) as resp,
    ):
        raw = await resp.read()
        return resp.status, sse_payloads(raw) if resp.status == 200 else [json.loads(raw)]


def stream_text(payloads: list[Any]) -> str:
    return "".join(
        p["choices"][0]["delta"].get("content", "") for p in payloads if p.get("choices")
    )


def finish_reasons(payloads: list[Any]) -> list[str]:
    return [
        p["choices"][0]["finish_reason"]
        for p in payloads
        if p.get("choices") and p["choices"][0]["finish_reason"]
    ]


async def scrape(
    server: RunningServer, key: str | None = None
) -> dict[tuple[str, tuple[Any, ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    status, raw, headers = await get(server, "/metrics", key)
    assert status == 200, raw
    assert headers["Content-Type"].startswith("text/plain; version=")
    samples: dict[tuple[str, tuple[Any, ...]], float] = {}
    for family in text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: dict[tuple[str, tuple[Any, ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
