"""What one model load uses: its file, its effective settings, its engine and scheduler, and
the error when it does not fit the RAM budget. Functions the manager
(:mod:`llmis.models.manager`) calls; the blocking ones run in executor threads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import psutil

from llmis.config import ModelSettings
from llmis.engine.llama import Engine
from llmis.engine.scheduler import Scheduler
from llmis.errors import APIError, ModelFileError, ModelUnavailableError
from llmis.models.budget import fitting_context
from llmis.models.entry import ModelEntry, ModelState
from llmis.models.files import resolve_resource, safe_model_path
from llmis.models.gguf import GGUFInfo

__all__ = [
    "default_threads",
    "effective_settings",
    "insufficient_memory",
    "load_scheduler",
    "mib",
    "model_file",
]

logger = logging.getLogger(__name__)

MiB = 1024 * 1024


def mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB"


def default_threads() -> int:
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


def model_file(model: ModelSettings, models_dir: Path) -> Path:
    """The GGUF file ``model`` names (blocking: a package resource may be assembled)."""
    if model.resource is not None:
        return resolve_resource(model.resource, models_dir)
    if model.path is None:
        raise ModelFileError(f"model '{model.name}' names no file")
    return safe_model_path(model.path, models_dir)


def effective_settings(
    entry: ModelEntry, info: GGUFInfo, budget: int, *, log: bool = True
) -> ModelSettings:
    """The settings a load uses. A file dropped in the models dir names no context: it
    gets its trained context, halved while it would not fit the RAM budget (logged)."""
    model = entry.settings
    if entry.source != "models_dir" or "n_ctx" in model.model_fields_set:
        entry.n_ctx = model.n_ctx
        return model
    n_ctx, trained = fitting_context(info, model.n_batch, model.n_slots, budget)
    entry.n_ctx = n_ctx
    if log:
        why = (
            "its trained context"
            if n_ctx == trained
            else f"its trained context {trained} halved to fit the RAM budget "
            f"({mib(budget)}, {model.n_slots} slots)"
            if trained
            else "its GGUF names no trained context"
        )
        logger.info(
            "model %s (dropped in the models dir) gets n_ctx %d: %s; give it a "
            "[[models]] entry with n_ctx to choose another",
            entry.name,
            n_ctx,
            why,
        )
    return model.model_copy(update={"n_ctx": n_ctx})


def load_scheduler(model: ModelSettings, path: Path, threads: int) -> Scheduler:
    """Load ``path`` and start its scheduler (blocking); the one place a scheduler is built."""
    engine = Engine(
        path,
        n_ctx=model.n_ctx,
        n_batch=model.n_batch,
        n_gpu_layers=model.n_gpu_layers,
        threads=threads,
        chat_format=model.chat_format,
        embedding=model.embedding,
        flash_attn=model.flash_attn,
    )
    try:
        return Scheduler(model.name, engine, model.queue_size, model.n_slots)
    except BaseException:
        engine.close()
        raise


def insufficient_memory(
    entry: ModelEntry,
    entries: Iterable[ModelEntry],
    need: int,
    used: int,
    available: int,
    budget: int,
    evict: bool,
) -> APIError:
    """The 503 for a model that does not fit: how much it needs, and what holds the rest."""
    kind = "measured" if entry.measured_bytes else "predicted"
    held = [
        f"{e.name} ({mib(e.ram_bytes)}, {'pinned' if e.pinned else 'busy'})"
        for e in entries
        if e is not entry and e.state is ModelState.LOADED
    ]
    if need > available:
        why = f"only {mib(available)} of system memory is available"
    elif need > budget:
        why = "the model alone is larger than the budget"
    elif not evict:
        why = f"{mib(used)} is held by models loaded before it (startup loads never evict)"
    else:
        why = f"{mib(used)} is held by models that cannot be evicted now: " + ", ".join(held)
    return ModelUnavailableError(
        f"Not enough memory to load model '{entry.name}': it needs {mib(need)} ({kind}) "
        f"and the RAM budget is {mib(budget)}; {why}. Retry later, unload a model "
        "(POST /admin/models/unload) or raise [server] ram_budget.",
        param="model",
        code="insufficient_memory",
        headers={"Retry-After": "5"},
    )
