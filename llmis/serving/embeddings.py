"""Sentence embeddings from a loaded model, batched by its embedding scheduler.

A model serves embeddings when its config says ``embedding = true``. Pooling comes from the
GGUF when it declares one (a BERT sentence-transformer says ``mean``); for a model that
declares none, such as a decoder LLM, llmis reads the per-token hidden states and pools them
itself with the config's ``pooling`` (``mean`` by default, ``cls`` = first token, ``last`` =
last token). Every vector is returned L2-normalised, as sentence-transformers and OpenAI's
embedding models return them, so a dot product is a cosine similarity.

Every request's inputs go to the model's
:class:`~llmis.engine.embedding_scheduler.EmbeddingScheduler`, which decodes the rows of all
waiting requests together (see there). An input longer than the model can take in one pass is
a 400 for the whole request unless the caller asks for truncation (``llmis index`` does).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from llmis.engine.embedding_context import EmbeddingContext, EmbeddingInput, Pooling
from llmis.engine.embedding_scheduler import EmbeddingScheduler, EmbeddingsResult
from llmis.engine.scheduler import Scheduler
from llmis.errors import BadRequestError
from llmis.models.manager import ModelManager

__all__ = [
    "EmbeddingInput",
    "Embeddings",
    "Pooling",
    "acquire_embedder",
    "embed",
    "embed_in_process",
    "lease_embedder",
    "normalise",
    "truncate_dimensions",
]


@dataclass(frozen=True)
class Embeddings:
    """Unit-length vectors, one row per input, and the tokens the inputs took."""

    vectors: NDArray[np.float32]
    prompt_tokens: int
    truncated: int = 0  # inputs cut to fit (only when truncation was asked for)


def normalise(vectors: NDArray[np.float32]) -> NDArray[np.float32]:
    """Rows scaled to unit length; an all-zero row stays zero."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.asarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


def truncate_dimensions(
    vectors: NDArray[np.float32], dimensions: int | None
) -> NDArray[np.float32]:
    """OpenAI's ``dimensions``: keep the first ``dimensions`` components and renormalise."""
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    if not 1 <= dimensions <= vectors.shape[1]:
        raise BadRequestError(
            f"dimensions must be between 1 and {vectors.shape[1]} for this model",
            param="dimensions",
        )
    return normalise(np.ascontiguousarray(vectors[:, :dimensions]))


def _embedding_pooling(manager: ModelManager, model: str) -> Pooling:
    """``model``'s pooling if its config serves embeddings; otherwise a clear 400."""
    settings = manager.entry(model).settings
    if not settings.embedding:
        raise BadRequestError(
            f"The model '{model}' does not serve embeddings. Use a model configured with "
            "embedding = true in the server config.",
            param="model",
            code="embeddings_not_supported",
        )
    return settings.pooling


def _embedder(worker: Scheduler) -> EmbeddingScheduler:
    if worker.embedder is None:  # the config changed under a loaded model
        raise BadRequestError(
            "this model was not loaded for embeddings; set embedding = true in its config",
            param="model",
            code="embeddings_not_supported",
        )
    return worker.embedder


async def acquire_embedder(manager: ModelManager, model: str) -> tuple[EmbeddingScheduler, Pooling]:
    """The embedding scheduler of ``model``.

    Only safe where nothing can evict it before the caller's job is queued: a manager nobody
    else uses (``llmis index``), or a caller that queues its job before its next ``await``.
    """
    pooling = _embedding_pooling(manager, model)
    return _embedder(await manager.acquire(model)), pooling


@contextlib.asynccontextmanager
async def lease_embedder(
    manager: ModelManager, model: str
) -> AsyncIterator[tuple[EmbeddingScheduler, Pooling]]:
    """The embedding scheduler of ``model``, never evicted while the request holds it."""
    pooling = _embedding_pooling(manager, model)
    async with manager.lease(model) as worker:
        yield _embedder(worker), pooling


def _finished(result: EmbeddingsResult) -> Embeddings:
    return Embeddings(normalise(result.vectors), result.prompt_tokens, result.truncated)


async def embed(
    embedder: EmbeddingScheduler,
    inputs: Sequence[EmbeddingInput],
    *,
    pooling: Pooling = "mean",
    truncate: bool = False,
    then: Callable[[Embeddings], Any] | None = None,
) -> Any:
    """Embed ``inputs`` (texts or token-id lists) in the model's batches; ``then`` runs on the
    embedding thread right after (e.g. a search's top-k), and its value is returned."""

    def finish(result: EmbeddingsResult) -> Any:
        done = _finished(result)
        return done if then is None else then(done)

    return await embedder.embed(inputs, pooling=pooling, truncate=truncate, then=finish)


def embed_in_process(
    context: EmbeddingContext,
    inputs: Sequence[EmbeddingInput],
    *,
    pooling: Pooling = "mean",
    truncate: bool = False,
    batch_tokens: int,
) -> Embeddings:
    """Blocking, for scripts on one thread: ``inputs`` in batches of ``batch_tokens``."""
    seqs, truncated = context.tokenize(inputs, truncate)
    rows: list[NDArray[np.float32]] = []
    pending: list[list[int]] = []
    size = 0
    for tokens in seqs:
        if pending and (size + len(tokens) > batch_tokens or len(pending) >= context.n_seq_max):
            rows.append(context.decode(pending, pooling))
            pending, size = [], 0
        pending.append(tokens)
        size += len(tokens)
    rows.append(context.decode(pending, pooling))
    result = EmbeddingsResult(np.concatenate(rows), sum(len(s) for s in seqs), truncated)
    return _finished(result)
