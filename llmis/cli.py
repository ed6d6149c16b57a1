"""The ``llmis`` command line: ``serve``, ``pull``, ``models``, ``index`` and ``chat``."""

from __future__ import annotations

import argparse
import asyncio
import errno
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from aiohttp import web

from llmis import __version__, chat_cli
from llmis.config import (
    ConfigError,
    Settings,
    default_config_candidates,
    find_default_config,
    load_settings,
)
from llmis.hub import local_models, pull
from llmis.index import build as index_build
from llmis.ops.logs import setup_logging

__all__ = ["main"]

_BIND_ERRORS = {
    errno.EADDRINUSE: "the address is already in use (is another server running on that port?)",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "this machine has no such address",
}


DESCRIPTION = """\
llmis: a local LLM inference server (GGUF models on llama.cpp) with OpenAI-compatible HTTP,
WebSocket and chat-page front ends.

Without --config, every command reads config/llmis.toml from the current directory, or else
the one next to the llmis checkout; with neither it says so and uses the defaults."""

_COMMANDS = {
    "serve": (
        "run the server (OpenAI API, WebSocket, chat page at /)",
        "Serve the config's models over the OpenAI-compatible API, /v1/ws and the chat page.",
    ),
    "pull": (
        "download or copy a GGUF model into the models dir",
        "Bring a GGUF model (hub repo, local file or package resource) into the models dir, "
        "where llmis serve finds it under its file stem.",
    ),
    "models": (
        "list the local models",
        "List the config's models and the models dir's GGUF files with their metadata, and "
        "whether a running server has them loaded.",
    ),
    "index": (
        "embed a CSV table into a search index",
        "Embed one column of a CSV table with an embedding model of the config and write the "
        "index that POST /v1/search and the 'answer' preset read.",
    ),
    "chat": (
        "chat with a model in the terminal",
        "Chat with a model in the terminal: against a running server (--url), or in-process "
        "when none answers. Piped stdin gives one answer on stdout.",
    ),
}


def _config_path(args: argparse.Namespace) -> Path | None:
    path: Path | None = args.config
    if path is not None:
        return path
    found = find_default_config()
    if found is None:
        looked = " or ".join(str(p) for p in default_config_candidates())
        print(
            f"llmis: no config file given and none found at {looked}; using the defaults "
            "(models from ./models). Pass --config FILE to use one.",
            file=sys.stderr,
        )
    elif getattr(args, "command", None) != "chat":  # `echo hi | llmis chat` stays clean
        print(f"llmis: using the config {found}", file=sys.stderr)
    return found


def _settings(args: argparse.Namespace) -> Settings:
    path = _config_path(args)
    return load_settings(
        path,
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        models_dir=getattr(args, "models_dir", None),
    )


def _with_settings(run: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """Run a tool command with ``args.settings`` loaded as ``serve`` loads them."""

    def call(args: argparse.Namespace) -> int:
        args.settings = _settings(args)
        return run(args)

    return call


def _add_tool(commands: Any, name: str, tool: ModuleType, config_help: str) -> None:
    help_, description = _COMMANDS[name]
    sub = commands.add_parser(name, help=help_, description=description)
    sub.add_argument("--config", type=Path, help=config_help)
    sub.add_argument(
        "--models-dir", type=Path, help="the models dir (overrides [server] models_dir)"
    )
    tool.add_arguments(sub)
    sub.set_defaults(func=_with_settings(tool.run))


def _event_loop(kind: str) -> asyncio.AbstractEventLoop | None:
    """uvloop's loop when asked for (or, for "auto", when installed); None: asyncio's own."""
    if kind == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise ConfigError("server.event_loop = 'uvloop' but uvloop is not installed") from None
        return None
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


def _serve(args: argparse.Namespace) -> int:
    from llmis.app import create_app
    from llmis.ops.app_keys import OVERSIGHT

    settings = _settings(args)
    setup_logging(settings.server.log_level, args.log_format or settings.logging.format)
    if not settings.models:
        print("llmis: warning: the config names no models", file=sys.stderr)
    host, port = settings.server.host, settings.server.port
    app = create_app(settings)
    try:
        web.run_app(
            app,
            loop=_event_loop(settings.server.event_loop),
            host=host,
            port=port,
            handler_cancellation=True,
            print=lambda _: print(
                f"llmis {__version__} serving on http://{host}:{port}", flush=True
            ),
            access_log=None,  # llmis.ops.access_log writes it, with request ids and tokens
            shutdown_timeout=5.0,  # after the grace period that on_shutdown has already waited
        )
    except OSError as exc:
        if exc.errno not in _BIND_ERRORS:
            raise
        reason = _BIND_ERRORS[exc.errno]
        print(f"llmis: cannot listen on {host}:{port}: {reason}", file=sys.stderr)
        return 2
    return app[OVERSIGHT].shutdown.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmis", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"llmis {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    default = "config/llmis.toml, here or next to the checkout"
    help_, description = _COMMANDS["serve"]
    serve = commands.add_parser("serve", help=help_, description=description)
    serve.add_argument("--config", type=Path, help=f"TOML config (default: {default})")
    serve.add_argument("--host", help="address to bind (overrides the config)")
    serve.add_argument("--port", type=int, help="port to bind (overrides the config)")
    serve.add_argument("--models-dir", type=Path, help="the models dir (overrides the config)")
    serve.add_argument(
        "--log-format",
        choices=["auto", "json", "text"],
        help="log lines as JSON or text (overrides [logging] format; auto = text on a terminal)",
    )
    serve.set_defaults(func=_serve)
    config_help = f"TOML config whose [server] settings are used (default: {default})"
    _add_tool(commands, "pull", pull, config_help)
    _add_tool(commands, "models", local_models, config_help)
    _add_tool(commands, "index", index_build, config_help)
    _add_tool(commands, "chat", chat_cli, config_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"llmis: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
