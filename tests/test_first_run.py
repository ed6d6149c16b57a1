"""A new user's first ten minutes: config-relative paths, finding the default config, clean
``--help``, the served context in ``/v1/models``, dropped-in models' default context, and one
access-log line (and one ``llmis:requests_total`` count) per WebSocket chat."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from llmis import cli
from llmis.config import load_settings
from llmis.models.budget import fitting_context, resolve_budget
from llmis.models.gguf import read_gguf_info
from tests.conftest import (
    OPS_USER_KEY,
    REPO,
    SMOLLM_RESOURCE,
    RunningServer,
    free_port,
    smollm_path,
)
from tests.ops_helpers import bearer, sample, scrape
from tests.test_logs import log_entries
from tests.test_search import search_server, workdir

__all__ = ["search_server", "workdir"]  # the indexed MiniLM server of tests/test_search.py

# ----- config-relative paths -----


def test_relative_paths_in_a_config_resolve_against_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    config = conf_dir / "llmis.toml"
    config.write_text('[server]\nmodels_dir = "m"\nindexes_dir = "../ix"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(Path("../conf/llmis.toml"))
    assert settings.server.models_dir == conf_dir.resolve() / "m"
    assert settings.server.indexes_dir == conf_dir.resolve() / "../ix"
    # a command-line override is the user's own path, relative to the current directory
    override = load_settings(config, models_dir=Path("mine"))
    assert override.server.models_dir == Path("mine")
    # absolute paths are kept; no file means the defaults, relative to the current directory
    config.write_text(f'[server]\nmodels_dir = "{tmp_path}"\n')
    assert load_settings(config).server.models_dir == tmp_path
    assert load_settings(None).server.models_dir == Path("models")


def test_the_repo_config_works_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(REPO / "config" / "llmis.toml")
    assert settings.server.models_dir.resolve() == REPO / "models"
    assert settings.server.indexes_dir.resolve() == REPO / "indexes"


@contextlib.contextmanager
def serve_from(cwd: Path, config: Path) -> Iterator[RunningServer]:
    """``llmis serve --config CONFIG`` with ``cwd`` as the current directory."""
    port = free_port()
    log_path = cwd / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llmis", "serve", "--config", str(config), "--port", str(port)],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = RunningServer(f"http://127.0.0.1:{port}", port, process, log_path, cwd)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, server.log()
            with contextlib.suppress(OSError, ValueError):
                if server.get_json("/healthz", timeout=2)[0] == 200:
                    break
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        yield server
    finally:
        server.stop()


def test_a_server_started_elsewhere_finds_its_dropped_in_model_and_sizes_its_context(
    tmp_path: Path,
) -> None:
    """The config's relative models_dir is found from another directory; the dropped-in file
    gets its trained context halved to fit the RAM budget, and the log and /v1/models say so."""
    conf_dir, cwd = tmp_path / "conf", tmp_path / "cwd"
    (conf_dir / "models").mkdir(parents=True)
    cwd.mkdir()
    os.link(smollm_path(), conf_dir / "models" / "dropped.gguf")
    budget = "200MB"
    config = conf_dir / "llmis.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
threads = 1
models_dir = "models"
ram_budget = "{budget}"

[[models]]
name = "configured"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 512
slots = 1
"""
    )
    info = read_gguf_info(smollm_path())
    expected, trained = fitting_context(info, 512, 4, resolve_budget(budget))
    assert trained == 8192 and 512 <= expected < trained  # the budget does cap it
    with serve_from(cwd, config) as server:
        status, body = server.get_json("/v1/models")
        assert status == 200
        models = {m["id"]: m for m in body["data"]}  # type: ignore[index]
        assert (models["configured"]["context_length"], models["configured"]["n_ctx_train"]) == (
            512,
            8192,
        )
        dropped = models["dropped"]
        assert dropped["state"] == "available"
        assert (dropped["context_length"], dropped["n_ctx_train"]) == (expected, 8192)

        # a prompt over the served context is refused with the served number in the message
        request = {
            "model": "dropped",
            "messages": [{"role": "user", "content": "word " * (expected + 10)}],
            "max_tokens": 1,
        }
        status, error = server.post_json("/v1/chat/completions", request)
        assert status == 400, error
        assert f"maximum context length is {expected} tokens" in error["error"]["message"]
        status, body = server.get_json("/v1/models/dropped")
        assert status == 200 and body["state"] == "loaded"  # type: ignore[index]
        assert body["context_length"] == expected  # type: ignore[index]
        lines = [
            e["message"] for e in log_entries(server) if e.get("logger") == "llmis.models.loading"
        ]
        said = [m for m in lines if m.startswith("model dropped (dropped in the models dir)")]
        assert said and f"gets n_ctx {expected}" in said[0], lines
        assert "halved to fit the RAM budget" in said[0]


# ----- finding the default config -----


def test_without_config_the_checkout_config_is_found_and_named(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llmis", "models", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"llmis: using the config {REPO / 'config' / 'llmis.toml'}" in done.stderr, done.stderr


def test_without_any_config_it_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = [tmp_path / "config" / "llmis.toml", tmp_path / "checkout" / "llmis.toml"]
    monkeypatch.setattr(cli, "default_config_candidates", lambda: missing)
    monkeypatch.setattr(cli, "find_default_config", lambda: None)
    assert cli._config_path(argparse.Namespace(config=None)) is None
    err = capsys.readouterr().err
    assert "no config file given and none found at" in err
    assert str(missing[0]) in err and str(missing[1]) in err and "--config" in err


# ----- --help -----


def help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_is_clean_for_the_command_and_every_subcommand(
    capsys: pytest.CaptureFixture[str],
) -> None:
    top = help_text(["--help"], capsys)
    assert "argument parsing only" not in top and "``" not in top
    for command in ("serve", "pull", "models", "index"):
        assert f"    {command} " in top, top
        text = help_text([command, "--help"], capsys)
        usage, _, rest = text.partition("\n\n")
        description = rest.split("\n\n")[0]
        assert usage.startswith(f"usage: llmis {command}")
        assert description and not description.startswith(("options:", "positional")), text
        assert "``" not in text and "--config" in text


# ----- one access-log line and one request count per WebSocket chat -----


async def test_each_websocket_chat_gets_an_access_line_and_a_count(
    ops_server: RunningServer,
) -> None:
    labels = {"api": "openai", "endpoint": "/v1/ws", "model_name": "smollm2", "status": "200"}
    before = sample(await scrape(ops_server, OPS_USER_KEY), "llmis:requests_total", **labels)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{ops_server.url}/v1/ws", headers=bearer(OPS_USER_KEY)) as ws,
    ):
        for id_ in ("a", "b"):
            await ws.send_json(
                {
                    "type": "chat",
                    "id": id_,
                    "model": "smollm2",
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 3,
                }
            )
            while True:
                event = await ws.receive_json(timeout=120)
                if event["type"] in ("done", "error"):
                    break
            assert event["type"] == "done", event
    after = sample(await scrape(ops_server, OPS_USER_KEY), "llmis:requests_total", **labels)
    assert after - before == 2
    deadline = time.monotonic() + 10
    while True:
        chats = [
            e
            for e in log_entries(ops_server)
            if e.get("logger") == "llmis.access" and e.get("method") == "WS"
        ]
        if len(chats) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    last = chats[-2:]
    assert [e["path"] for e in last] == ["/v1/ws", "/v1/ws"]
    assert all(e["status"] == 200 and e["model"] == "smollm2" for e in last)
    assert all(e["completion_tokens"] == 3 and e["finish_reason"] == "length" for e in last)
    assert last[0]["request_id"] != last[1]["request_id"]


# ----- model_name on the embeddings and search routes -----


def test_embeddings_and_search_requests_carry_their_model_name(
    search_server: RunningServer,
) -> None:
    def count(endpoint: str) -> float:
        with urllib.request.urlopen(search_server.url + "/metrics", timeout=30) as resp:
            raw = resp.read().decode()
        for line in raw.splitlines():
            wanted = (f'endpoint="{endpoint}"', 'model_name="minilm"', 'status="200"')
            if line.startswith("llmis:requests_total{") and all(w in line for w in wanted):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = (count("/v1/embeddings"), count("/v1/search"))
    assert search_server.post_json("/v1/embeddings", {"model": "minilm", "input": "x"})[0] == 200
    status, _ = search_server.post_json("/v1/search", {"index": "topics", "query": "bread"})
    assert status == 200
    assert (count("/v1/embeddings"), count("/v1/search")) == (before[0] + 1, before[1] + 1)


# ----- a browser's API key on the WebSocket: a subprotocol, never the URL -----


async def test_websocket_key_as_a_subprotocol(ops_server: RunningServer) -> None:
    import base64

    def offer(key: str) -> tuple[str, str]:
        encoded = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
        return ("llmis.v1", f"llmis.bearer.{encoded}")

    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(
            f"{ops_server.url}/v1/ws", protocols=offer(OPS_USER_KEY)
        ) as ws:
            assert ws.protocol == "llmis.v1"  # the browser requires one offered protocol back
            await ws.send_json({"type": "ping", "id": 1})
            assert (await ws.receive_json(timeout=30))["type"] == "pong"
        for protocols in (offer("wrong-key"), ("llmis.v1",), ("llmis.bearer.!!",)):
            with pytest.raises(aiohttp.WSServerHandshakeError) as failed:
                await session.ws_connect(f"{ops_server.url}/v1/ws", protocols=protocols)
            assert failed.value.status == 401
        # the page and its assets are open (they hold no data); the API is not
        async with session.get(f"{ops_server.url}/") as page:
            assert page.status == 200
            assert 'data-auth-required="true"' in await page.text()
            assert "<option" not in await page.text()
        async with session.get(f"{ops_server.url}/static/chat.js") as asset:
            assert asset.status == 200
        async with session.get(f"{ops_server.url}/v1/models") as models:
            assert models.status == 401
