"""The RAM-budgeted LRU of loaded models, over the catalog (:mod:`llmis.models.catalog`).

Loaded models: each has its own worker and queue. Before a load, the model's memory is
predicted (:mod:`llmis.models.budget`); idle, unpinned models are evicted least recently used first
until it fits the budget, or the load fails with a 503 ``insufficient_memory``. After the load
the real RSS change is recorded and used from then on. Loads run one at a time (so the RSS
change belongs to that one model); concurrent requests for a loading model share its load.

Unloading (admin unload, eviction, the old version after a swap) drains the model first: new
requests wait for the unload and then load it again; leased, running and queued jobs finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil

from llmis.config import ModelSettings, Settings
from llmis.engine.embedding_context import input_limit
from llmis.engine.embedding_scheduler import embedding_outputs
from llmis.engine.scheduler import Scheduler
from llmis.errors import (
    APIError,
    BadRequestError,
    ModelNotFoundError,
    ModelUnavailableError,
)
from llmis.models.budget import (
    predict_memory,
    process_rss,
    release_free_heap,
    resolve_budget,
)
from llmis.models.catalog import Catalog
from llmis.models.entry import ModelEntry, ModelState
from llmis.models.files import safe_model_path
from llmis.models.gguf import GGUFInfoCache
from llmis.models.loading import (
    default_threads,
    effective_settings,
    insufficient_memory,
    load_scheduler,
    mib,
    model_file,
)

__all__ = ["ModelManager"]

logger = logging.getLogger(__name__)

MiB = 1024 * 1024


class ModelManager:
    """Owns every model entry and its worker; all methods run on the event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models_dir = settings.server.models_dir
        self.budget = resolve_budget(settings.server.ram_budget)
        self.evictions: dict[str, int] = {}
        self.catalog = Catalog(settings)
        self._infos = GGUFInfoCache()
        self._load_lock = asyncio.Lock()
        self._startup: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    # ----- catalog (llmis.models.catalog) -----

    def entries(self) -> list[ModelEntry]:
        return self.catalog.entries()

    def aliases(self) -> dict[str, str]:
        """Alias -> the model name it points at now."""
        return self.catalog.aliases()

    def openai_objects(self) -> list[dict[str, Any]]:
        return self.catalog.openai_objects()

    def resolve(self, name: str) -> str:
        return self.catalog.resolve(name)

    def entry(self, name: str) -> ModelEntry:
        """The entry for ``name`` (an alias resolves to its current version)."""
        return self.catalog.entry(name)

    @property
    def ready(self) -> bool:
        """True once the startup loads are done; lazy loads later do not change it."""
        return self._startup is None or self._startup.done()

    async def refresh(self) -> None:
        """Rescan the models dir and read the GGUF metadata of entries not read yet."""
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, self.catalog.list_dir)
        self.catalog.add_dir_entries(found)
        self.catalog.forget_missing(found)
        todo = [
            e
            for e in self.catalog.by_name.values()
            if e.info is None and e.state is not ModelState.LOADING and e.settings.path is not None
        ]
        for entry in todo:
            try:
                path = await loop.run_in_executor(None, model_file, entry.settings, self.models_dir)
                entry.info = await loop.run_in_executor(None, self._infos.get, path)
                entry.path = path
                effective_settings(entry, entry.info, self.budget, log=False)
            except APIError as exc:
                entry.error = exc.message

    # ----- lifecycle -----

    async def start(self) -> None:
        """Read the catalog, then load the configured models in the background, in order,
        while they fit the budget (startup loads never evict each other)."""
        await self.refresh()
        self._startup = asyncio.get_running_loop().create_task(self._preload())

    async def _preload(self) -> None:
        for entry in list(self.catalog.by_name.values()):
            if entry.source != "config" or entry.state is not ModelState.AVAILABLE:
                continue
            task = self._start_load(entry, evict=False)
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[Any]] = [*self._background]
        if self._startup is not None:
            tasks.append(self._startup)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for entry in self.catalog.by_name.values():
            for pending in (entry.load_task, entry.unload_task):
                if pending is not None and not pending.done():
                    await asyncio.gather(pending, return_exceptions=True)
            if entry.worker is not None:
                worker, entry.worker = entry.worker, None
                await loop.run_in_executor(None, worker.close)
                entry.state = ModelState.AVAILABLE

    # ----- getting a worker -----

    async def acquire(self, name: str) -> Scheduler:
        """Return the worker of model ``name``, loading it first if need be.

        Prefer :meth:`lease`: a worker returned here is not protected from eviction until a
        job is queued on it.
        """
        return await self._ready_worker(self.entry(name))

    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[Scheduler]:
        """The worker of ``name`` (loaded if need be), never evicted or unloaded while held.

        Hold it from picking the model until the request's jobs are queued; queued and running
        jobs protect the model from then on.
        """
        entry = self.entry(name)
        worker = await self._ready_worker(entry)
        entry.leases += 1  # no await since the worker was checked: it is still loaded
        try:
            yield worker
        finally:
            entry.leases -= 1
            entry.changed.set()

    async def _ready_worker(self, entry: ModelEntry, *, retry: bool = False) -> Scheduler:
        while True:
            entry.last_used = time.time()
            if entry.state is ModelState.LOADED and entry.worker is not None:
                return entry.worker
            if entry.state is ModelState.FAILED and not retry:
                wait = entry.retry_at - time.monotonic()
                if wait > 0:  # a failed load is retried with backoff, not on every request
                    raise ModelUnavailableError(
                        f"model '{entry.name}' failed to load; it is retried in {wait:.0f}s "
                        "(the reason is in the server log)",
                        param="model",
                        code="model_failed",
                        headers={"Retry-After": str(max(1, round(wait)))},
                    )
            if entry.state is ModelState.UNLOADING and entry.unload_task is not None:
                await asyncio.shield(entry.unload_task)
                continue
            task = entry.load_task if entry.state is ModelState.LOADING else None
            if task is None:
                task = self._start_load(entry, evict=True)
            try:
                await asyncio.shield(task)
            except APIError as exc:
                if exc.code == "insufficient_memory" and not entry.load_evicts:
                    continue  # a startup load, which never evicts: try again, evicting
                raise
            except Exception:  # the reason is in the log (and /healthz for admins)
                raise ModelUnavailableError(
                    f"model '{entry.name}' failed to load; see the server log"
                ) from None

    def _start_load(self, entry: ModelEntry, *, evict: bool) -> asyncio.Task[Scheduler]:
        entry.state = ModelState.LOADING
        entry.error = None
        entry.load_evicts = evict
        task = asyncio.get_running_loop().create_task(self._load(entry, evict))
        entry.load_task = task
        return task

    async def _load(self, entry: ModelEntry, evict: bool) -> Scheduler:
        loop = asyncio.get_running_loop()
        async with self._load_lock:
            try:
                path = await loop.run_in_executor(None, model_file, entry.settings, self.models_dir)
                info = await loop.run_in_executor(None, self._infos.get, path)
                entry.path, entry.info = path, info
                model = effective_settings(entry, info, self.budget)
                threads = model.threads or self.settings.server.threads or default_threads()
                outputs = 0
                if model.embedding:
                    limit = input_limit(model.n_ctx, info.context_length or 0)
                    outputs = embedding_outputs(threads, limit)
                prediction = predict_memory(
                    info, model.n_ctx, model.n_batch, model.n_slots, embedding_outputs=outputs
                )
                entry.predicted_bytes = prediction.total
                await self._make_room(entry, entry.measured_bytes or prediction.total, evict)
                started = time.monotonic()
                release_free_heap()
                before = process_rss()
                worker = await loop.run_in_executor(None, load_scheduler, model, path, threads)
                entry.measured_bytes = max(process_rss() - before, 0)
                entry.load_seconds = time.monotonic() - started
            except Exception as exc:
                fits_later = isinstance(exc, APIError) and exc.code == "insufficient_memory"
                entry.state = ModelState.AVAILABLE if fits_later else ModelState.FAILED
                entry.error = exc.message if isinstance(exc, APIError) else str(exc)
                if not fits_later:
                    entry.record_failure()
                logger.error("model %s was not loaded: %s", entry.name, entry.error)
                raise
        entry.worker = worker
        entry.state = ModelState.LOADED
        entry.failures = 0
        entry.last_used = time.time()
        worker.on_failure(loop, lambda: self._scheduler_died(entry, worker))
        logger.info(
            "model %s loaded from %s in %.2fs: predicted %s, measured %s",
            entry.name,
            path,
            entry.load_seconds,
            mib(prediction.total),
            mib(entry.measured_bytes),
        )
        return worker

    # ----- memory -----

    def used_bytes(self, exclude: ModelEntry | None = None) -> int:
        """RAM held by loaded (and unloading) models, measured where known."""
        held = (ModelState.LOADED, ModelState.UNLOADING)
        return sum(
            e.ram_bytes
            for e in self.catalog.by_name.values()
            if e is not exclude and e.state in held
        )

    def _victim(self, exclude: ModelEntry) -> ModelEntry | None:
        candidates = [
            e
            for e in self.catalog.by_name.values()
            if e is not exclude and e.state is ModelState.LOADED and not e.pinned and e.idle
        ]
        return min(candidates, key=lambda e: e.last_used or 0.0, default=None)

    async def _make_room(self, entry: ModelEntry, need: int, evict: bool) -> None:
        while True:
            used = self.used_bytes(entry)
            available = psutil.virtual_memory().available
            if used + need <= self.budget and need <= available:
                return
            draining = [
                e.unload_task
                for e in self.catalog.by_name.values()
                if e.state is ModelState.UNLOADING and e.unload_task is not None
            ]
            if draining:
                await asyncio.wait(draining)
                continue
            victim = self._victim(entry) if evict else None
            if victim is None:
                raise insufficient_memory(
                    entry, self.catalog.entries(), need, used, available, self.budget, evict
                )
            logger.info(
                "evicting %s (%s, last used %.0fs ago) to load %s",
                victim.name,
                mib(victim.ram_bytes),
                time.time() - (victim.last_used or 0.0),
                entry.name,
            )
            self.evictions[victim.name] = self.evictions.get(victim.name, 0) + 1
            await self._begin_unload(victim)

    # ----- unloading -----

    def _begin_unload(self, entry: ModelEntry) -> asyncio.Task[None]:
        if entry.unload_task is not None and not entry.unload_task.done():
            return entry.unload_task
        entry.state = ModelState.UNLOADING
        task = asyncio.get_running_loop().create_task(self._drain_and_close(entry))
        entry.unload_task = task
        return task

    def _scheduler_died(self, entry: ModelEntry, worker: Scheduler) -> None:
        """The model's scheduler thread died: its requests have their errors; mark the model
        failed (retried with backoff) and free it."""
        if entry.worker is not worker:
            return
        entry.worker = None
        entry.state = ModelState.FAILED
        entry.error = f"its scheduler failed ({worker.failure})"
        entry.record_failure()
        logger.error("model %s: %s", entry.name, entry.error)
        task = asyncio.get_running_loop().create_task(self._close_worker(worker))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _close_worker(self, worker: Scheduler) -> None:
        await asyncio.get_running_loop().run_in_executor(None, worker.close)
        release_free_heap()

    async def _wait_idle(self, entry: ModelEntry) -> None:
        """Until no request holds ``entry`` and its scheduler has nothing queued or running
        (woken by events: a lease released, the scheduler gone idle)."""
        while not entry.idle:
            worker = entry.worker
            if worker is not None and worker.busy:
                await worker.drain()
                continue
            entry.changed.clear()
            if not entry.idle:
                await entry.changed.wait()

    async def _drain_and_close(self, entry: ModelEntry) -> None:
        await self._wait_idle(entry)
        worker, entry.worker = entry.worker, None
        try:
            if worker is not None:
                await self._close_worker(worker)
        finally:
            entry.state = ModelState.AVAILABLE
            entry.unload_task = None
            entry.idle_expiry = None
        logger.info("model %s unloaded", entry.name)

    async def unload(self, name: str) -> ModelEntry:
        """Drain model ``name`` (its leased, running and queued jobs finish), then free it."""
        entry = self.catalog.by_name.get(name) or self.entry(name)
        if entry.state is ModelState.LOADING and entry.load_task is not None:
            await asyncio.gather(asyncio.shield(entry.load_task), return_exceptions=True)
        if entry.state in (ModelState.LOADED, ModelState.UNLOADING):
            await asyncio.shield(self._begin_unload(entry))
        return entry

    # ----- admin: explicit loads and version swaps -----

    async def load(
        self,
        name: str,
        *,
        path: Path | None = None,
        n_ctx: int | None = None,
        n_gpu_layers: int | None = None,
        pin: bool | None = None,
        replace: bool = False,
    ) -> ModelEntry:
        """Load ``name`` now; with ``path``, define it as that file in the models dir.

        Pointing an existing name at another file is a 409 unless ``replace`` is true.
        """
        entry = self.catalog.by_name.get(name)
        update: dict[str, Any] = {}
        if n_ctx is not None:
            update["n_ctx"] = n_ctx
        if n_gpu_layers is not None:
            update["n_gpu_layers"] = n_gpu_layers
        if path is not None:
            loop = asyncio.get_running_loop()
            resolved = await loop.run_in_executor(None, safe_model_path, path, self.models_dir)
            if not replace:
                await self._refuse_repoint(name, entry, path, resolved)
            await loop.run_in_executor(None, self._infos.get, resolved)  # 400 if not GGUF
            update.update(path=resolved, resource=None)
        if entry is None and path is None:
            entry = self.entry(name)
        if entry is not None and update:
            changed = {k: v for k, v in update.items() if getattr(entry.settings, k) != v}
            if changed and entry.state in (ModelState.LOADED, ModelState.LOADING):
                raise APIError(
                    f"model '{name}' is loaded with other settings "
                    f"({', '.join(sorted(changed))}); unload it first",
                    param="name",
                    code="model_loaded",
                    status=409,
                )
        if entry is None:
            settings = ModelSettings.model_validate({"name": name, "path": update["path"]})
            entry = ModelEntry(settings.model_copy(update=update), source="admin")
            self.catalog.by_name[name] = entry
        elif update and entry.state not in (ModelState.LOADED, ModelState.LOADING):
            entry.settings = entry.settings.model_copy(update=update)
            entry.info = entry.path = entry.measured_bytes = None
        if pin is not None:
            entry.pinned = pin
        await self._ready_worker(entry, retry=True)
        return entry

    async def _refuse_repoint(
        self, name: str, entry: ModelEntry | None, path: Path, resolved: Path
    ) -> None:
        """409 if ``name`` exists (a model or an alias) and is not the file ``resolved``."""
        if entry is None and name not in self.catalog.alias_map:
            return
        current = entry.path if entry is not None else None
        if entry is not None and current is None:
            loop = asyncio.get_running_loop()
            with contextlib.suppress(APIError):
                current = await loop.run_in_executor(
                    None, model_file, entry.settings, self.models_dir
                )
        if current == resolved:
            return
        what = "a model" if entry is not None else "an alias"
        raise APIError(
            f"'{name}' is already {what} with another file; send \"replace\": true to point "
            f"it at '{path}'",
            param="path",
            code="model_exists",
            status=409,
        )

    def _version(self, alias: str, to: str) -> ModelEntry:
        for candidate in (f"{alias}@{to}", to):
            with contextlib.suppress(ModelNotFoundError):
                return self.entry(candidate)
        raise ModelNotFoundError(to)

    async def swap(self, alias: str, to: str) -> tuple[str | None, ModelEntry]:
        """Load version ``to`` of ``alias``, then repoint the alias in one step.

        Requests already holding the old version finish there; the old version is unloaded
        in the background once drained (unless pinned or still the target of another alias).
        Returns the old target and the new entry.
        """
        if alias in self.catalog.by_name:
            raise BadRequestError(
                f"'{alias}' is a model, not an alias", param="alias", code="not_an_alias"
            )
        target = self._version(alias, to)
        await self._ready_worker(target)
        old = self.catalog.alias_map.get(alias)
        self.catalog.alias_map[alias] = target.name  # the atomic step: no await since the load
        logger.info("alias %s: %s -> %s", alias, old, target.name)
        retired = self.catalog.by_name.get(old) if old is not None and old != target.name else None
        if (
            retired is not None
            and not retired.pinned
            and retired.name not in self.catalog.alias_map.values()
            and retired.state is ModelState.LOADED
        ):
            task = asyncio.get_running_loop().create_task(self._retire(retired))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return old, target

    # ----- Ollama's keep_alive -----

    def keep_alive(self, name: str, seconds: float) -> None:
        """After a request: ``seconds`` < 0 keeps ``name`` loaded (pinned), 0 unloads it once
        idle, > 0 unloads it after that many idle seconds. A model pinned in the config
        stays loaded whatever a request asks."""
        entry = self.entry(name)
        if entry.settings.pin or entry.state is not ModelState.LOADED:
            return
        entry.last_used = time.time()
        if entry.expiry_task is not None:
            entry.expiry_task.cancel()
            entry.expiry_task = None
        entry.pinned = seconds < 0
        entry.idle_expiry = None if seconds < 0 else seconds
        if seconds >= 0:
            task = asyncio.get_running_loop().create_task(self._expire(entry))
            entry.expiry_task = task
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _expire(self, entry: ModelEntry) -> None:
        """Unload ``entry`` once it has been idle for its ``idle_expiry``."""
        while entry.state is ModelState.LOADED and entry.idle_expiry is not None:
            due = entry.expires_at
            if due is None:
                return
            if due > time.time():
                await asyncio.sleep(due - time.time())
                continue
            if not entry.idle:
                await self._wait_idle(entry)
                continue
            entry.expiry_task = None
            entry.idle_expiry = None
            logger.info("model %s: keep_alive expired, unloading", entry.name)
            await asyncio.shield(self._begin_unload(entry))
            return

    async def _retire(self, entry: ModelEntry) -> None:
        await asyncio.shield(self._begin_unload(entry))
