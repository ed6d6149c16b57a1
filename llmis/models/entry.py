"""One catalog entry: a named model, its state, its worker and what is known of its memory."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from llmis.config import ModelSettings
from llmis.engine.scheduler import Scheduler
from llmis.models.gguf import GGUFInfo

__all__ = ["ModelEntry", "ModelState", "Source"]


class ModelState(str, Enum):
    AVAILABLE = "available"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


Source = Literal["config", "models_dir", "admin"]


@dataclass(eq=False)
class ModelEntry:
    settings: ModelSettings
    source: Source = "config"
    state: ModelState = ModelState.AVAILABLE
    worker: Scheduler | None = None
    load_task: asyncio.Task[Scheduler] | None = None
    unload_task: asyncio.Task[None] | None = None
    error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    last_used: float | None = None
    path: Path | None = None
    info: GGUFInfo | None = None
    n_ctx: int | None = None  # the context a load uses (a dropped-in file's is worked out)
    predicted_bytes: int | None = None
    measured_bytes: int | None = None
    load_seconds: float | None = None
    leases: int = 0
    pinned: bool = False
    load_evicts: bool = True
    failures: int = 0  # failed loads in a row (backoff)
    retry_at: float = 0.0  # monotonic time before which a failed model is not reloaded
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # a lease was released
    # Ollama's keep_alive: unload after this many idle seconds (None: never expires)
    idle_expiry: float | None = None
    expiry_task: asyncio.Task[None] | None = None

    @property
    def expires_at(self) -> float | None:
        """Wall-clock time the model unloads if left idle (None: it stays loaded)."""
        if self.idle_expiry is None or self.pinned:
            return None
        return (self.last_used or time.time()) + self.idle_expiry

    def __post_init__(self) -> None:
        self.pinned = self.pinned or self.settings.pin

    def record_failure(self) -> None:
        """A failed load (or a dead scheduler): back off before the next try, 2 s doubling
        to 60 s."""
        self.failures += 1
        self.retry_at = time.monotonic() + min(60.0, 2.0**self.failures)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def queued(self) -> int:
        return self.worker.queued if self.worker is not None else 0

    @property
    def in_flight(self) -> int:
        return self.worker.running if self.worker is not None else 0

    @property
    def idle(self) -> bool:
        """No request holds it and its worker has nothing queued or running."""
        return self.leases == 0 and (self.worker is None or not self.worker.busy)

    @property
    def ram_bytes(self) -> int:
        """The memory it holds (or will hold): measured when known, else predicted."""
        return self.measured_bytes or self.predicted_bytes or 0

    @property
    def served_n_ctx(self) -> int:
        """The context a request can use: the loaded engine's, else what a load will use."""
        if self.worker is not None:
            return self.worker.engine.n_ctx
        return self.n_ctx or self.settings.n_ctx

    @property
    def embedding_only(self) -> bool:
        """An embedding model (configured ``embedding = true``, or a GGUF that only embeds):
        the chat page leaves it out of its picker."""
        if self.worker is not None and not self.worker.engine.generates:
            return True
        return self.settings.embedding

    def metadata(self) -> dict[str, Any]:
        """GGUF facts for listings (empty before the file was read)."""
        info = self.info
        if info is None:
            return {}
        return {
            "architecture": info.architecture,
            "parameters": info.parameters,
            "quantization": info.quant,
            "context_length": self.served_n_ctx,
            "n_ctx_train": info.context_length,
            "has_chat_template": info.has_chat_template,
            "chat_format": self.settings.chat_format,
            "file_size": info.file_size,
        }

    def openai_object(self, id_: str | None = None) -> dict[str, Any]:
        """This model as an OpenAI model object, plus its state and GGUF metadata."""
        body: dict[str, Any] = {
            "id": id_ or self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "llmis",
            "state": self.state.value,
            "embedding": self.embedding_only,
            **self.metadata(),
        }
        if id_ is not None and id_ != self.name:
            body["alias_of"] = self.name
        return body
