"""Liveness and version routes."""

from __future__ import annotations

import llama_cpp
from aiohttp import web

from llmis import __version__
from llmis.catalog import ModelState
from llmis.state import MANAGER

__all__ = ["routes"]

routes = web.RouteTableDef()


@routes.get("/healthz")
@routes.get("/health")
async def healthz(request: web.Request) -> web.Response:
    """200 ``{"status": "ok"}`` when ready; 503 while a configured model is still loading."""
    manager = request.app[MANAGER]
    if not manager.ready:
        loading = [e.name for e in manager.entries() if e.state is ModelState.LOADING]
        return web.json_response({"status": "loading", "loading": loading}, status=503)
    failed = {e.name: e.error for e in manager.entries() if e.state is ModelState.FAILED}
    body: dict[str, object] = {"status": "ok"}
    if failed:
        body["failed"] = failed
    return web.json_response(body)


@routes.get("/version")
async def version(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "version": __version__,
            "llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
        }
    )
