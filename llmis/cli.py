"""``llmis serve | pull | models``: argument parsing only."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from llmis import __version__
from llmis.config import DEFAULT_CONFIG, ConfigError, Settings, load_settings

__all__ = ["main"]


def _settings(args: argparse.Namespace) -> Settings:
    path: Path | None = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    return load_settings(path, host=args.host, port=args.port)


def _serve(args: argparse.Namespace) -> int:
    from llmis.app import create_app

    settings = _settings(args)
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not settings.models:
        print("llmis: warning: the config names no models", file=sys.stderr)
    host, port = settings.server.host, settings.server.port
    web.run_app(
        create_app(settings),
        host=host,
        port=port,
        handler_cancellation=True,
        print=lambda _: print(f"llmis {__version__} serving on http://{host}:{port}", flush=True),
        access_log=logging.getLogger("llmis.access"),
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmis", description=__doc__)
    parser.add_argument("--version", action="version", version=f"llmis {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the OpenAI-compatible server")
    serve.add_argument("--config", type=Path, help=f"TOML config (default: {DEFAULT_CONFIG})")
    serve.add_argument("--host", help="address to bind (overrides the config)")
    serve.add_argument("--port", type=int, help="port to bind (overrides the config)")
    serve.set_defaults(func=_serve)
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
