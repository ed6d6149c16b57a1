"""Logging: one JSON object per line (or a human format), each carrying its request id.

:func:`setup_logging` installs the formatter on the root logger. :func:`request_middleware`
gives every request an id (the client's ``X-Request-ID`` or a new one), echoes it in the
response header, makes it current for every log line written while the request is handled,
and writes one access-log line when the request ends.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import sys
from typing import Any, Literal, TextIO

from aiohttp import web
from aiohttp.typedefs import Handler

from llmis.ops.app_keys import OVERSIGHT
from llmis.ops.families import api_family
from llmis.ops.request_context import (
    REQUEST_CONTEXT,
    RequestContext,
    current_request,
    new_request_id,
    request_scope,
)

__all__ = [
    "REQUEST_ID_HEADER",
    "JsonFormatter",
    "RequestIdFilter",
    "TextFormatter",
    "echo_request_id",
    "finish_request",
    "request_middleware",
    "setup_logging",
]

REQUEST_ID_HEADER = "X-Request-ID"
_HANDLER_NAME = "llmis"
access_logger = logging.getLogger("llmis.access")

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "rid",
}


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id`` from the current request (``None`` outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            ctx = current_request()
            record.request_id = ctx.id if ctx is not None else None
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "request_id", ...extra fields}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        entry.update(_extras(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [request id]: message`` for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.rid = f" [{request_id}]" if request_id else ""
        return super().format(record)


def setup_logging(
    level: str,
    fmt: Literal["auto", "json", "text"] = "auto",
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) in the chosen format.

    Replaces the handler an earlier call installed; returns the new one.
    """
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


def _endpoint(request: web.Request) -> str:
    """The route pattern (bounded cardinality for metrics), not the raw path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "other"


def _access(ctx: RequestContext, status: int) -> None:
    fields: dict[str, Any] = {
        "method": ctx.method,
        "path": ctx.path,
        "status": status,
        "client": ctx.client,
        "duration_s": round(ctx.elapsed, 4),
    }
    if ctx.model is not None:
        fields.update(
            model=ctx.model,
            prompt_tokens=ctx.prompt_tokens,
            completion_tokens=ctx.completion_tokens,
            ttft_s=None if ctx.ttft is None else round(ctx.ttft, 4),
            finish_reason=ctx.finish_reason,
        )
    text = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("method", "path"))
    access_logger.info("%s %s %s", ctx.method, ctx.path, text, extra=fields)


def finish_request(ctx: RequestContext, endpoint: str, status: int) -> None:
    """Count a finished request in ``llmis:requests_total`` and write its access-log line
    (a WebSocket chat is one request of its own, on the socket's endpoint)."""
    oversight = ctx.oversight
    if oversight is None:
        return
    oversight.metrics.count_request(endpoint, ctx.model, status, api_family(ctx.path))
    if oversight.settings.logging.access_log:
        _access(ctx, status)


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: request id, current-request scope, access log, request counter."""
    oversight = request.app.get(OVERSIGHT)
    ctx = RequestContext(
        id=new_request_id(request.headers.get(REQUEST_ID_HEADER)),
        method=request.method,
        path=request.path,
        client=request.remote or "",
        oversight=oversight,
    )
    request[REQUEST_CONTEXT] = ctx
    status = 500
    with request_scope(ctx):
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away first (nginx's convention)
            raise
        finally:
            finish_request(ctx, _endpoint(request), status)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the id goes out on every response, streams included."""
    ctx = request.get(REQUEST_CONTEXT)
    if ctx is not None:
        response.headers[REQUEST_ID_HEADER] = ctx.id
