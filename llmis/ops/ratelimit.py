"""Token-bucket rate limits per API key, or per client IP when no keys are configured.

Two buckets per client, each holding ``limit`` units and refilling continuously at
``limit / window`` per second: one for requests (a request takes one unit on admission) and
one for generated tokens (a request is admitted while the bucket is positive, and the
tokens it generated are taken when it ends, so one long answer can take it below zero and
delay the next request). Over a limit: 429 ``rate_limit_exceeded`` with ``Retry-After``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from llmis.config import LimitSettings
from llmis.errors import APIError
from llmis.ops.auth import KEY_ID
from llmis.ops.request_context import REQUEST_CONTEXT

__all__ = ["RateLimitError", "RateLimiter", "TokenBucket", "ratelimit_middleware"]

# Past this many clients, buckets that have refilled completely are forgotten.
_PRUNE_AT = 10_000


class RateLimitError(APIError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, limit: str, amount: int, window: float, retry_after: float) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(
            f"Rate limit reached: {amount} {limit} per {window:g}s for this client; "
            f"retry after {seconds}s.",
            headers={"Retry-After": str(seconds)},
        )
        self.limit = limit


@dataclass
class TokenBucket:
    capacity: float
    rate: float  # units per second
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, need: float) -> float:
        """Seconds until ``level`` reaches ``need`` (0 when it already has)."""
        return max(0.0, (need - self.level) / self.rate)

    @property
    def full(self) -> bool:
        return self.level >= self.capacity


class RateLimiter:
    def __init__(self, settings: LimitSettings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self.settings.rate_requests is not None or self.settings.rate_tokens is not None

    def _bucket(self, table: dict[str, TokenBucket], client: str, limit: int) -> TokenBucket:
        now = self.clock()
        bucket = table.get(client)
        if bucket is None:
            if len(table) >= _PRUNE_AT:
                _forget_full(table, now)
            window = self.settings.rate_window_seconds
            bucket = table[client] = TokenBucket(limit, limit / window, limit, now)
        bucket.refill(now)
        return bucket

    def admit(self, client: str) -> None:
        """Take one request from ``client``'s allowance, or raise :class:`RateLimitError`."""
        window = self.settings.rate_window_seconds
        requests: TokenBucket | None = None
        if self.settings.rate_requests is not None:
            requests = self._bucket(self._requests, client, self.settings.rate_requests)
            if requests.level < 1:
                raise RateLimitError(
                    "requests", self.settings.rate_requests, window, requests.wait_for(1)
                )
        if self.settings.rate_tokens is not None:
            tokens = self._bucket(self._tokens, client, self.settings.rate_tokens)
            if tokens.level <= 0:
                raise RateLimitError(
                    "tokens", self.settings.rate_tokens, window, tokens.wait_for(1e-9)
                )
        if requests is not None:
            requests.level -= 1

    def spend_tokens(self, client: str, count: int) -> None:
        """Take ``count`` generated tokens from ``client``'s allowance (may go negative)."""
        if self.settings.rate_tokens is not None and count > 0:
            self._bucket(self._tokens, client, self.settings.rate_tokens).level -= count


def _forget_full(table: dict[str, TokenBucket], now: float) -> None:
    for key, bucket in list(table.items()):
        bucket.refill(now)
        if bucket.full:
            del table[key]


def ratelimit_middleware(
    limiter: RateLimiter,
    on_limited: Callable[[str], None],
    prefix: str | tuple[str, ...] = ("/v1/", "/api/"),
    paths: frozenset[str] = frozenset({"/infer", "/load"}),
) -> Middleware:
    """Admit each request under ``prefix`` (OpenAI, Anthropic, Ollama routes) or to one of
    ``paths`` (the simple routes) against its client's buckets (key id, else IP)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        limited = request.path.startswith(prefix) or request.path in paths
        if not limiter.enabled or not limited:
            return await handler(request)
        client = request.get(KEY_ID) or f"ip:{request.remote}"
        ctx = request.get(REQUEST_CONTEXT)
        if ctx is not None:
            ctx.rate_key = client
        try:
            limiter.admit(client)
        except RateLimitError as exc:
            on_limited(exc.limit)
            raise
        return await handler(request)

    return middleware
