"""Ollama's model routes (``docs/api.md``): list (``/api/tags``, ``/api/ps``), show, version,
pull (admin) and delete (admin), over the model manager and ``llmis pull``.

The generation routes (``/api/chat``, ``/api/generate``, ``/api/embed``) are in
:mod:`llmis.api.ollama`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from llmis import __version__
from llmis.api.middleware import read_json
from llmis.api.ollama import OLLAMA_API_VERSION, NdjsonStream, timestamp
from llmis.api.ollama_protocol import OllamaDeleteRequest, OllamaPullRequest, OllamaShowRequest
from llmis.config import Settings
from llmis.errors import APIError, BadRequestError, ModelNotFoundError
from llmis.hub.pull import PARTIAL_DIR, PullError, pull_remote
from llmis.models.entry import ModelEntry, ModelState
from llmis.models.manager import ModelManager
from llmis.models.splits import split_part_paths
from llmis.ops.app_keys import MANAGER, PRESETS, SETTINGS
from llmis.ops.auth import KEYRING, PermissionDeniedError, is_admin_request

__all__ = ["routes"]

routes = web.RouteTableDef()
logger = logging.getLogger(__name__)
_FOREVER = dt.datetime(2318, 1, 1, tzinfo=dt.timezone.utc)  # as Ollama shows keep_alive -1


def _details(entry: ModelEntry) -> dict[str, Any]:
    info = entry.info
    family = info.architecture if info is not None else ""
    size = ""
    if info is not None and info.parameters:
        n = info.parameters
        size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": size,
        "quantization_level": info.quant if info is not None else "",
    }


def _file_facts(entry: ModelEntry) -> tuple[str, str]:
    """``modified_at`` and ``digest``: the digest names the file version (sha256 of its path,
    size and mtime), not its bytes, which would mean hashing gigabytes per listing."""
    path = entry.path
    if path is None:
        return timestamp(entry.created), ""
    try:
        stat = path.stat()
    except OSError:
        return timestamp(entry.created), ""
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    return timestamp(stat.st_mtime), hashlib.sha256(key).hexdigest()


def _named(manager: ModelManager) -> list[tuple[str, ModelEntry]]:
    """Every model and alias (whose target exists) with its entry."""
    out = [(e.name, e) for e in manager.entries()]
    entries = {e.name: e for e in manager.entries()}
    out += [(a, entries[t]) for a, t in manager.aliases().items() if t in entries]
    return out


def _model(name: str, entry: ModelEntry) -> dict[str, Any]:
    modified, digest = _file_facts(entry)
    return {
        "name": name,
        "model": name,
        "modified_at": modified,
        "size": entry.info.file_size if entry.info is not None else 0,
        "digest": digest,
        "details": _details(entry),
    }


@routes.get("/api/tags")
async def tags(request: web.Request) -> web.Response:
    """Every model the server can serve, loaded or not."""
    manager = request.app[MANAGER]
    await manager.refresh()
    models = [_model(n, e) for n, e in _named(manager)]
    for preset in request.app[PRESETS].openai_objects(manager):  # with their model's facts
        with contextlib.suppress(ModelNotFoundError):
            models.append(_model(preset["id"], manager.entry(preset["model"] or "")))
    return web.json_response({"models": models})


@routes.get("/api/ps")
async def ps(request: web.Request) -> web.Response:
    """The loaded models, their memory and when they unload (``keep_alive``)."""
    manager = request.app[MANAGER]
    running = []
    for name, entry in _named(manager):
        if entry.state is not ModelState.LOADED:
            continue
        expires = entry.expires_at
        item = _model(name, entry)
        item.update(
            size=entry.ram_bytes,
            expires_at=timestamp(expires) if expires is not None else _FOREVER.isoformat(),
            size_vram=0,
            context_length=entry.settings.n_ctx,
        )
        running.append(item)
    return web.json_response({"models": running})


@routes.post("/api/show")
async def show(request: web.Request) -> web.Response:
    req = OllamaShowRequest.model_validate(await read_json(request))
    manager = request.app[MANAGER]
    await manager.refresh()
    found = request.app[PRESETS].lookup(req.model, manager)
    entry = manager.entry(found[1] if found is not None else req.model)  # a preset: its model
    info = entry.info
    model_info: dict[str, Any] = {}
    if info is not None:
        arch = info.architecture
        model_info = {
            "general.architecture": arch,
            "general.parameter_count": info.parameters,
            "general.file_type": info.quant,
        }
        if info.name:
            model_info["general.name"] = info.name
        for key, value in (
            ("context_length", info.context_length),
            ("block_count", info.block_count),
            ("embedding_length", info.embedding_length),
            ("attention.head_count", info.head_count),
            ("attention.head_count_kv", info.head_count_kv),
            ("vocab_size", info.vocab_size),
        ):
            if value is not None:
                model_info[f"{arch}.{key}"] = value
    if entry.settings.embedding:
        capabilities = ["embedding"]
    elif found is None and info is not None and info.has_chat_template:
        capabilities = ["completion", "tools"]  # /api/chat's tools go through the template
    else:
        capabilities = ["completion"]
    modified, _ = _file_facts(entry)
    body: dict[str, Any] = {
        "modelfile": "",
        "parameters": f"num_ctx {entry.settings.n_ctx}",
        "template": "",
        "details": _details(entry),
        "model_info": model_info,
        "capabilities": capabilities,
        "modified_at": modified,
    }
    if found is not None:
        preset, model = found
        body["system"] = preset.system or ""
        body["preset"] = {"name": preset.name, "task": preset.task, "model": model}
    return web.json_response(body)


@routes.get("/api/version")
async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_API_VERSION, "llmis_version": __version__})


# ----- generation -----


def _require_admin(request: web.Request, what: str) -> None:
    if not is_admin_request(request.app[KEYRING], request):
        raise PermissionDeniedError(f"{what} needs an admin API key.")


def _hub_source(name: str) -> str:
    """Ollama's ``hf.co/owner/repo:QUANT`` is ``owner/repo:QUANT`` for ``llmis pull``."""
    for prefix in ("https://", "http://"):
        name = name.removeprefix(prefix)
    for host in ("hf.co/", "huggingface.co/"):
        if name.startswith(host):
            return name[len(host) :]
    return name


def _partial_bytes(models_dir: Path) -> int:
    try:
        return sum(p.stat().st_size for p in (models_dir / PARTIAL_DIR).glob("*.part"))
    except OSError:
        return 0


def _pull(source: str, settings: Settings) -> list[Path]:
    """:func:`pull_remote` with its failures as 400s (blocking)."""
    try:
        return pull_remote(source, settings)[0]
    except PullError as exc:
        raise BadRequestError(str(exc), param="model", code="pull_failed") from None
    except Exception:
        logger.exception("pulling %r failed", source)
        raise APIError("The pull failed; the reason is in the server log.") from None


@routes.post("/api/pull")
async def pull(request: web.Request) -> web.StreamResponse:
    """``llmis pull`` over HTTP, with NDJSON progress; only with an admin key (it writes
    models to the server's disk)."""
    _require_admin(request, "Pulling models")
    req = OllamaPullRequest.model_validate(await read_json(request))
    settings = request.app[SETTINGS]
    manager = request.app[MANAGER]
    source = _hub_source(req.model)
    loop = asyncio.get_running_loop()
    task = loop.run_in_executor(None, _pull, source, settings)
    if not req.stream:
        await asyncio.shield(task)
        await manager.refresh()
        return web.json_response({"status": "success"})
    out = NdjsonStream(request)
    try:
        await out.prepare()
        await out.send({"status": "pulling manifest"})
        while not task.done():
            await asyncio.wait([task], timeout=settings.server.keepalive_seconds)
            if not task.done():
                partial = _partial_bytes(settings.server.models_dir)
                await out.send({"status": f"pulling {source}", "completed": partial})
        try:
            paths = task.result()
        except APIError as exc:
            await out.send({"error": exc.message})
        else:
            for path in paths:
                size = path.stat().st_size
                await out.send({"status": f"pulling {path.name}", "total": size, "completed": size})
            await out.send({"status": "verifying sha256 digest"})
            await manager.refresh()
            await out.send({"status": "writing manifest"})
            await out.send({"status": "success"})
        await out.close()
    except ConnectionResetError:
        pass  # the pull itself finishes in its thread
    return out.response


@routes.delete("/api/delete")
async def delete(request: web.Request) -> web.Response:
    """Unload and delete a model file of the models dir; only with an admin key. Models
    named in the config are not files of the API's to delete (400)."""
    _require_admin(request, "Deleting models")
    req = OllamaDeleteRequest.model_validate(await read_json(request))
    manager = request.app[MANAGER]
    entry = manager.entry(req.model)
    if req.model != entry.name:
        raise BadRequestError(
            f"'{req.model}' is an alias; delete the model it names ('{entry.name}')",
            param="model",
        )
    if entry.source != "models_dir":
        raise BadRequestError(
            f"model '{entry.name}' is defined in the server config; remove it there",
            param="model",
        )
    await manager.unload(entry.name)
    path = entry.path or manager.models_dir / f"{entry.name}.gguf"

    def remove() -> None:
        for part in split_part_paths(path):
            part.unlink(missing_ok=True)

    await asyncio.get_running_loop().run_in_executor(None, remove)
    await manager.refresh()
    return web.Response(status=200)
