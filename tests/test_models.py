"""The multi-model manager against real models in real servers.

Two servers for the module:

* ``pair``: SmolLM2 and Gemma-3-270M resident together, plus versions ``tiny@v1`` (configured)
  and ``tiny@v2`` (a file dropped in the models dir) behind the alias ``tiny``;
* ``tight``: the same two real models under a 400 MB budget, where only one fits.

RSS figures are the server process's own (psutil on its pid); tolerances are stated at each
assertion.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from llmis.models.budget import parse_budget, predict_memory, resolve_budget
from llmis.models.gguf import read_gguf_info
from tests.conftest import (
    GEMMA_RESOURCE,
    SMOLLM_RESOURCE,
    RunningServer,
    models_dir_with_gemma,
    smollm_path,
)

MiB = 1024 * 1024
SMOLLM_EOS = {"0": -100, "2": -100}  # <|endoftext|>, <|im_end|>: forces full-length output
# <eos>, <end_of_turn>, and the '#' tokens that could spell snoozy's '###' stop string:
# streams that must run to max_tokens ban them all.
GEMMA_EOS = {str(t): -100 for t in (1, 106, 10354, 36675, 1408, 236865, 997)}


def post_json(server: RunningServer, path: str, body: object) -> tuple[int, Any, dict[str, str]]:
    request = urllib.request.Request(
        server.url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null"), dict(exc.headers)


def rss(server: RunningServer) -> int:
    return int(psutil.Process(server.process.pid).memory_info().rss)


def admin(server: RunningServer) -> dict[str, Any]:
    status, body = server.get_json("/admin/models")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def model_row(server: RunningServer, name: str) -> dict[str, Any]:
    rows = {m["name"]: m for m in admin(server)["data"]}
    return rows[name]  # type: ignore[no-any-return]


def wait_for(predicate: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def chat_body(model: str, content: str, max_tokens: int = 12, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


async def chat(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        return resp.status, await resp.json()


async def stream_chat(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    first_chunk: asyncio.Event | None = None,
    first_text: asyncio.Event | None = None,
) -> dict[str, Any]:
    """Read a whole SSE chat stream; report its models, text, finish reason and errors."""
    chunks: list[dict[str, Any]] = []
    done = False
    async with session.post(url + "/v1/chat/completions", json={**body, "stream": True}) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            chunks.append(chunk)
            if first_chunk is not None:
                first_chunk.set()
            content = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
            if first_text is not None and content:
                first_text.set()
    return {
        "done": done,
        "ended_at": time.monotonic(),
        "models": {c.get("model") for c in chunks if "model" in c},
        "errors": [c["error"] for c in chunks if "error" in c],
        "finish": [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1],
        "text": "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
        ),
    }


# ----- units: budget parsing and the prediction -----


def test_budget_parsing() -> None:
    assert parse_budget(8_000_000_000) == (8e9, False)
    assert parse_budget("75%") == (75.0, True)
    assert parse_budget("6GiB") == (6 * 1024**3, False)
    assert parse_budget("512 MB") == (512e6, False)
    assert resolve_budget("50%", total=1000) == 500
    for bad in ("lots", "0%", "150%", "-1GB", "12 parsecs", 0, True):
        with pytest.raises(ValueError):
            parse_budget(bad)  # type: ignore[arg-type]


def test_prediction_sums_weights_kv_and_overhead(gemma_path: Path) -> None:
    info = read_gguf_info(gemma_path)
    assert (info.architecture, info.quant, info.has_chat_template) == ("gemma3", "Q4_K_M", False)
    assert info.vocab_size == 262144
    small, large = predict_memory(info, 512, 512), predict_memory(info, 8192, 512)
    assert small.weights == large.weights == gemma_path.stat().st_size
    # gemma3: 18 layers x 1 KV head x (256 + 256) x f16 = 18432 bytes per token
    assert large.kv_cache - small.kv_cache == 18432 * (8192 - 512)
    assert small.total == small.weights + small.kv_cache + small.overhead


# ----- servers -----


def two_models_config(models_dir: Path, server_extra: str = "", models_extra: str = "") -> str:
    """SmolLM2 and Gemma-3-270M (chat format snoozy), 1024-token contexts."""
    return f"""
[server]
host = "127.0.0.1"
threads = 2
keepalive_seconds = 0.5
models_dir = "{models_dir}"
{server_extra}

[[models]]
name = "smollm2"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 1024

[[models]]
name = "gemma3"
resource = "{GEMMA_RESOURCE}"
chat_format = "snoozy"
n_ctx = 1024
{models_extra}
"""


PAIR_VERSIONS = f"""
[[models]]
name = "tiny@v1"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 512

[aliases]
tiny = "tiny@v1"
"""


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Path:
    models_dir = models_dir_with_gemma(tmp_path_factory.mktemp("pair-models"), gemma_path)
    os.link(smollm_path(), models_dir / "tiny@v2.gguf")  # version 2, dropped in the dir
    return models_dir


@pytest.fixture(scope="module")
def pair(start_server: Callable[..., RunningServer], pair_dir: Path) -> RunningServer:
    return start_server(two_models_config(pair_dir, models_extra=PAIR_VERSIONS))


@pytest.fixture(scope="module")
def tight(
    start_server: Callable[..., RunningServer],
    tmp_path_factory: pytest.TempPathFactory,
    gemma_path: Path,
) -> RunningServer:
    models_dir = models_dir_with_gemma(tmp_path_factory.mktemp("tight-models"), gemma_path)
    return start_server(two_models_config(models_dir, server_extra='ram_budget = "400MB"'))


# ----- both models at once -----


def test_catalog_shows_gguf_metadata_and_state(pair: RunningServer) -> None:
    status, body = pair.get_json("/v1/models")
    assert status == 200
    assert isinstance(body, dict)
    models = {m["id"]: m for m in body["data"]}
    smol, gemma = models["smollm2"], models["gemma3"]
    assert (smol["architecture"], smol["quantization"]) == ("llama", "Q4_1")
    assert (smol["has_chat_template"], smol["n_ctx_train"]) == (True, 8192)
    assert smol["context_length"] == 1024  # what requests can use: the configured n_ctx
    assert (gemma["architecture"], gemma["quantization"]) == ("gemma3", "Q4_K_M")
    assert (gemma["has_chat_template"], gemma["chat_format"]) == (False, "snoozy")
    assert smol["parameters"] > 100_000_000 and gemma["parameters"] > 250_000_000
    assert smol["state"] == gemma["state"] == "loaded"
    # the dropped file is a lazily loadable entry named by its stem; the alias is listed too
    assert models["tiny@v2"]["state"] == "available"
    assert models["tiny@v2"]["architecture"] == "llama"
    assert models["tiny"]["alias_of"] == "tiny@v1"


async def test_both_models_resident_and_answer_concurrently(pair: RunningServer) -> None:
    question = "What is the capital of France?"
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(
            *(chat(session, pair.url, chat_body(m, question)) for m in ["gemma3", "smollm2"] * 3)
        )
    for status, body in results:
        assert status == 200, body
    texts = {body["model"]: body["choices"][0]["message"]["content"] for _, body in results}
    assert "Paris" in texts["gemma3"], texts  # the snoozy format gives sensible answers
    assert texts["smollm2"].strip(), texts
    rows = {m["name"]: m for m in admin(pair)["data"]}
    assert rows["gemma3"]["state"] == rows["smollm2"]["state"] == "loaded"


def test_measured_memory_matches_prediction(pair: RunningServer) -> None:
    listing = admin(pair)
    # admin's rss_bytes is the server's own psutil reading: same as ours within 5%
    assert abs(listing["rss_bytes"] - rss(pair)) < 0.05 * rss(pair)
    for row in listing["data"]:
        if row["state"] != "loaded":
            continue
        predicted, measured = row["predicted_bytes"], row["measured_bytes"]
        assert measured > 0.5 * row["gguf"]["file_size"], row
        assert abs(predicted - measured) < 0.25 * measured, row  # prediction within 25%
    assert listing["used_bytes"] == sum(
        r["measured_bytes"] for r in listing["data"] if r["state"] == "loaded"
    )


def test_unload_returns_memory_and_load_brings_it_back(pair: RunningServer) -> None:
    before = rss(pair)
    measured = model_row(pair, "gemma3")["measured_bytes"]
    status, body, _ = post_json(pair, "/admin/models/unload", {"name": "gemma3"})
    assert status == 200, body
    assert body["state"] == "available"
    fell = before - rss(pair)
    # the RSS falls by the measured size of the model, within 25% (plus 10 MiB of noise)
    assert abs(fell - measured) < 0.25 * measured + 10 * MiB, (fell, measured)

    status, body, _ = post_json(pair, "/admin/models/load", {"name": "gemma3"})
    assert status == 200, body
    assert body["state"] == "loaded"
    assert abs(rss(pair) - before) < 0.25 * measured + 10 * MiB
    assert pair.get_json("/healthz")[0] == 200


async def test_lazy_load_of_a_dropped_file_is_shared_and_keeps_health(
    pair: RunningServer, pair_dir: Path
) -> None:
    os.link(smollm_path(), pair_dir / "late-Q4_1.gguf")
    health: list[int] = []

    async def poll_health(session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            async with session.get(pair.url + "/healthz") as resp:
                health.append(resp.status)
            await asyncio.sleep(0.02)

    async with aiohttp.ClientSession() as session:
        stop = asyncio.Event()
        poller = asyncio.create_task(poll_health(session, stop))
        results = await asyncio.gather(
            *(chat(session, pair.url, chat_body("late-Q4_1", "Hello!")) for _ in range(3))
        )
        stop.set()
        await poller
    assert [s for s, _ in results] == [200, 200, 200], results
    assert health and set(health) == {200}
    assert pair.log().count("model late-Q4_1 loaded from") == 1  # one load, shared
    assert model_row(pair, "late-Q4_1")["state"] == "loaded"


async def test_swap_during_streams_loses_nothing(pair: RunningServer) -> None:
    body = chat_body("tiny", "Tell me a long story about a dragon.", 48, logit_bias=SMOLLM_EOS)
    async with aiohttp.ClientSession() as session:
        started = [asyncio.Event() for _ in range(4)]
        streams = [
            asyncio.create_task(stream_chat(session, pair.url, body, first_chunk=event))
            for event in started
        ]
        await asyncio.gather(*(e.wait() for e in started))  # all four are queued on v1
        loop = asyncio.get_running_loop()
        swap_asked_at = time.monotonic()
        status, swapped, _ = await loop.run_in_executor(
            None, post_json, pair, "/admin/models/swap", {"alias": "tiny", "to": "v2"}
        )
        assert status == 200, swapped
        assert (swapped["from"], swapped["to"]) == ("tiny@v1", "tiny@v2")
        after = await asyncio.gather(
            *(chat(session, pair.url, chat_body("tiny", "Hi", 4)) for _ in range(2))
        )
        results = await asyncio.gather(*streams)
    for result in results:
        assert result["done"] and not result["errors"], result
        assert result["finish"] == "length" and result["models"] == {"tiny@v1"}, result
    # the streams were still running when the swap was asked for (it returns once v2 loaded)
    assert max(r["ended_at"] for r in results) > swap_asked_at
    for status, answer in after:
        assert status == 200 and answer["model"] == "tiny@v2", answer
    wait_for(lambda: model_row(pair, "tiny@v1")["state"] == "available")  # drained, unloaded
    listing = admin(pair)
    assert listing["aliases"]["tiny"] == "tiny@v2"
    assert model_row(pair, "tiny@v2")["aliases"] == ["tiny"]


# ----- safety -----


def test_paths_outside_the_models_dir_are_refused(pair: RunningServer, pair_dir: Path) -> None:
    outside = smollm_path()  # a real GGUF, but outside the models dir
    for path in ("../../etc/passwd", str(outside), "/etc/hostname"):
        status, body, _ = post_json(pair, "/admin/models/load", {"name": "x", "path": path})
        assert status == 403, body
        assert body["error"]["code"] == "invalid_model_file"
        assert "outside the models dir" in body["error"]["message"]
    (pair_dir / "escape.gguf").symlink_to(outside)
    status, body = asyncio.run(_chat_once(pair, "escape"))
    assert status == 403, body
    assert "outside the models dir" in body["error"]["message"]
    status, body, _ = post_json(pair, "/admin/models/load", {"name": "x", "path": "escape.gguf"})
    assert status == 403, body


def test_corrupt_and_truncated_files_are_rejected_cleanly(
    pair: RunningServer, pair_dir: Path
) -> None:
    (pair_dir / "garbage.gguf").write_text("this is not a model\n" * 100)
    with smollm_path().open("rb") as src:
        (pair_dir / "cut.gguf").write_bytes(src.read(20_000_000))
    status, body = asyncio.run(_chat_once(pair, "garbage"))
    assert status == 400, body
    assert "garbage.gguf is not a GGUF file" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    status, body = asyncio.run(_chat_once(pair, "cut"))
    assert status == 400, body
    assert "cut.gguf is truncated" in body["error"]["message"]
    status, body, _ = post_json(pair, "/admin/models/load", {"name": "y", "path": "cut.gguf"})
    assert status == 400, body
    # the server is unaffected
    assert pair.get_json("/healthz")[0] == 200
    status, body = asyncio.run(_chat_once(pair, "smollm2"))
    assert status == 200, body


async def _chat_once(server: RunningServer, model: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        return await chat(session, server.url, chat_body(model, "Hello", 4))


# ----- a budget where only one model fits -----


async def test_tight_budget_evicts_the_idle_model(tight: RunningServer) -> None:
    listing = admin(tight)
    rows = {m["name"]: m for m in listing["data"]}
    assert listing["budget_bytes"] == 400_000_000
    assert rows["smollm2"]["state"] == "loaded"
    assert rows["gemma3"]["state"] == "available"  # did not fit next to smollm2 at startup
    smol = rows["smollm2"]["measured_bytes"]
    before = rss(tight)

    status, body = await _chat_once(tight, "gemma3")
    assert status == 200, body
    rows = {m["name"]: m for m in admin(tight)["data"]}
    assert rows["gemma3"]["state"] == "loaded"
    assert rows["smollm2"]["state"] == "available"
    assert rows["smollm2"]["evictions"] == 1
    gemma = rows["gemma3"]["measured_bytes"]
    # smollm2's memory really went back: RSS moved by gemma - smollm2, within 40 MiB
    delta = rss(tight) - before
    assert abs(delta - (gemma - smol)) < 40 * MiB, (delta, gemma, smol)
    assert admin(tight)["used_bytes"] <= 400_000_000


async def test_tight_budget_never_evicts_a_busy_or_pinned_model(tight: RunningServer) -> None:
    status, body = await _chat_once(tight, "gemma3")  # make sure gemma3 is the loaded one
    assert status == 200, body
    long = {
        "model": "gemma3",
        "messages": [{"role": "user", "content": "Write about the history of France."}],
        "max_tokens": 24,
        "logit_bias": GEMMA_EOS,
    }
    async with aiohttp.ClientSession() as session:
        first_text = asyncio.Event()
        stream = asyncio.create_task(stream_chat(session, tight.url, long, first_text=first_text))
        await first_text.wait()
        async with session.post(
            tight.url + "/v1/chat/completions", json=chat_body("smollm2", "Hi")
        ) as resp:
            status, refused, retry_after = resp.status, await resp.json(), resp.headers
        assert not stream.done()  # the refusal came while gemma3 was streaming
        result = await stream
    assert status == 503, refused
    error = refused["error"]
    assert error["code"] == "insufficient_memory" and error["param"] == "model"
    assert "budget is 381 MiB" in error["message"] and "gemma3" in error["message"]
    assert "busy" in error["message"]
    assert retry_after.get("Retry-After") == "5"
    assert result["done"] and result["finish"] == "length" and not result["errors"], result
    assert model_row(tight, "gemma3")["evictions"] == 0

    # a pinned model is not evicted even when idle
    status, body, _ = post_json(tight, "/admin/models/load", {"name": "gemma3", "pin": True})
    assert status == 200 and body["pinned"] is True, body
    status, refused = await _chat_once(tight, "smollm2")
    assert status == 503 and "pinned" in refused["error"]["message"], refused
    status, body, _ = post_json(tight, "/admin/models/load", {"name": "gemma3", "pin": False})
    assert status == 200 and body["pinned"] is False
    status, body = await _chat_once(tight, "smollm2")  # idle and unpinned: evicted now
    assert status == 200, body
    assert model_row(tight, "gemma3")["state"] == "available"


def test_alias_config_is_validated() -> None:
    from llmis.config import Settings

    model = {"name": "chat@v1", "path": "a.gguf"}
    settings = Settings.model_validate({"models": [model], "aliases": {"chat": "chat@v1"}})
    assert settings.aliases == {"chat": "chat@v1"}
    with pytest.raises(ValueError, match="also a model name"):
        Settings.model_validate({"models": [model], "aliases": {"chat@v1": "chat@v1"}})
    with pytest.raises(ValueError, match="ram_budget"):
        Settings.model_validate({"server": {"ram_budget": "most of it"}})
