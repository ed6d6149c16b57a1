"""examples/: the curl script, the SSE client and the WebSocket client, each run as a user runs
it against a real server (SmolLM2 for chat, MiniLM for embeddings and a search index)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.conftest import REPO, SMOLLM_RESOURCE, RunningServer

EXAMPLES = REPO / "examples"
MINILM = REPO / "models" / ".converted" / "all-MiniLM-L6-v2.gguf"


@pytest.fixture(scope="module")
def examples_server(
    start_server: Callable[..., RunningServer], tmp_path_factory: pytest.TempPathFactory
) -> RunningServer:
    assert MINILM.is_file(), "make minilm converts the MiniLM GGUF"
    workdir = tmp_path_factory.mktemp("examples")
    config = f"""
[server]
host = "127.0.0.1"
threads = 2
indexes_dir = "{workdir / "indexes"}"
models_dir = "{MINILM.parent.parent}"

[[models]]
name = "smollm2"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 1024
slots = 2

[[models]]
name = "minilm"
path = ".converted/{MINILM.name}"
n_ctx = 512
embedding = true
"""
    (workdir / "llmis.toml").write_text(config)
    built = subprocess.run(
        [
            *(sys.executable, "-m", "llmis", "index", str(REPO / "data" / "topics.csv")),
            *("--config", "llmis.toml", "--text-column", "text", "--id-column", "id"),
            *("--model", "minilm", "--out", "topics", "--no-progress"),
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    return start_server(config)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def sections(output: str) -> dict[str, str]:
    parts = re.split(r"^## (.*)$", output, flags=re.M)
    return {title: body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def test_curl_script(examples_server: RunningServer) -> None:
    result = run(
        "bash",
        str(EXAMPLES / "curl.sh"),
        env={
            "LLMIS_URL": examples_server.url,
            "MODEL": "smollm2",
            "EMBED_MODEL": "minilm",
            "INDEX": "topics",
        },
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    out = sections(result.stdout)
    health = out["health and version"].split("\n")
    assert json.loads(health[1]) == {"status": "ok"}
    assert "llama_cpp_python" in json.loads(health[2])
    models = out["models (OpenAI list shape, with state and GGUF metadata)"].split("\n")
    assert {m["id"] for m in json.loads(models[1])["data"]} >= {"smollm2", "minilm"}
    chat = json.loads(out["chat completion"])
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"]
    streamed = out["chat completion, streamed (Server-Sent Events; -N: print as it arrives)"]
    events = [line for line in streamed.split("\n\n") if line.strip()]
    assert events[-1].strip() == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["usage"]["completion_tokens"] > 0
    schema_reply = json.loads(out["chat completion with JSON output (a grammar from the schema)"])
    content = schema_reply["choices"][0]["message"]["content"]
    if schema_reply["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(content)["colour"], str)
    completions = json.loads(out["text completion (a batch of two prompts)"])
    assert len(completions["choices"]) == 2
    embeddings = json.loads(out["embeddings"])
    assert [len(d["embedding"]) for d in embeddings["data"]] == [384, 384]
    index_list, search = out["search indexes"].strip().split("\n")
    assert "topics" in json.dumps(json.loads(index_list))
    hits = json.loads(search)["data"] if "data" in json.loads(search) else json.loads(search)
    assert "bread-baking" in json.dumps(hits)  # retrieval, not generation: deterministic
    error = out["errors have OpenAI's shape (a 404 for an unknown model; -f off to see the body)"]
    body, status = error.strip().split("\n")
    assert status == "HTTP 404" and json.loads(body)["error"]["code"] == "model_not_found"
    admin = out["admin: models with memory, load and unload (admin key, or loopback with auth off)"]
    assert json.loads(admin.split("\n")[1])["object"] == "list"
    assert "vllm:generation_tokens_total" in out["metrics (Prometheus text format)"]
    assert "GET / -> HTTP 200, text/html" in out["the OpenAPI document and the chat page"]


def test_curl_script_covers_every_route_family(examples_server: RunningServer) -> None:
    """Every documented route family appears in curl.sh, or in the WebSocket client."""
    status, document = examples_server.get_json("/openapi.json")
    assert status == 200 and isinstance(document, dict)
    script = (EXAMPLES / "curl.sh").read_text() + (EXAMPLES / "ws_client.py").read_text()
    missing = []
    for path in document["paths"]:
        family = "/".join(path.split("/")[:3]).split("{")[0].rstrip("/") or "/"
        if family not in script and family != "/static":  # the chat page's own files
            missing.append(path)
    assert not missing, f"routes with no example: {missing}"


def test_sse_client(examples_server: RunningServer) -> None:
    result = run(
        sys.executable,
        str(EXAMPLES / "sse_client.py"),
        "--url",
        examples_server.url,
        "--model",
        "smollm2",
        "--max-tokens",
        "12",
        "Say hello.",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    summary = json.loads(result.stderr.strip().splitlines()[-1])
    assert summary["finish_reason"] in ("stop", "length")
    assert 1 <= summary["usage"]["completion_tokens"] <= 12
    refused = run(
        sys.executable, str(EXAMPLES / "sse_client.py"), "--url", examples_server.url,
        "--model", "nope", "hi",
    )  # fmt: skip
    assert refused.returncode == 1 and "HTTP 404" in refused.stderr


def test_ws_client(examples_server: RunningServer) -> None:
    result = run(
        sys.executable,
        str(EXAMPLES / "ws_client.py"),
        "--url",
        examples_server.url,
        "--model",
        "smollm2",
        "--max-tokens",
        "12",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    done = {
        event["id"]: event
        for event in map(json.loads, (ln for ln in result.stdout.splitlines() if ln[:1] == "{"))
    }
    assert set(done) == {"colours", "animals", "story"}
    for chat_id in ("colours", "animals"):
        assert done[chat_id]["type"] == "done" and done[chat_id]["text"]
        assert done[chat_id]["usage"]["completion_tokens"] <= 12
    assert done["story"]["finish_reason"] == "cancelled"
    assert "[pong]" in result.stderr
    # the two chats streamed interleaved on one socket: pieces of both came before either ended
    pieces = [ln.split("]")[0][1:] for ln in result.stdout.splitlines() if ln.startswith("[")]
    assert {"colours", "animals"} <= set(pieces)
