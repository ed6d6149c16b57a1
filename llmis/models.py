"""The model catalog: which models are served, their state, and loading them onto workers.

Each configured model gets an entry. Entries are loaded in the background at startup; a
request for a model that is still loading waits for that one shared load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import psutil

from llmis.config import ModelSettings, Settings
from llmis.engine import Engine
from llmis.errors import APIError, ModelFileError, ModelNotFoundError, ModelUnavailableError
from llmis.resources import resolve_resource, safe_model_path
from llmis.worker import ModelWorker

__all__ = ["ModelEntry", "ModelManager", "ModelState"]

logger = logging.getLogger(__name__)


class ModelState(str, Enum):
    AVAILABLE = "available"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass(eq=False)
class ModelEntry:
    settings: ModelSettings
    state: ModelState = ModelState.AVAILABLE
    worker: ModelWorker | None = None
    load_task: asyncio.Task[ModelWorker] | None = None
    error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    last_used: float = 0.0
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.settings.name


def default_threads() -> int:
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


class ModelManager:
    """Owns every model entry and its worker; all methods run on the event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models_dir = settings.server.models_dir
        self._entries: dict[str, ModelEntry] = {m.name: ModelEntry(m) for m in settings.models}

    # ----- queries -----

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def entry(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise ModelNotFoundError(name) from None

    @property
    def ready(self) -> bool:
        """True once no configured model is still loading."""
        return all(e.state is not ModelState.LOADING for e in self._entries.values())

    # ----- lifecycle -----

    async def start(self) -> None:
        """Begin loading every configured model in the background."""
        for entry in self._entries.values():
            self._start_load(entry)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for entry in self._entries.values():
            if entry.load_task is not None and not entry.load_task.done():
                await asyncio.gather(entry.load_task, return_exceptions=True)
            if entry.worker is not None:
                worker, entry.worker = entry.worker, None
                await loop.run_in_executor(None, worker.close)
                entry.state = ModelState.AVAILABLE

    async def acquire(self, name: str) -> ModelWorker:
        """Return the worker of model ``name``, loading it first if need be."""
        entry = self.entry(name)
        entry.last_used = time.time()
        if entry.worker is not None and entry.state is ModelState.LOADED:
            return entry.worker
        task = entry.load_task if entry.state is ModelState.LOADING else None
        if task is None:
            task = self._start_load(entry)
        try:
            return await asyncio.shield(task)
        except APIError:
            raise
        except Exception as exc:
            raise ModelUnavailableError(f"model '{name}' failed to load: {exc}") from None

    def _start_load(self, entry: ModelEntry) -> asyncio.Task[ModelWorker]:
        entry.state = ModelState.LOADING
        entry.error = None
        task = asyncio.get_running_loop().create_task(self._load(entry))
        entry.load_task = task
        return task

    async def _load(self, entry: ModelEntry) -> ModelWorker:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            worker = await loop.run_in_executor(None, self._load_blocking, entry.settings)
        except Exception as exc:
            entry.state = ModelState.FAILED
            entry.error = str(exc)
            logger.error("model %s failed to load: %s", entry.name, exc)
            raise
        entry.worker = worker
        entry.path = worker.engine.path
        entry.state = ModelState.LOADED
        logger.info(
            "model %s loaded from %s in %.2fs",
            entry.name,
            worker.engine.path,
            time.monotonic() - started,
        )
        return worker

    def resolve_path(self, model: ModelSettings) -> Path:
        if model.resource is not None:
            return resolve_resource(model.resource, self.models_dir)
        if model.path is None:
            raise ModelFileError(f"model '{model.name}' names no file")
        return safe_model_path(model.path, self.models_dir)

    def _load_blocking(self, model: ModelSettings) -> ModelWorker:
        threads = model.threads or self.settings.server.threads or default_threads()
        engine = Engine(
            self.resolve_path(model),
            n_ctx=model.n_ctx,
            n_batch=model.n_batch,
            n_gpu_layers=model.n_gpu_layers,
            threads=threads,
            chat_format=model.chat_format,
        )
        return ModelWorker(model.name, engine, model.queue_size)
