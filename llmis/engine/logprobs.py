"""Log-probabilities of sampled tokens, and their OpenAI shapes.

:func:`token_logprob` runs on the scheduler thread right after a sequence sampled: it reads the
same logits row the sampler read (``llama_get_logits_ith`` at the sequence's batch index, so
no ``logits_all`` for the prompt) and takes its log-softmax. The values are those of the
model's distribution before any sampling transform (temperature, top-k/p, penalties,
grammar), as llama-server reports them by default. The cost is one pass over the vocabulary
per token (numpy; measured in the issue note).

:func:`chat_logprobs` and :func:`completion_logprobs` give the ``logprobs`` objects of chat
(``{"content": [...]}``) and legacy completions (``tokens`` / ``token_logprobs`` /
``top_logprobs`` / ``text_offset``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

from llmis.engine.sampling import token_piece

__all__ = ["TokenLogprob", "chat_logprobs", "completion_logprobs", "token_logprob"]


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token: its bytes, its log-probability and the ``top`` most likely ones."""

    token: int
    piece: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()

    @property
    def text(self) -> str:
        return self.piece.decode("utf-8", errors="replace")


def _finite(value: float) -> float:
    # -inf cannot be sent as JSON: the most negative float32-safe number stands in for it
    return value if math.isfinite(value) else -9999.0


def token_logprob(
    row: np.ndarray[Any, Any],
    vocab: llama_cpp.llama_vocab_p,
    token: int,
    top: int,
) -> TokenLogprob:
    """The log-probability of ``token`` under the logits ``row``, and the ``top`` best tokens."""
    n_vocab = row.shape[0]
    peak = float(row.max())
    log_total = peak + math.log(float(np.exp(row - peak).sum(dtype=np.float64)))
    best: tuple[tuple[bytes, float], ...] = ()
    if top > 0:
        k = min(top, n_vocab)
        ids = np.argpartition(row, n_vocab - k)[n_vocab - k :]
        ids = ids[np.argsort(-row[ids], kind="stable")]
        best = tuple((token_piece(vocab, int(i)), _finite(float(row[i]) - log_total)) for i in ids)
    value = _finite(float(row[token]) - log_total)
    return TokenLogprob(token, token_piece(vocab, token), value, best)


def _entry(piece: bytes, logprob: float) -> dict[str, Any]:
    return {
        "token": piece.decode("utf-8", errors="replace"),
        "logprob": logprob,
        "bytes": list(piece),
    }


def chat_logprobs(items: Sequence[TokenLogprob]) -> dict[str, Any]:
    """Chat's ``choices[i].logprobs``: one entry per token, each with its ``top_logprobs``."""
    return {
        "content": [
            {
                **_entry(item.piece, item.logprob),
                "top_logprobs": [_entry(piece, lp) for piece, lp in item.top],
            }
            for item in items
        ],
        "refusal": None,
    }


def completion_logprobs(items: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """Legacy completions' ``choices[i].logprobs``; ``offset`` is the text already sent."""
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item.text)
    return {
        "tokens": [item.text for item in items],
        "token_logprobs": [item.logprob for item in items],
        "top_logprobs": [
            {piece.decode("utf-8", errors="replace"): lp for piece, lp in item.top}
            for item in items
        ],
        "text_offset": offsets,
    }
