"""Wiring the operations features into the application: request ids and access log, CORS,
auth, rate limits, ``/metrics``, and the graceful-shutdown hook.

Middleware order, outermost first: request id / access log, CORS preflight, (the error
middleware, which :mod:`llmis.app` places), Host / Origin checks, draining refusal, auth,
rate limit.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping

from aiohttp import web
from aiohttp.typedefs import Middleware

from llmis.config import Settings
from llmis.models.manager import ModelManager
from llmis.ops.access_log import echo_request_id, request_middleware
from llmis.ops.app_keys import OVERSIGHT
from llmis.ops.auth import KEYRING, KeyRing, auth_middleware
from llmis.ops.contentfilter import ContentFilter
from llmis.ops.cors import Cors
from llmis.ops.metrics import Metrics
from llmis.ops.origin import OriginPolicy
from llmis.ops.policy import Oversight
from llmis.ops.ratelimit import RateLimiter, ratelimit_middleware
from llmis.ops.shutdown import Shutdown

__all__ = ["Operations"]

logger = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Operations:
    """Builds the oversight objects for one app and hooks them into it."""

    def __init__(
        self, settings: Settings, manager: ModelManager, environ: Mapping[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.keys = KeyRing.from_settings(settings.auth, os.environ if environ is None else environ)
        self.cors = Cors(settings.cors)
        self.origins = OriginPolicy(settings.server, self.cors)
        metrics = Metrics(manager)
        self.oversight = Oversight(
            settings=settings,
            metrics=metrics,
            filter=ContentFilter(settings.filter),
            limiter=RateLimiter(settings.limits),
            shutdown=Shutdown(settings.server.shutdown_grace_seconds),
        )

    def outer_middlewares(self) -> list[Middleware]:
        """The middlewares that go before (outside) the error middleware."""
        return [request_middleware, self.cors.middleware]

    def inner_middlewares(self) -> list[Middleware]:
        """The middlewares that go after (inside) the error middleware."""
        metrics = self.oversight.metrics

        def limited(limit: str) -> None:
            metrics.rate_limited.labels(limit).inc()

        return [
            self.origins.middleware,
            self.oversight.shutdown.middleware,
            auth_middleware(self.keys, self.settings.auth.open_paths),
            ratelimit_middleware(self.oversight.limiter, limited),
        ]

    def setup(self, app: web.Application) -> None:
        app[OVERSIGHT] = self.oversight
        app[KEYRING] = self.keys
        app.router.add_get("/metrics", self.oversight.metrics.handler)
        app.on_response_prepare.append(echo_request_id)
        app.on_response_prepare.append(self.cors.on_prepare)
        app.on_shutdown.append(self.oversight.shutdown.drain)
        if not self.keys.enabled and not _is_loopback(self.settings.server.host):
            logger.warning(
                "serving on %s without API keys: anyone who can reach it can use it",
                self.settings.server.host,
            )
