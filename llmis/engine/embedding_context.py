"""A model's embedding context: many inputs in one ``llama_decode``, one vector per input.

The only embedding code that touches llama.cpp. Inputs are packed into one ``llama_batch``,
each on its own sequence id; after the decode, a model that declares its pooling (a BERT
sentence encoder) has its pooled vector read per sequence (``llama_get_embeddings_seq``), and a
model that declares none (a decoder configured with ``embedding = true``) has its per-token
hidden states pooled here (``mean``, ``cls`` = first token, ``last`` = last token). The memory
(KV cache, when the model has one) is cleared before every batch.

Sizes, chosen by measurement (MiniLM, ``data/topics.csv``, 1 and 2 threads; the key numbers
are below, and ``scripts/bench_embeddings.py --sweep`` repeats the measurement):

* :data:`BATCH_TOKENS` tokens per decode (the schedulers pack up to that many). llama.cpp
  computes a batch's attention over all of its tokens and masks the other sequences out, so
  the cost of a batch grows with its square: 512-token batches ran at 70 rows/s where
  160-token batches ran at 230 (one input per decode: 150).
* ``n_batch = n_ubatch = max(BATCH_TOKENS, longest input)``: non-causal attention (BERT)
  needs a whole sequence in one micro-batch (llama.cpp aborts the process otherwise), so one
  decode is one micro-batch, and a long input is decoded alone.
* ``n_seq_max``: :data:`MAX_SEQS` sequences per decode (a batch of 3-token inputs).
* flash attention on unless the config says ``off`` (``auto`` is llama.cpp's choice, on, as
  in llama-server): measured 1.4x faster at these batch sizes. An input's vector moves by
  less than 1e-6 in cosine with the batch it shares.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from typing import Literal

import llama_cpp
import numpy as np
from numpy.typing import NDArray

from llmis.engine.llama import Engine
from llmis.errors import APIError, BadRequestError, ContextOverflowError, ModelFileError

__all__ = [
    "BATCH_TOKENS",
    "MAX_SEQS",
    "EmbeddingContext",
    "EmbeddingInput",
    "Pooling",
    "input_limit",
]

logger = logging.getLogger(__name__)

Pooling = Literal["mean", "cls", "last"]
EmbeddingInput = str | Sequence[int]

BATCH_TOKENS = 160
MAX_SEQS = 64


def input_limit(n_ctx: int, trained: int) -> int:
    """The longest input one pass takes: the configured context, within the trained length
    (``trained`` 0: the GGUF names none)."""
    return min(n_ctx, trained) if trained > 0 else n_ctx


def _pool(hidden: NDArray[np.float32], pooling: Pooling) -> NDArray[np.float32]:
    if pooling == "cls":
        return np.asarray(hidden[0], dtype=np.float32)
    if pooling == "last":
        return np.asarray(hidden[-1], dtype=np.float32)
    return np.asarray(hidden.mean(axis=0), dtype=np.float32)


class EmbeddingContext:
    """One llama context in embedding mode; used by one thread at a time (its scheduler)."""

    def __init__(
        self,
        engine: Engine,
        *,
        batch_tokens: int = BATCH_TOKENS,
        max_seqs: int = MAX_SEQS,
        flash_attn: bool | None = None,
        threads: int | None = None,
    ) -> None:
        self.engine = engine
        model = engine.model.model
        trained = int(llama_cpp.llama_model_n_ctx_train(model))
        self.max_input_tokens = input_limit(engine.n_ctx, trained)
        self.n_batch = max(batch_tokens, self.max_input_tokens)
        self.n_seq_max = max(1, min(max_seqs, int(llama_cpp.llama_max_parallel_sequences())))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_batch  # a decoder's KV holds one batch, cleared before the next
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = self.n_seq_max
        params.n_threads = params.n_threads_batch = threads or engine.threads
        params.embeddings = True
        params.kv_unified = True
        params.no_perf = True
        if flash_attn is None:
            flash_attn = engine.flash_attn != "off"
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            raise ModelFileError(f"cannot create an embedding context for {engine.path.name}")
        self.ctx: llama_cpp.llama_context_p = ctx
        self.n_embd = int(llama_cpp.llama_model_n_embd(model))
        self.n_vocab = engine.n_vocab
        self.pooled = llama_cpp.llama_pooling_type(ctx) != llama_cpp.LLAMA_POOLING_TYPE_NONE
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._closed = False

    def set_threads(self, threads: int) -> None:
        """The threads of the next decodes (between decodes, on the thread that decodes)."""
        llama_cpp.llama_set_n_threads(self.ctx, threads, threads)

    # ----- tokens (validation happens here, before any decode) -----

    def tokenize(
        self, inputs: Sequence[EmbeddingInput], truncate: bool
    ) -> tuple[list[list[int]], int]:
        """Token ids per input and how many were truncated; a 400 names the first bad input."""
        limit = self.max_input_tokens
        out: list[list[int]] = []
        truncated = 0
        for index, item in enumerate(inputs):
            if isinstance(item, str):
                tokens = list(
                    self.engine.model.tokenize(item.encode("utf-8"), add_bos=True, special=False)
                )
            else:
                tokens = list(item)
                if any(not 0 <= t < self.n_vocab for t in tokens):
                    raise BadRequestError(
                        f"input[{index}]: token ids must be in [0, {self.n_vocab})", param="input"
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

    # ----- one decode -----

    def decode(self, seqs: Sequence[Sequence[int]], pooling: Pooling) -> NDArray[np.float32]:
        """Raw (unnormalised) vectors of ``seqs``, decoded together in one ``llama_decode``.

        The caller keeps ``len(seqs) <= n_seq_max`` and the total tokens ``<= n_batch``.
        """
        total = sum(len(s) for s in seqs)
        if not seqs or len(seqs) > self.n_seq_max or total > self.n_batch:
            raise ValueError(f"{len(seqs)} sequences of {total} tokens do not fit one batch")
        batch = self._batch
        n = 0
        for seq_id, tokens in enumerate(seqs):
            for pos, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = True
                n += 1
        batch.n_tokens = n
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        status = llama_cpp.llama_decode(self.ctx, batch)
        if status != 0:
            logger.error("llama_decode returned %d for an embedding batch", status)
            raise APIError("the model failed to embed this batch; retry the request")
        out = np.empty((len(seqs), self.n_embd), dtype=np.float32)
        if self.pooled:
            for seq_id in range(len(seqs)):
                pointer = llama_cpp.llama_get_embeddings_seq(self.ctx, seq_id)
                if not pointer:
                    raise APIError("llama.cpp returned no embedding for a sequence")
                out[seq_id] = np.ctypeslib.as_array(
                    ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_embd,)
                )
        else:
            pointer = ctypes.cast(
                llama_cpp.llama_get_embeddings(self.ctx), ctypes.POINTER(ctypes.c_float)
            )
            hidden = np.ctypeslib.as_array(pointer, shape=(total, self.n_embd))
            start = 0
            for i, tokens in enumerate(seqs):
                out[i] = _pool(hidden[start : start + len(tokens)], pooling)
                start += len(tokens)
        return out

    def close(self) -> None:
        """Free the context (on the thread that decodes with it, once it is done)."""
        if not self._closed:
            self._closed = True
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ctx)
