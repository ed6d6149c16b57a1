"""``llmis chat``: through a pty (pexpect, as a person types) and through pipes, against a
real server on the bundled SmolLM2, and in-process when no server answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SMOLLM_RESOURCE, RunningServer, free_port

LLMIS = [sys.executable, "-m", "llmis", "chat"]
# pexpect does not answer prompt-toolkit's cursor position request (a terminal does)
NO_CPR = {"PROMPT_TOOLKIT_NO_CPR": "1"}
# prompt-toolkit turns bracketed paste on when it starts reading a line, off when it has one
READY, ACCEPTED = "\x1b[?2004h", "\x1b[?2004l"


def metric(server: RunningServer, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def prompt_tokens(server: RunningServer, model: str = "smollm2") -> float:
    return metric(server, "vllm:prompt_tokens_total", model_name=model)


def run_piped(text: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LLMIS, *args],
        input=text,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


# ---- pipes -------------------------------------------------------------------------------------


def test_piped_stdin_gives_one_answer_on_stdout(server: RunningServer) -> None:
    before = metric(server, "vllm:generation_tokens_total", model_name="smollm2")
    result = run_piped("Say hello.", "smollm2", "--url", server.url, "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and result.stdout.endswith("\n")
    assert result.stderr == ""
    # the answer came from that server, and had at most 8 tokens
    generated = metric(server, "vllm:generation_tokens_total", model_name="smollm2") - before
    assert 1 <= generated <= 8


def test_piped_errors_go_to_stderr(server: RunningServer) -> None:
    result = run_piped("hi", "no-such-model", "--url", server.url)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "no-such-model" in result.stderr and "Traceback" not in result.stderr
    empty = run_piped("", "smollm2", "--url", server.url)
    assert empty.returncode == 1 and "stdin" in empty.stderr


def test_piped_without_a_server_runs_the_model_in_process(tmp_path: Path) -> None:
    config = tmp_path / "llmis.toml"
    config.write_text(
        f'[server]\nthreads = 2\n\n[[models]]\nname = "local-smol"\n'
        f'resource = "{SMOLLM_RESOURCE}"\nn_ctx = 512\nslots = 1\n'
    )
    nobody = f"http://127.0.0.1:{free_port()}"
    result = run_piped("Say hello.", "--url", nobody, "--config", str(config), "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


# ---- a terminal --------------------------------------------------------------------------------


@pytest.fixture
def terminal(server: RunningServer) -> Iterator[pexpect.spawn]:
    child = pexpect.spawn(
        sys.executable,
        [*LLMIS[1:], "smollm2", "--url", server.url, "--max-tokens", "12", "--temperature", "0"],
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "xterm", **NO_CPR},
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 200),
    )
    child.expect("llmis chat with smollm2")
    child.expect_exact(READY)
    yield child
    child.close(force=True)


def say(child: pexpect.spawn, text: str) -> str:
    """Type a line and return what came back before the next prompt."""
    child.sendline(text)
    return reply(child)


def reply(child: pexpect.spawn) -> str:
    child.expect_exact(ACCEPTED)
    child.expect_exact(READY)
    return str(child.before)


def test_terminal_history_clear_system_and_model(
    terminal: pexpect.spawn, server: RunningServer
) -> None:
    start = prompt_tokens(server)
    say(terminal, "Name a colour.")
    first = prompt_tokens(server) - start
    assert first > 0
    mark = prompt_tokens(server)
    say(terminal, "Name a colour.")
    second = prompt_tokens(server) - mark
    assert second > first  # the first turn and its answer went along: history
    assert "conversation cleared" in say(terminal, "/clear")
    mark = prompt_tokens(server)
    say(terminal, "Name a colour.")
    assert prompt_tokens(server) - mark == first  # forgotten
    # longer than the default system prompt SmolLM2's template puts in when there is none
    system = "You are a painter who loves the colour blue above all other colours. " * 4
    assert "system prompt set" in say(terminal, f"/system {system}")
    say(terminal, "/clear")
    mark = prompt_tokens(server)
    say(terminal, "Name a colour.")
    assert prompt_tokens(server) - mark > first  # the system prompt went along
    # /model: unknown names are refused, known ones take the next turn
    assert "error" in say(terminal, "/model nope-model") and terminal.isalive()
    assert "now talking to smollm2-q1" in say(terminal, "/model smollm2-q1")
    before = prompt_tokens(server, "smollm2-q1")
    say(terminal, "Hi")
    assert prompt_tokens(server, "smollm2-q1") > before


def test_terminal_multiline(terminal: pexpect.spawn, server: RunningServer) -> None:
    mark = prompt_tokens(server)
    say(terminal, "Name a colour.")
    one_line = prompt_tokens(server) - mark
    say(terminal, "/clear")
    say(terminal, '"""')
    say(terminal, "Name a colour.")
    say(terminal, "Then name an animal, please.")
    mark = prompt_tokens(server)
    answer = say(terminal, '"""')
    assert answer.strip()
    assert prompt_tokens(server) - mark > one_line  # both lines went, as one message
    # Esc then Enter inserts a newline instead of sending
    say(terminal, "/clear")
    mark = prompt_tokens(server)
    terminal.send("Name a colour.\x1b\r")
    terminal.send("Then name an animal, please.\r")
    reply(terminal)
    assert prompt_tokens(server) - mark > one_line


def test_terminal_ctrl_c_stops_the_answer_not_the_program(server: RunningServer) -> None:
    child = pexpect.spawn(
        sys.executable,
        [*LLMIS[1:], "smollm2", "--url", server.url, "--max-tokens", "1500", "--temperature", "0"],
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "xterm", **NO_CPR},
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 200),
    )
    try:
        child.expect_exact(READY)
        cancelled = metric(server, "llmis:request_cancellations_total", reason="client")
        child.sendline("Count from one to one thousand, one number per line.")
        deadline = time.monotonic() + 120
        while metric(server, "vllm:num_requests_running", model_name="smollm2") < 1:
            assert time.monotonic() < deadline, "the answer never started"
            time.sleep(0.05)
        child.sendintr()
        child.expect_exact("(stopped)")
        child.expect_exact(READY)
        assert child.isalive()
        # the server cancelled the generation (the connection closed)
        deadline = time.monotonic() + 30
        while metric(server, "llmis:request_cancellations_total", reason="client") <= cancelled:
            assert time.monotonic() < deadline, "the server kept generating"
            time.sleep(0.1)
        # Ctrl-C at the prompt clears the line; the program goes on
        child.sendintr()
        child.sendline("/help")
        child.expect_exact("/clear")
        child.expect_exact(READY)
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        child.close(force=True)
