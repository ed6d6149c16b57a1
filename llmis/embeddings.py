"""Sentence embeddings from a loaded model, computed on the model's worker thread.

A model serves embeddings when its config says ``embedding = true`` (the llama.cpp context is
then created in embedding mode). Pooling comes from the GGUF when it declares one (a BERT
sentence-transformer says ``mean``); for a model that declares none, such as a decoder LLM,
llmis reads the per-token hidden states and pools them itself with the config's ``pooling``
(``mean`` by default, ``cls`` = first token, ``last`` = last token). Every vector is returned
L2-normalised, as sentence-transformers and OpenAI's embedding models return them, so a dot
product is a cosine similarity.

Inputs are packed into llama.cpp batches (as many sequences as fit in ``n_batch`` tokens and
the context's sequence slots) and decoded together. An input longer than the model can take
in one pass is a 400 unless the caller asks for truncation (``llmis index`` does).
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import llama_cpp
import numpy as np
from numpy.typing import NDArray

from llmis.engine import Engine
from llmis.errors import APIError, BadRequestError, ContextOverflowError
from llmis.models import ModelManager
from llmis.scheduler import Scheduler

__all__ = [
    "EmbeddingInput",
    "Embeddings",
    "Pooling",
    "acquire_embedder",
    "embed",
    "embed_on_worker",
    "lease_embedder",
    "max_input_tokens",
    "normalise",
    "truncate_dimensions",
]

Pooling = Literal["mean", "cls", "last"]
EmbeddingInput = str | Sequence[int]


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


def _embedder(engine: Engine) -> llama_cpp.Llama:
    """The model's embedding context; a 400 for a model not loaded for embeddings."""
    if engine.llm is None:
        raise BadRequestError(
            "this model was not loaded for embeddings; set embedding = true in its config",
            param="model",
            code="embeddings_not_supported",
        )
    return engine.llm


def max_input_tokens(engine: Engine) -> int:
    """The longest input one forward pass takes: context, batch, micro-batch, trained length."""
    llm = _embedder(engine)
    limits = [llm.n_ctx(), llm.n_batch, llm.context_params.n_ubatch]
    trained = llm._model.n_ctx_train()
    if trained > 0:
        limits.append(trained)
    return int(min(limits))


def _tokenize(
    engine: Engine, inputs: Sequence[EmbeddingInput], truncate: bool
) -> tuple[list[list[int]], int]:
    llm = _embedder(engine)
    n_vocab = llm.n_vocab()
    limit = max_input_tokens(engine)
    out: list[list[int]] = []
    truncated = 0
    for index, item in enumerate(inputs):
        if isinstance(item, str):
            tokens = llm.tokenize(item.encode("utf-8"), add_bos=True, special=False)
        else:
            tokens = list(item)
            if any(not 0 <= t < n_vocab for t in tokens):
                raise BadRequestError(
                    f"input[{index}]: token ids must be in [0, {n_vocab})", param="input"
                )
        if not tokens:
            raise BadRequestError(f"input[{index}] is empty", param="input")
        if len(tokens) > limit:
            if not truncate:
                raise ContextOverflowError(
                    f"input[{index}] has {len(tokens)} tokens; this model embeds at most "
                    f"{limit} tokens per input.",
                    param="input",
                )
            tokens = tokens[:limit]
            truncated += 1
        out.append(tokens)
    return out, truncated


def _pool(hidden: NDArray[np.float32], pooling: Pooling) -> NDArray[np.float32]:
    if pooling == "cls":
        return np.asarray(hidden[0], dtype=np.float32)
    if pooling == "last":
        return np.asarray(hidden[-1], dtype=np.float32)
    return np.asarray(hidden.mean(axis=0), dtype=np.float32)


def _decode(
    engine: Engine, seqs: Sequence[Sequence[int]], pooling: Pooling
) -> list[NDArray[np.float32]]:
    """One llama.cpp batch of whole sequences -> one raw (unnormalised) vector per sequence."""
    llm = _embedder(engine)
    ctx = llm._ctx
    n_embd = llm.n_embd()
    batch = llm._batch
    batch.reset()
    for seq_id, tokens in enumerate(seqs):
        batch.add_sequence(tokens, seq_id, True)
    ctx.kv_cache_clear()
    llm.n_tokens = 0  # the KV cache no longer holds a generation prefix
    try:
        ctx.decode(batch)
    except RuntimeError as exc:
        raise APIError(f"llama.cpp could not embed this batch: {exc}") from None
    finally:
        batch.reset()
    rows: list[NDArray[np.float32]] = []
    if ctx.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE:
        total = sum(len(s) for s in seqs)
        pointer = ctypes.cast(
            llama_cpp.llama_get_embeddings(ctx.ctx), ctypes.POINTER(ctypes.c_float)
        )
        hidden = np.ctypeslib.as_array(pointer, shape=(total, n_embd))
        start = 0
        for tokens in seqs:
            rows.append(_pool(hidden[start : start + len(tokens)], pooling).copy())
            start += len(tokens)
    else:
        for seq_id in range(len(seqs)):
            pointer = ctypes.cast(
                llama_cpp.llama_get_embeddings_seq(ctx.ctx, seq_id), ctypes.POINTER(ctypes.c_float)
            )
            rows.append(np.ctypeslib.as_array(pointer, shape=(n_embd,)).copy())
    return rows


def embed(
    engine: Engine,
    inputs: Sequence[EmbeddingInput],
    *,
    pooling: Pooling = "mean",
    truncate: bool = False,
) -> Embeddings:
    """Embed ``inputs`` (texts or token-id lists). Blocking: call it on the worker thread."""
    llm = _embedder(engine)
    seqs, truncated = _tokenize(engine, inputs, truncate)
    n_batch = llm.n_batch
    n_seq_max = max(1, int(llm.context_params.n_seq_max))
    rows: list[NDArray[np.float32]] = []
    pending: list[list[int]] = []
    pending_tokens = 0
    for tokens in seqs:
        if pending and (pending_tokens + len(tokens) > n_batch or len(pending) >= n_seq_max):
            rows.extend(_decode(engine, pending, pooling))
            pending, pending_tokens = [], 0
        pending.append(tokens)
        pending_tokens += len(tokens)
    if pending:
        rows.extend(_decode(engine, pending, pooling))
    vectors = normalise(np.asarray(rows, dtype=np.float32).reshape(len(rows), llm.n_embd()))
    return Embeddings(vectors, sum(len(s) for s in seqs), truncated)


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


async def acquire_embedder(manager: ModelManager, model: str) -> tuple[Scheduler, Pooling]:
    """The worker of an embedding ``model``.

    Only safe where nothing can evict it before the caller's job is queued: a manager nobody
    else uses (``llmis index``), or a caller that queues its job before its next ``await``.
    """
    pooling = _embedding_pooling(manager, model)
    return await manager.acquire(model), pooling


@contextlib.asynccontextmanager
async def lease_embedder(
    manager: ModelManager, model: str
) -> AsyncIterator[tuple[Scheduler, Pooling]]:
    """The worker of an embedding ``model``, never evicted while the request holds it."""
    pooling = _embedding_pooling(manager, model)
    async with manager.lease(model) as worker:
        yield worker, pooling


async def embed_on_worker(
    worker: Scheduler,
    inputs: Sequence[EmbeddingInput],
    *,
    pooling: Pooling = "mean",
    truncate: bool = False,
) -> Embeddings:
    """:func:`embed` queued on ``worker``'s thread like any other job."""
    job: Callable[[Engine], Embeddings] = lambda engine: embed(  # noqa: E731
        engine, inputs, pooling=pooling, truncate=truncate
    )
    return await worker.call(job)
