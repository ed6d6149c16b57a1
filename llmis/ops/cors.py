"""CORS for browsers on other origins, configured in ``[cors]``; off when no origin is listed.

A small middleware rather than ``aiohttp-cors``: that library needs every route registered
with it one by one (routes here come from several modules) and answers a ``"*"`` origin with
credentials by echoing any origin, which this server refuses to do. Preflight requests
(``OPTIONS`` with ``Access-Control-Request-Method``) are answered here; every other
response, streams included, gets its headers in ``on_response_prepare``. ``"*"`` is sent
as ``*`` and is never combined with credentials (the config refuses that pairing).
"""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from llmis.config import CorsSettings
from llmis.ops.auth import PermissionDeniedError
from llmis.ops.families import api_family, error_for

__all__ = ["Cors"]

_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"


class Cors:
    def __init__(self, settings: CorsSettings) -> None:
        self.settings = settings
        self.any_origin = "*" in settings.allow_origins
        self.origins = frozenset(o.rstrip("/") for o in settings.allow_origins if o != "*")

    @property
    def enabled(self) -> bool:
        return bool(self.settings.allow_origins)

    def allows(self, origin: str) -> bool:
        """True if ``[cors] allow_origins`` lets ``origin`` call the API from a browser."""
        return self._allow_origin(origin) is not None

    def _allow_origin(self, origin: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for ``origin``, or None if not allowed."""
        if not origin:
            return None
        if origin.rstrip("/") in self.origins:
            return origin
        return "*" if self.any_origin else None

    def _common(self, headers: dict[str, str], origin: str) -> None:
        headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        if origin != "*":
            headers[hdrs.VARY] = "Origin"
            if self.settings.allow_credentials:
                headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        preflight = (
            request.method == hdrs.METH_OPTIONS
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
            and hdrs.ORIGIN in request.headers
        )
        if not self.enabled or not preflight:
            return await handler(request)
        origin = self._allow_origin(request.headers.get(hdrs.ORIGIN))
        if origin is None:  # outside the error middleware: answer here
            error = PermissionDeniedError(
                "This origin is not allowed to call the API from a browser.",
                code="cors_origin_not_allowed",
            )
            return web.json_response(
                error_for(api_family(request.path), error), status=error.status
            )
        headers: dict[str, str] = {
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: _METHODS,
            hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ", ".join(self.settings.allow_headers),
            hdrs.ACCESS_CONTROL_MAX_AGE: str(self.settings.max_age),
        }
        self._common(headers, origin)
        return web.Response(status=204, headers=headers)

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """``on_response_prepare``: CORS headers on every response to an allowed origin."""
        if not self.enabled or hdrs.ACCESS_CONTROL_ALLOW_ORIGIN in response.headers:
            return
        origin = self._allow_origin(request.headers.get(hdrs.ORIGIN))
        if origin is None:
            return
        headers: dict[str, str] = {}
        self._common(headers, origin)
        if self.settings.expose_headers:
            headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = ", ".join(self.settings.expose_headers)
        response.headers.update(headers)
