"""The access log and request ids: :func:`request_middleware` gives every request an id (the
client's ``X-Request-ID`` or a new one), echoes it in the response header, makes it current for
every log line written while the request is handled, and writes one access-log line (and counts
the request in ``llmis:requests_total``) when the request ends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from llmis.ops.app_keys import OVERSIGHT
from llmis.ops.families import api_family
from llmis.ops.request_context import (
    REQUEST_CONTEXT,
    RequestContext,
    new_request_id,
    request_scope,
)

__all__ = ["REQUEST_ID_HEADER", "echo_request_id", "finish_request", "request_middleware"]

REQUEST_ID_HEADER = "X-Request-ID"
access_logger = logging.getLogger("llmis.access")


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
