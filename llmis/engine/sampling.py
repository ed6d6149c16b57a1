"""Sampling one sequence: its settings, a native llama.cpp sampler chain, and its text.

* :class:`SamplingParams`: one job's sampling settings (defaults follow llama-server).
* :class:`Sampler`, a native llama.cpp sampler chain (logit bias, penalties, top-k, top-p,
  min-p, temperature, seeded dist). A ``response_format`` grammar is kept out of the chain:
  llama.cpp aborts the whole process when a grammar is made to accept a token it rejects,
  and other samplers in a chain can pick one (a NaN from an extreme penalty, a top-k that
  cuts every allowed token). The grammar filters the candidates first, the chain samples
  among what is left, and a token is accepted only after the grammar allowed it.
* :class:`TextStream`, which turns sampled tokens into text, matching stop strings on the
  decoded text and holding back any tail that could start one.
"""

from __future__ import annotations

import codecs
import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import llama_cpp
import numpy as np
from llama_cpp import _internals

from llmis.errors import APIError, BadRequestError

__all__ = [
    "FinishReason",
    "Sampler",
    "SamplingError",
    "SamplingParams",
    "Step",
    "TextStream",
    "parse_grammar",
    "token_piece",
]

FinishReason = Literal["stop", "length", "content_filter"]
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class SamplingError(APIError):
    """A sequence could not be sampled (its grammar allows no token); only it fails."""

    status = 400
    type = "invalid_request_error"


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one job; defaults follow llama-server."""

    max_tokens: int
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None  # GBNF with a 'root' rule (response_format)


@dataclass(frozen=True)
class Step:
    """What one generation step produced: new text, and a finish reason on the last step."""

    text: str
    completion_tokens: int
    finish_reason: FinishReason | None = None
    stop_sequence: str | None = None  # the stop string that ended it, if one did


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:size]):
                best = size
                break
    return best


def token_piece(vocab: llama_cpp.llama_vocab_p, token: int) -> bytes:
    """The bytes of ``token`` (special tokens render as empty)."""
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    return buf.raw[:n]


def parse_grammar(
    vocab: llama_cpp.llama_vocab_p, grammar: str, param: str = "response_format"
) -> llama_cpp.llama_sampler_p:
    parsed = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not parsed:
        raise BadRequestError(f"the {param} grammar could not be parsed", param=param)
    return parsed  # type: ignore[no-any-return]


class Sampler:
    """One sequence's sampling state: a native chain, and its grammar kept apart (see above).

    Not thread-safe: the scheduler thread samples; :meth:`close` frees the native objects.
    """

    def __init__(self, params: SamplingParams, vocab: llama_cpp.llama_vocab_p) -> None:
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        chain = _internals.LlamaSampler()
        if params.logit_bias:
            chain.add_logit_bias(self.n_vocab, params.logit_bias)
        if (params.repeat_penalty, params.frequency_penalty, params.presence_penalty) != (
            1.0,
            0.0,
            0.0,
        ):
            chain.add_penalties(
                n_vocab=self.n_vocab,
                penalty_last_n=64,
                penalty_repeat=params.repeat_penalty,
                penalty_freq=params.frequency_penalty,
                penalty_present=params.presence_penalty,
            )
        if params.temperature <= 0:
            chain.add_greedy()
        else:
            chain.add_top_k(params.top_k)
            chain.add_top_p(params.top_p, 1)
            chain.add_min_p(params.min_p, 1)
            chain.add_temp(params.temperature)
            seed = params.seed if params.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
            chain.add_dist(seed & 0xFFFFFFFF)
        self._chain = chain
        self._grammar: llama_cpp.llama_sampler_p | None = None
        self._candidates: np.ndarray[Any, Any] | None = None
        if params.grammar is not None:
            try:
                self._grammar = parse_grammar(vocab, params.grammar)
            except APIError:
                chain.close()
                raise

    def sample(self, ctx: llama_cpp.llama_context_p, index: int) -> int:
        """Sample (and accept) the next token from the logits at batch ``index``."""
        if self._grammar is None:
            return int(llama_cpp.llama_sampler_sample(self._chain.sampler, ctx, index))
        logits = llama_cpp.llama_get_logits_ith(ctx, index)
        return self._sample_array(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)))

    def sample_logits(self, logits: np.ndarray[Any, Any]) -> int:
        """Sample (and accept) the next token from a saved row of logits.

        Gives the token :meth:`sample` gives for the same logits: llama.cpp's
        ``llama_sampler_sample`` applies the chain to the same candidate array.
        """
        return self._sample_array(logits)

    def _sample_array(self, logits: np.ndarray[Any, Any]) -> int:
        if self._candidates is None:
            self._candidates = np.zeros(self.n_vocab, dtype=_TOKEN_DATA)
            self._ids = np.arange(self.n_vocab, dtype=np.int32)
        cand = self._candidates
        cand["id"] = self._ids  # the chain sorts the array in place: reset it every token
        cand["logit"] = logits
        cand["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=cand.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=self.n_vocab,
            selected=-1,
            sorted=False,
        )
        allowed: np.ndarray[Any, Any] | None = None
        if self._grammar is not None:
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
            allowed = cand["logit"].copy()  # rejected tokens are -inf now; ids still 0..n-1
            if not np.isfinite(allowed).any():
                raise SamplingError(
                    "the response_format grammar allows no token here; the generation was stopped",
                    param="response_format",
                    code="grammar_dead_end",
                )
        llama_cpp.llama_sampler_apply(self._chain.sampler, ctypes.byref(array))
        token = -1
        if 0 <= array.selected < array.size:
            token = int(cand["id"][array.selected])
        if allowed is not None and not (0 <= token < self.n_vocab and np.isfinite(allowed[token])):
            # the chain picked a token the grammar rejects (NaN weights, or a truncation
            # that left no allowed candidate): take the most likely allowed one instead
            token = int(np.argmax(np.where(np.isfinite(allowed), allowed, -np.inf)))
        llama_cpp.llama_sampler_accept(self._chain.sampler, token)
        if self._grammar is not None:
            llama_cpp.llama_sampler_accept(self._grammar, token)
        return token

    def close(self) -> None:
        self._chain.close()
        if self._grammar is not None:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None


class TextStream:
    """Turns one sequence's sampled tokens into :class:`Step` s.

    Decodes UTF-8 incrementally, matches stop strings on the decoded text (holding back any
    tail that could start one), and ends on end-of-generation or ``max_tokens``.
    """

    def __init__(self, vocab: llama_cpp.llama_vocab_p, params: SamplingParams) -> None:
        self._vocab = vocab
        self._params = params
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._sent = 0
        self.completion_tokens = 0

    def _finish(self, reason: FinishReason) -> Step:
        self._text += self._decoder.decode(b"", final=True)
        return Step(self._text[self._sent :], self.completion_tokens, reason)

    def push(self, token: int) -> Step | None:
        """Feed one sampled token; return the text it released, if any, or the last step."""
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            return self._finish("stop")
        self.completion_tokens += 1
        text = self._text = self._text + self._decoder.decode(token_piece(self._vocab, token))
        sent, stops = self._sent, self._params.stop
        if stops:
            start = max(0, sent - max(len(s) for s in stops))
            hits = [(i, s) for i, s in ((text.find(s, start), s) for s in stops) if i >= 0]
            if hits:
                at, stop = min(hits, key=lambda hit: hit[0])
                return Step(text[sent:at], self.completion_tokens, "stop", stop)
        if self.completion_tokens >= self._params.max_tokens:
            return self._finish("length")
        end = len(text) - _stop_holdback(text, stops)
        if end <= sent:
            return None
        self._sent = end
        return Step(text[sent:end], self.completion_tokens)
