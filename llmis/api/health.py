"""Liveness and version routes.

``/healthz``: 503 ``loading`` while the configured models load at startup; then 200 ``ok``,
or ``degraded`` when a configured model failed to load: 200 while another configured model is
usable, 503 when none is. ``failed`` lists the models that failed to load (configured or
not); why they failed (load errors may name server paths) is shown only to admins: a request
with an admin key, or, with auth off, a client on a loopback address.
"""

from __future__ import annotations

from aiohttp import web

from llmis import __version__
from llmis.engine.llama import backend_info
from llmis.models.entry import ModelState
from llmis.ops.app_keys import MANAGER
from llmis.ops.auth import KEYRING, is_admin_request

__all__ = ["routes"]

routes = web.RouteTableDef()


@routes.get("/healthz")
@routes.get("/health")
async def healthz(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    if not manager.ready:
        loading = [e.name for e in manager.entries() if e.state is ModelState.LOADING]
        return web.json_response({"status": "loading", "loading": loading}, status=503)
    configured = [e for e in manager.entries() if e.source == "config"]
    failed = [e for e in manager.entries() if e.state is ModelState.FAILED]
    if not failed:
        return web.json_response({"status": "ok"})
    usable = [e for e in configured if e.state is not ModelState.FAILED]
    status = 503 if configured and not usable else 200
    degraded = len(usable) < len(configured)
    ring = request.app.get(KEYRING)
    body: dict[str, object] = {"status": "degraded" if degraded else "ok"}
    if ring is not None and is_admin_request(ring, request):
        body["failed"] = {e.name: e.error for e in failed}
    else:
        body["failed"] = sorted(e.name for e in failed)
    return web.json_response(body, status=status)


@routes.get("/version")
async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__, **backend_info()})
