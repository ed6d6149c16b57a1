"""What the server knows about the request being handled, visible to everything it calls.

The request middleware of :mod:`llmis.ops.access_log` opens a :class:`RequestContext` per
request and sets it in a context variable, so that log lines, error bodies and the access log
all see the same request id and counters without passing them around. The serving layer does
not read it: a generation's policy (:class:`llmis.ops.policy.Guard`) is passed explicitly.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from llmis.ops.policy import Oversight

__all__ = [
    "REQUEST_CONTEXT",
    "RequestContext",
    "current_request",
    "name_model",
    "new_request_id",
    "request_scope",
]

_CURRENT: ContextVar[RequestContext | None] = ContextVar("llmis_request", default=None)
_VALID_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def new_request_id(offered: str | None = None) -> str:
    """``offered`` (a client's ``X-Request-ID``) when it is a sane token, else a fresh id."""
    if offered and _VALID_ID.match(offered):
        return offered
    return f"req-{uuid.uuid4().hex}"


@dataclass
class RequestContext:
    """One HTTP request (or one WebSocket connection): its id and what it generated."""

    id: str
    method: str = ""
    path: str = ""
    client: str = ""
    rate_key: str = ""
    started: float = field(default_factory=time.monotonic)
    oversight: Oversight | None = None
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: float | None = None
    finish_reason: str | None = None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def current_request() -> RequestContext | None:
    return _CURRENT.get()


def name_model(model: str, prompt_tokens: int = 0) -> None:
    """Name the model serving the current request (for the access log and the
    ``model_name`` label of ``llmis:requests_total``); no-op outside a request."""
    ctx = _CURRENT.get()
    if ctx is not None:
        ctx.model = model
        ctx.prompt_tokens += prompt_tokens


@contextlib.contextmanager
def request_scope(ctx: RequestContext) -> Iterator[RequestContext]:
    """Make ``ctx`` the current request inside the ``with`` block."""
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


REQUEST_CONTEXT = web.RequestKey("llmis_request", RequestContext)
