"""``llmis chat [MODEL]``: chat with a model in the terminal, or answer piped stdin once.

Talks to a running server (``--url``, default http://127.0.0.1:8080) with
``POST /v1/chat/completions`` and SSE streaming; when none answers there, starts llmis inside
this process on a free loopback port with only the model asked for, and talks to that.

Interactive (stdin is a terminal): prompt-toolkit reads the input (history with the arrow
keys, Esc then Enter or a ``\"\"\"`` block for several lines); the answer streams as it comes;
Ctrl-C stops the answer (the server cancels the generation) and keeps the program; Ctrl-D or
``/bye`` leaves. Commands: ``/clear``, ``/model NAME``, ``/system TEXT``, ``/help``.

Piped (``echo hi | llmis chat``): stdin is the user message, the answer goes to stdout, errors
to stderr with exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp
from aiohttp import web

from llmis.config import Settings

__all__ = ["ChatError", "ChatSession", "add_arguments", "run"]

DEFAULT_URL = "http://127.0.0.1:8080"
HELP = """commands:
  /clear         forget the conversation (the system prompt stays)
  /model NAME    talk to another model
  /system TEXT   set the system prompt (/system alone removes it)
  /help          this text
  /bye           leave (or Ctrl-D)
Esc then Enter, or a \"\"\" line, starts a multi-line message (a closing \"\"\" sends it).
Ctrl-C stops an answer."""


class ChatError(Exception):
    """The server refused a request or could not be reached; the message says why."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="the model to talk to (default: the first one)")
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
        help=f"a running llmis server (default {DEFAULT_URL}); when none answers, the "
        "model runs in this process",
    )
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-tokens", type=int, default=None, help="answer length cap")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LLMIS_API_KEY"),
        help="Bearer key for a server with [auth] keys (default: $LLMIS_API_KEY)",
    )


@dataclass
class ChatSession:
    """One conversation against one server: the messages so far and the chosen model."""

    http: aiohttp.ClientSession
    url: str
    model: str
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def _conversation(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    async def models(self) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.url}/v1/models") as resp:
            await _raise_for_error(resp)
            body = await resp.json()
        return list(body["data"])

    async def use_model(self, name: str) -> None:
        async with self.http.get(f"{self.url}/v1/models/{name}") as resp:
            await _raise_for_error(resp)
        self.model = name

    async def ask(self, text: str, write: Callable[[str], None]) -> str:
        """Send ``text`` as the next user message and stream the answer through ``write``.

        The answer (or as much as arrived before a cancellation) joins the history.
        """
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            async for piece in self._stream():
                pieces.append(piece)
                write(piece)
        finally:
            # finished, refused, cut off or stopped: keep what the user saw, drop the rest
            answer = "".join(pieces)
            if pieces:
                self.messages.append({"role": "assistant", "content": answer})
            else:
                self.messages.pop()
        return answer

    async def _stream(self) -> AsyncIterator[str]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self._conversation(),
            "stream": True,
        }
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            body["temperature"] = self.temperature
        async with self.http.post(f"{self.url}/v1/chat/completions", json=body) as resp:
            await _raise_for_error(resp)
            async for raw in resp.content:
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line.startswith("data:"):
                    continue  # blank separators and ": ping" comments
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ChatError(_error_text(chunk))
                for choice in chunk.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        yield piece


def _error_text(body: object) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return json.dumps(body)


async def _raise_for_error(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    try:
        body: object = await resp.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        body = {"error": {"message": f"HTTP {resp.status}"}}
    raise ChatError(_error_text(body))


async def _server_answers(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(f"{url}/healthz", timeout=aiohttp.ClientTimeout(total=3)):
            return True
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return False


@contextlib.asynccontextmanager
async def _local_server(settings: Settings, model: str | None) -> AsyncIterator[str]:
    """llmis in this process on a free loopback port, loading only ``model`` (or the first
    configured chat model); yields its URL once its startup load is done."""
    from llmis.app import create_app

    # a model not in the config may still be a file in models_dir: loaded on first use
    chosen = [m for m in settings.models if m.name == model]
    if model is None:
        chosen = [m for m in settings.models if not m.embedding][:1]
    settings = settings.model_copy(update={"models": tuple(chosen)})
    logging.getLogger().setLevel(logging.WARNING)
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()
        sock.close()


async def _wait_ready(http: aiohttp.ClientSession, url: str) -> None:
    while True:
        async with http.get(f"{url}/healthz") as resp:
            if resp.status == 200:
                return
            body = await resp.json(content_type=None)
            if body.get("status") != "loading":
                raise ChatError(f"the model failed to load: {_error_text(body)}")
        await asyncio.sleep(0.2)


async def _pick_model(session: ChatSession) -> str:
    models = await session.models()
    if not models:
        raise ChatError("the server has no models")

    def rank(m: dict[str, Any]) -> tuple[bool, bool]:
        return (m.get("state") != "loaded", m.get("has_chat_template") is False)

    return str(sorted(models, key=rank)[0]["id"])


async def _stop_on_ctrl_c(work: Awaitable[str]) -> str | None:
    """Run ``work``; Ctrl-C (SIGINT) cancels it and returns None instead of ending the program."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, task.cancel)
    try:
        await asyncio.wait({task})
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    if task.cancelled():
        return None
    return task.result()


async def _one_shot(session: ChatSession, text: str, out: TextIO) -> int:
    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    await session.ask(text, write)
    out.write("\n")
    out.flush()
    return 0


async def _interactive(session: ChatSession, out: TextIO) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    prompt: PromptSession[str] = PromptSession(history=InMemoryHistory(), key_bindings=bindings)
    out.write(f"llmis chat with {session.model} (/help for commands, Ctrl-D to leave)\n")
    out.flush()

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    while True:
        try:
            text = await prompt.prompt_async(">>> ")
        except KeyboardInterrupt:
            continue  # Ctrl-C at the prompt clears the line
        except EOFError:
            return 0
        if text.strip() == '"""':
            lines: list[str] = []
            try:
                while (line := await prompt.prompt_async("... ")).strip() != '"""':
                    lines.append(line)
            except KeyboardInterrupt:
                continue
            except EOFError:
                return 0
            text = "\n".join(lines)
        if not text.strip():
            continue
        if text.startswith("/"):
            name, _, rest = text.partition(" ")
            if name in ("/bye", "/exit", "/quit"):
                return 0
            try:
                out.write(await _command(session, name, rest.strip()) + "\n")
            except ChatError as exc:
                out.write(f"error: {exc}\n")
            out.flush()
            continue
        try:
            answer = await _stop_on_ctrl_c(session.ask(text, write))
        except ChatError as exc:
            out.write(f"error: {exc}\n")
        except aiohttp.ClientError as exc:
            out.write(f"error: the server did not answer ({type(exc).__name__})\n")
        else:
            out.write("\n" if answer is not None else "\n^C (stopped)\n")
        out.flush()


async def _command(session: ChatSession, name: str, arg: str) -> str:
    if name == "/clear":
        session.messages.clear()
        return "conversation cleared"
    if name == "/model":
        if not arg:
            return f"model: {session.model}"
        await session.use_model(arg)
        return f"now talking to {arg}"
    if name == "/system":
        session.system = arg or None
        return "system prompt set" if arg else "system prompt removed"
    if name == "/help":
        return HELP
    return f"unknown command {name} (/help lists them)"


async def _main(args: argparse.Namespace, stdin: TextIO, out: TextIO) -> int:
    interactive = stdin.isatty()
    piped_text = "" if interactive else stdin.read()
    if not interactive and not piped_text.strip():
        print("llmis chat: nothing on stdin to answer", file=sys.stderr)
        return 1
    url = str(args.url).rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with (
        aiohttp.ClientSession(headers=headers, timeout=timeout) as http,
        contextlib.AsyncExitStack() as stack,
    ):
        if not await _server_answers(http, url):
            if interactive:
                print(f"no server at {url}: running the model here", file=sys.stderr)
            url = await stack.enter_async_context(_local_server(args.settings, args.model))
            await _wait_ready(http, url)
        session = ChatSession(
            http,
            url,
            model=args.model or "",
            system=args.system,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
        )
        if args.model:
            await session.use_model(args.model)
        else:
            session.model = await _pick_model(session)
        if interactive:
            return await _interactive(session, out)
        return await _one_shot(session, piped_text.strip(), out)


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_main(args, sys.stdin, sys.stdout))
    except ChatError as exc:
        print(f"llmis chat: {exc}", file=sys.stderr)
        return 1
    except aiohttp.ClientError as exc:
        print(f"llmis chat: the server did not answer ({type(exc).__name__})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
