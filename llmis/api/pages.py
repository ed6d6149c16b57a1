"""The chat page at ``/``, rendered with Jinja2 from ``templates/``; its assets under ``/static/``.

Every asset is served by the app (no CDN). The page is sent with a Content-Security-Policy
that allows only same-origin scripts, styles and connections, as a second line of defence
behind rendering model output as text.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

import llmis
from llmis import __version__
from llmis.errors import APIError
from llmis.ops.app_keys import MANAGER
from llmis.ops.auth import KEYRING

__all__ = ["CSP", "setup", "templates_dir"]

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

routes = web.RouteTableDef()


def templates_dir() -> Path:
    """``templates/`` beside the package (a checkout) or inside it (an installed wheel)."""
    package = Path(llmis.__file__).resolve().parent
    for candidate in (package / "templates", package.parent / "templates"):
        if (candidate / "chat.html").is_file():
            return candidate
    raise FileNotFoundError(f"no templates/chat.html next to or inside {package}")


@routes.get("/")
async def chat_page(request: web.Request) -> web.Response:
    """The page. With API keys on, it lists no models (the page is open to anyone): its
    script asks ``/v1/models`` for them with the key the user types."""
    auth_required = request.app[KEYRING].enabled
    models = [
        {"name": e.name, "state": e.state.value, "n_ctx": e.served_n_ctx}
        for e in request.app[MANAGER].entries()
        if not e.embedding_only and not auth_required
    ]
    context = {"models": models, "version": __version__, "auth_required": auth_required}
    response = aiohttp_jinja2.render_template("chat.html", request, context)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Cache-Control"] = "no-store"
    return response


def setup(app: web.Application) -> None:
    """Install the Jinja2 environment, the page route and the static assets on ``app``."""
    directory = templates_dir()
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(directory),
        autoescape=jinja2.select_autoescape(default=True),
    )
    app.add_routes(routes)
    # Only the files shipped in templates/static, by exact name: a request for anything else
    # is a 404 in the API's error shape before a path reaches the filesystem.
    assets = {p.name: p for p in (directory / "static").iterdir() if p.is_file()}

    async def asset(request: web.Request) -> web.StreamResponse:
        path = assets.get(request.match_info["name"])
        if path is None:
            raise APIError("no such asset", status=404, code="not_found")
        return web.FileResponse(path)

    app.router.add_get("/static/{name}", asset, name="static")
