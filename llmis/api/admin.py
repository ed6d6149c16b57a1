"""Admin routes for the loaded-model cache: list, load, unload, swap a version behind an alias.

* ``GET /admin/models``: every model with its state, predicted and measured RAM, last use,
  queue depth and jobs in flight; the aliases; the budget and the server's RSS.
* ``POST /admin/models/load {name, path?, n_ctx?, n_gpu_layers?, pin?, replace?}``: load now
  (200 when loaded). ``path`` is a file inside the models dir (403 outside it, 400 if not
  GGUF); a name that exists with another file is a 409 unless ``replace`` is true.
* ``POST /admin/models/unload {name}``: drain, then free (200 when freed). Requests already
  holding the model, running or queued, finish first; new ones wait and load it again.
* ``POST /admin/models/swap {alias, to}``: load ``to`` (``v2`` or ``name@v2``), then repoint
  the alias at once; the old version is unloaded in the background once drained.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import ConfigDict, Field

from llmis.api.middleware import read_json
from llmis.models.budget import process_rss
from llmis.models.entry import ModelEntry
from llmis.models.manager import ModelManager
from llmis.ops.app_keys import MANAGER
from llmis.serving.protocol import LenientModel

__all__ = ["describe", "routes"]

routes = web.RouteTableDef()

_NAME = r"^[A-Za-z0-9._:@/-]+$"


class _Body(LenientModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoadBody(_Body):
    name: str = Field(min_length=1, max_length=200, pattern=_NAME)
    path: str | None = Field(default=None, min_length=1, max_length=4096, pattern=r"^[^\x00]+$")
    n_ctx: int | None = Field(default=None, ge=16, le=1_048_576)
    n_gpu_layers: int | None = Field(default=None, ge=-1, le=100_000)
    pin: bool | None = None
    replace: bool = Field(
        default=False, description="point an existing name at another file (else 409)"
    )


class UnloadBody(_Body):
    name: str = Field(min_length=1, max_length=200)


class SwapBody(_Body):
    alias: str = Field(min_length=1, max_length=200, pattern=_NAME)
    to: str = Field(min_length=1, max_length=200, pattern=_NAME)


def describe(manager: ModelManager, entry: ModelEntry) -> dict[str, Any]:
    """One model as the admin listing shows it."""
    return {
        "name": entry.name,
        "state": entry.state.value,
        "source": entry.source,
        "aliases": sorted(a for a, t in manager.aliases().items() if t == entry.name),
        "path": str(entry.path) if entry.path is not None else None,
        "pinned": entry.pinned,
        "n_ctx": entry.settings.n_ctx,
        "n_gpu_layers": entry.settings.n_gpu_layers,
        "predicted_bytes": entry.predicted_bytes,
        "measured_bytes": entry.measured_bytes,
        "load_seconds": entry.load_seconds,
        "last_used": entry.last_used,
        "queue_depth": entry.queued,
        "in_flight": entry.in_flight,
        "slots": [asdict(s) for s in entry.worker.slot_stats()] if entry.worker else [],
        "kv_bytes": entry.worker.kv_bytes if entry.worker else None,
        "flash_attn": entry.worker.flash_attn if entry.worker else None,
        "evictions": manager.evictions.get(entry.name, 0),
        "error": entry.error,
        "gguf": entry.metadata(),
    }


@routes.get("/admin/models")
async def list_models(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    await manager.refresh()
    return web.json_response(
        {
            "object": "list",
            "budget_bytes": manager.budget,
            "used_bytes": manager.used_bytes(),
            "rss_bytes": process_rss(),
            "aliases": manager.aliases(),
            "data": [describe(manager, e) for e in manager.entries()],
        }
    )


@routes.post("/admin/models/load")
async def load_model(request: web.Request) -> web.Response:
    body = LoadBody.model_validate(await read_json(request))
    manager = request.app[MANAGER]
    entry = await manager.load(
        body.name,
        path=Path(body.path) if body.path is not None else None,
        n_ctx=body.n_ctx,
        n_gpu_layers=body.n_gpu_layers,
        pin=body.pin,
        replace=body.replace,
    )
    return web.json_response(describe(manager, entry))


@routes.post("/admin/models/unload")
async def unload_model(request: web.Request) -> web.Response:
    body = UnloadBody.model_validate(await read_json(request))
    manager = request.app[MANAGER]
    entry = await manager.unload(body.name)
    return web.json_response(describe(manager, entry))


@routes.post("/admin/models/swap")
async def swap_model(request: web.Request) -> web.Response:
    body = SwapBody.model_validate(await read_json(request))
    manager = request.app[MANAGER]
    old, entry = await manager.swap(body.alias, body.to)
    return web.json_response(
        {"alias": body.alias, "from": old, "to": entry.name, "model": describe(manager, entry)}
    )
