"""``llmis models``: the local model table and JSON, and the "loaded" column from a server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import SMOLLM_RESOURCE, RunningServer, free_port, smollm_path
from tests.fake_hub import smollm_split

SPLIT_FIRST = "SmolLM2-135M-Instruct-Q4_1-00001-of-00002"
SMOLLM_PARAMETERS = 134_515_008  # SmolLM2-135M, as its GGUF metadata gives it


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-chat.gguf, a two-part split model, and a file that is not GGUF."""
    root = tmp_path_factory.mktemp("inventory")
    models = root / "models"
    models.mkdir()
    _link_or_copy(smollm_path(), models / "tiny-chat.gguf")
    for part in smollm_split(smollm_path(), tmp_path_factory.getbasetemp() / "smollm-split"):
        _link_or_copy(part, models / part.name)
    (models / "broken.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    return models


def _models(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmis", "models", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _config(models_dir: Path, port: int, *, source: str, missing: bool = True) -> str:
    missing_model = '[[models]]\nname = "missing"\npath = "nope.gguf"\n' if missing else ""
    return f"""
[server]
host = "127.0.0.1"
port = {port}
models_dir = "{models_dir}"
threads = 2

[[models]]
name = "bundled"
{source}
n_ctx = 512

{missing_model}"""


def test_models_without_a_server(models_dir: Path) -> None:
    config = models_dir.parent / "llmis.toml"
    port = free_port()  # nothing listens there
    config.write_text(_config(models_dir, port, source=f'resource = "{SMOLLM_RESOURCE}"'))

    result = _models(models_dir.parent, "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["server"] == {"url": f"http://127.0.0.1:{port}", "reachable": False}
    rows = {row["name"]: row for row in body["models"]}
    assert list(rows) == ["bundled", "missing", SPLIT_FIRST, "broken", "tiny-chat"]
    size = smollm_path().stat().st_size
    for name in ("bundled", "tiny-chat"):
        assert rows[name] | {"name": "", "path": "", "source": ""} == {
            "name": "",
            "path": "",
            "source": "",
            "file": "tiny-chat.gguf" if name == "tiny-chat" else smollm_path().name,
            "size_bytes": size,
            "parts": 1,
            "architecture": "llama",
            "parameters": SMOLLM_PARAMETERS,
            "quant": "Q4_1",
            "context_length": 8192,
            "has_chat_template": True,
            "state": None,
            "loaded": None,
            "error": None,
        }
    assert rows["bundled"]["source"] == "config"
    assert rows["tiny-chat"]["source"] == "models_dir"
    split = rows[SPLIT_FIRST]
    parts = sorted(models_dir.glob("SmolLM2-*-of-00002.gguf"))
    assert len(parts) == 2
    assert split["parts"] == 2
    assert split["size_bytes"] == sum(p.stat().st_size for p in parts)
    assert split["quant"] == "Q4_1" and split["architecture"] == "llama"
    assert "not found" in rows["missing"]["error"]
    assert "not a valid GGUF file" in rows["broken"]["error"]

    table = _models(models_dir.parent, "--config", str(config))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "NAME", "FILE", "SIZE", "ARCH", "PARAMS", "QUANT", "CTX", "CHAT", "LOADED"
    ]  # fmt: skip
    tiny = next(line for line in lines if line.startswith("tiny-chat "))
    assert tiny.split() == [
        "tiny-chat", "tiny-chat.gguf", "98.4", "MB", "llama", "134.5M", "Q4_1", "8192", "yes", "-"
    ]  # fmt: skip
    assert any(line.startswith(SPLIT_FIRST) and "(+1 parts)" in line for line in lines)
    assert any(line.startswith("broken: error: ") for line in lines)
    assert f"no llmis server answered at http://127.0.0.1:{port}" in table.stderr


def test_loaded_column_asks_the_running_server(
    tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    _link_or_copy(smollm_path(), models_dir / "tiny-chat.gguf")
    # "bundled" names tiny-chat.gguf too: one GGUF read per listing keeps this test short
    config_text = _config(models_dir, 8080, source='path = "tiny-chat.gguf"', missing=False)
    server = start_server(config_text)
    config = server.workdir / "llmis.toml"
    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    reply = client.chat.completions.create(
        model="bundled", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert reply.model == "bundled"  # loaded now, whatever the server loads at startup

    result = _models(server.workdir, "--config", str(config), "--url", server.url, "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["server"] == {"url": server.url, "reachable": True}
    rows = {row["name"]: row for row in body["models"]}
    assert rows["bundled"]["loaded"] is True and rows["bundled"]["state"] == "loaded"
    status, listing = server.get_json("/v1/models")
    assert status == 200 and isinstance(listing, dict)
    served: dict[str, Any] = {
        m["id"]: m["state"]
        for m in listing["data"]
        if not m.get("preset")  # not the presets
    }
    for name, row in rows.items():
        if name in served:  # the same answer the server gives
            assert row["state"] == served[name]
            assert row["loaded"] is (served[name] == "loaded")
        else:
            assert (row["state"], row["loaded"]) == ("not served", False)
    assert rows["tiny-chat"]["loaded"] is False  # never asked for

    table = _models(server.workdir, "--config", str(config), "--url", server.url)
    bundled = next(line for line in table.stdout.splitlines() if line.startswith("bundled "))
    assert bundled.split()[-1] == "yes"
    assert "no llmis server answered" not in table.stderr
