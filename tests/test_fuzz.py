"""Schemathesis over the served ``/openapi.json``, against a real server with the real SmolLM2.

Every operation gets a bounded number of generated requests, valid ones (positive mode) and
invalid ones (negative mode), after the schemathesis coverage phase's boundary values. A pass
is: no 5xx, every status and content type the document declares, the process still alive,
and afterwards ``/healthz`` is 200 and a real chat completion works.

The server caps ``max_tokens`` at 16 (``[limits]``), so a generated request never runs long;
a dictionary of the served model and index names lets half the generated requests reach the
models instead of stopping at a 404.

``LLMIS_FUZZ_EXAMPLES`` (default 60) sets the examples per operation and mode;
``LLMIS_FUZZ_SEED`` a seed (default fixed, so a red run reproduces). ``make fuzz`` runs this
file with many more examples and a random seed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from llmis.api.openapi import build_document
from tests.conftest import SMOLLM_RESOURCE, RunningServer, launch
from tests.test_embeddings import minilm_path

CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "minilm"
INDEX = "docs"
MAX_TOKENS = 16
EXAMPLES = int(os.environ.get("LLMIS_FUZZ_EXAMPLES", "60"))
SEED = int(os.environ.get("LLMIS_FUZZ_SEED", "20261123"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def fuzz_config(workdir: Path) -> str:
    return f"""
[server]
host = "127.0.0.1"
threads = 1  # many short requests: one thread never stalls on a busy sibling core
keepalive_seconds = 0.5
max_body_bytes = 65536
models_dir = "{workdir / "models"}"
indexes_dir = "{workdir / "indexes"}"

[limits]
max_tokens = {MAX_TOKENS}
max_prompt_tokens = 512

[[models]]
name = "{CHAT_MODEL}"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 1024
queue_size = 64

[[models]]
name = "{EMBED_MODEL}"
path = ".converted/{minilm_path().name}"
n_ctx = 512
embedding = true
"""


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The chat model, an embedding model and a three-row index to search."""
    workdir = tmp_path_factory.mktemp("fuzz")
    _link_or_copy(minilm_path(), workdir / "models" / ".converted" / minilm_path().name)
    (workdir / "llmis.toml").write_text(fuzz_config(workdir))
    rows = workdir / "rows.csv"
    rows.write_text("id,text\n1,Dogs are loyal.\n2,The sea is deep.\n3,Bread is baked.\n")
    built = subprocess.run(
        [
            *(sys.executable, "-m", "llmis", "index", str(rows), "--config", "llmis.toml"),
            *("--text-column", "text", "--out", INDEX, "--model", EMBED_MODEL, "--no-progress"),
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    server = launch(fuzz_config(workdir), workdir)
    yield server
    server.stop()


def fuzz_settings() -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "suppress-health-check": ["all"],
            "request-timeout": 120,
            "generation": {
                "mode": "all",
                "max-examples": EXAMPLES,
                "database": "none",  # nothing written into the work tree
            },
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": False},
            },
            "dictionaries": {
                "models": {"values": [CHAT_MODEL, EMBED_MODEL]},
                "indexes": {"values": [INDEX]},
                "max_tokens": {"values": [1, 2, 4, 8, MAX_TOKENS]},
                "one": {"values": [1]},
            },
            "parameters": {
                "body.model": {"dictionary": "models", "probability": 0.5},
                "body.name": {"dictionary": "models", "probability": 0.5},
                "body.to": {"dictionary": "models", "probability": 0.5},
                "body.alias": {"dictionary": "models", "probability": 0.5},
                "body.index": {"dictionary": "indexes", "probability": 0.5},
                "body.max_tokens": {"dictionary": "max_tokens", "probability": 0.7},
                "body.max_completion_tokens": {"dictionary": "max_tokens", "probability": 0.7},
                "body.n": {"dictionary": "one", "probability": 0.8},  # only n=1 is served
                "path.name": {"dictionary": "models", "probability": 0.5},
            },
        }
    )


# The document is built here, at collection, because schemathesis parametrizes the test per
# operation then; `test_fuzzed_document_is_the_served_one` proves it is what the server serves.
# (schemathesis' lazy `from_fixture` loader needs pytest's private `Node._nodeid`, which
# pytest 9.2 no longer has.)
DOCUMENT = build_document()
schema = schemathesis.openapi.from_dict(DOCUMENT, config=fuzz_settings())


def test_fuzzed_document_is_the_served_one(fuzz_server: RunningServer) -> None:
    status, served = fuzz_server.get_json("/openapi.json")
    assert status == 200
    assert served == json.loads(json.dumps(DOCUMENT))


@schema.parametrize()
def test_no_server_errors(case: schemathesis.Case, fuzz_server: RunningServer) -> None:
    try:
        case.call_and_validate(base_url=fuzz_server.url, checks=CHECKS, timeout=120)
    finally:
        assert fuzz_server.process.poll() is None, (
            f"the server died on {case.method} {case.path} {case.body!r}:\n"
            + fuzz_server.log()[-3000:]
        )


def test_server_healthy_after_fuzzing(fuzz_server: RunningServer) -> None:
    """Runs after the fuzz (file order): alive, ready, and a real completion works."""
    assert fuzz_server.process.poll() is None, fuzz_server.log()[-3000:]
    status, body = fuzz_server.get_json("/healthz")
    assert status == 200, body
    request = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 4,
        "seed": random.randrange(1000),
    }
    status, answer = fuzz_server.post_json("/v1/chat/completions", request)
    assert status == 200, answer
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    assert answer["usage"]["completion_tokens"] >= 1
    assert "unhandled error" not in fuzz_server.log()
