"""``POST /v1/search`` and ``GET /v1/indexes``: semantic search over ``llmis index`` tables.

``POST /v1/search {"index", "query", "top_k"?, "model"?}`` embeds the query with the model
that built the index and returns the ``top_k`` most similar rows with their cosine scores.
An index is tied to its model: naming another ``model`` is a 400, and so is an index whose
model this server does not serve as an embedding model.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from pydantic import Field, field_validator

from llmis.api.middleware import read_json
from llmis.index.search import IndexCache, search_index
from llmis.index.store import Manifest
from llmis.ops.app_keys import INDEXES, MANAGER, SETTINGS
from llmis.ops.request_context import name_model
from llmis.serving.protocol import LenientModel

__all__ = ["MAX_TOP_K", "SearchRequest", "routes", "setup"]

MAX_TOP_K = 100

routes = web.RouteTableDef()


class SearchRequest(LenientModel):
    """``null`` for a field means its default."""

    index: str = Field(min_length=1)
    query: str = Field(min_length=1)
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K)
    model: str | None = None

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("query must not be blank")
        return value


def _describe(manifest: Manifest) -> dict[str, Any]:
    return {
        "id": manifest.name,
        "object": "index",
        "model": manifest.model,
        "rows": manifest.rows,
        "dimensions": manifest.dimensions,
        "text_column": manifest.text_column,
        "id_column": manifest.id_column,
        "columns": list(manifest.columns),
        "created": manifest.created,
        "updated": manifest.updated,
    }


@routes.get("/v1/indexes")
async def list_indexes(request: web.Request) -> web.Response:
    loop = asyncio.get_running_loop()
    manifests = await loop.run_in_executor(None, request.app[INDEXES].manifests)
    return web.json_response({"object": "list", "data": [_describe(m) for m in manifests]})


@routes.post("/v1/search")
async def search(request: web.Request) -> web.Response:
    req = SearchRequest.model_validate(await read_json(request))
    manager = request.app[MANAGER]
    built_with, result, hits = await search_index(
        manager, request.app[INDEXES], req.index, req.query, req.top_k, req.model
    )
    name_model(built_with, result.prompt_tokens)
    return web.json_response(
        {
            "object": "list",
            "index": req.index,
            "model": built_with,
            "data": [{"object": "search_result", **hit.as_dict()} for hit in hits],
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }
    )


def setup(app: web.Application) -> None:
    """Share an :class:`IndexCache` of ``[server] indexes_dir`` and add the routes."""
    app[INDEXES] = IndexCache(app[SETTINGS].server.indexes_dir)
    app.add_routes(routes)
