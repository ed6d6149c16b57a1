"""``create_app(settings) -> web.Application`` and nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from llmis.api import (
    admin,
    anthropic,
    embeddings,
    health,
    ollama,
    ollama_models,
    openai,
    openapi,
    pages,
    responses,
    search,
    simple,
    ws,
)
from llmis.api.middleware import error_middleware
from llmis.config import Settings
from llmis.models.manager import ModelManager
from llmis.ops.app_keys import MANAGER, PRESETS, SETTINGS
from llmis.ops.wiring import Operations
from llmis.tasks.presets import Presets

__all__ = ["create_app"]


def create_app(settings: Settings) -> web.Application:
    manager = ModelManager(settings)
    ops = Operations(settings, manager)
    app = web.Application(
        middlewares=[*ops.outer_middlewares(), error_middleware, *ops.inner_middlewares()],
        client_max_size=settings.server.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[MANAGER] = manager
    ops.setup(app)
    app[PRESETS] = Presets(settings)

    async def models_ctx(app: web.Application) -> AsyncIterator[None]:
        await app[MANAGER].start()
        yield
        await app[MANAGER].close()

    app.cleanup_ctx.append(models_ctx)
    app.add_routes(health.routes)
    app.add_routes(openai.routes)
    app.add_routes(admin.routes)
    app.add_routes(embeddings.routes)
    app.add_routes(ollama.routes)
    app.add_routes(ollama_models.routes)
    app.add_routes(anthropic.routes)
    app.add_routes(responses.routes)
    app.add_routes(simple.routes)
    search.setup(app)
    ws.setup(app)
    pages.setup(app)
    openapi.setup(app)
    return app
