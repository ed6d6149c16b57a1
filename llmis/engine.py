"""One loaded GGUF model and its generation loop (blocking; runs on the model's worker thread).

The loop is built from llama-cpp-python's pieces rather than ``Llama.create_completion`` so that
it can count tokens exactly, stop between any two tokens, apply ``logit_bias`` natively and
report a truthful ``finish_reason``:

* prompt-prefix reuse: tokens already in the KV cache from the previous job are kept;
* a native llama.cpp sampler chain per job (logit bias, penalties, top-k, top-p, min-p, temp);
* stop strings are matched on decoded text, holding back any tail that could start one;
* llama.cpp's abort callback stops a long prompt evaluation when the job is cancelled.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import llama_cpp
from llama_cpp import _internals, llama_chat_format

from llmis.errors import BadRequestError, ContextOverflowError, ModelFileError

__all__ = [
    "ABORT_MIN_TOKENS",
    "Engine",
    "FinishReason",
    "GenerationCancelled",
    "SamplingParams",
    "Step",
    "TextStream",
    "build_sampler",
    "token_piece",
]

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "content_filter"]
# Prompt suffixes shorter than this are evaluated without the abort callback: the callback
# is a Python call per graph node, cheap once but not on every single-token decode.
ABORT_MIN_TOKENS = 32


class GenerationCancelled(Exception):
    """The job was cancelled while llama.cpp was evaluating its prompt."""


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


def build_sampler(
    params: SamplingParams, vocab: llama_cpp.llama_vocab_p
) -> _internals.LlamaSampler:
    """A native llama.cpp sampler chain for ``params`` (the caller closes it)."""
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    sampler = _internals.LlamaSampler()
    if params.logit_bias:
        sampler.add_logit_bias(n_vocab, params.logit_bias)
    if params.grammar is not None:
        grammar = llama_cpp.llama_sampler_init_grammar(
            vocab, params.grammar.encode("utf-8"), b"root"
        )
        if not grammar:
            sampler.close()
            raise BadRequestError(
                "the response_format grammar could not be parsed", param="response_format"
            )
        llama_cpp.llama_sampler_chain_add(sampler.sampler, grammar)
    if (params.repeat_penalty, params.frequency_penalty, params.presence_penalty) != (
        1.0,
        0.0,
        0.0,
    ):
        sampler.add_penalties(
            n_vocab=n_vocab,
            penalty_last_n=64,
            penalty_repeat=params.repeat_penalty,
            penalty_freq=params.frequency_penalty,
            penalty_present=params.presence_penalty,
        )
    if params.temperature <= 0:
        sampler.add_greedy()
    else:
        sampler.add_top_k(params.top_k)
        sampler.add_top_p(params.top_p, 1)
        sampler.add_min_p(params.min_p, 1)
        sampler.add_temp(params.temperature)
        seed = params.seed if params.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        sampler.add_dist(seed & 0xFFFFFFFF)
    return sampler


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
            hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
            if hits:
                return Step(text[sent : min(hits)], self.completion_tokens, "stop")
        if self.completion_tokens >= self._params.max_tokens:
            return self._finish("length")
        end = len(text) - _stop_holdback(text, stops)
        if end <= sent:
            return None
        self._sent = end
        return Step(text[sent:end], self.completion_tokens)


class Engine:
    """A llama.cpp model + context. Not thread-safe: one worker thread drives it."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int,
        n_batch: int = 512,
        n_gpu_layers: int = 0,
        threads: int | None = None,
        chat_format: str | None = None,
        embedding: bool = False,
        flash_attn: bool = False,
    ) -> None:
        self.path = path
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_gpu_layers=n_gpu_layers,
                n_threads=threads,
                n_threads_batch=threads,
                embedding=embedding,
                flash_attn=flash_attn,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelFileError(f"cannot load {path.name}: {exc}") from None
        # llama.cpp may round the context up; llama-cpp-python's token buffers keep the
        # requested size, so the smaller of the two is what a request can use.
        self.n_ctx: int = min(int(self.llm.n_ctx()), int(self.llm.context_params.n_ctx))
        self._vocab = self.llm._model.vocab
        self.reused_tokens = 0  # prompt tokens the last generate() took from the KV cache
        self._cancel: threading.Event | None = None
        self._abort_cb = llama_cpp.ggml_abort_callback(self._should_abort)
        self._abort_installed = False
        self.chat_template_source = "none"
        self._formatter = self._make_formatter(chat_format)
        self.chat_stops = self._format_stops()
        arch = self.llm.metadata.get("general.architecture", "")
        # Models that declare a pooling type (BERT-style sentence encoders) only embed.
        self.generates = f"{arch}.pooling_type" not in self.llm.metadata

    def check_generates(self, model: str) -> None:
        """Raise a 400 when this model can only produce embeddings."""
        if not self.generates:
            raise BadRequestError(
                f"The model '{model}' is an embedding model; use /v1/embeddings.",
                param="model",
                code="generation_not_supported",
            )

    # ----- prompt preparation (thread-safe: reads the vocab only) -----

    def _make_formatter(self, chat_format: str | None) -> llama_chat_format.ChatFormatter | None:
        if chat_format is not None:
            formatter = getattr(llama_chat_format, "format_" + chat_format.replace("-", "_"), None)
            if formatter is None:
                raise ModelFileError(f"unknown chat_format {chat_format!r}")
            self.chat_template_source = f"chat_format:{chat_format}"
            return formatter  # type: ignore[no-any-return]
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        model = self.llm._model
        eos, bos = self.llm.token_eos(), self.llm.token_bos()
        self.chat_template_source = "gguf"
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
        )

    @property
    def has_chat_template(self) -> bool:
        return self._formatter is not None

    def _format_stops(self) -> tuple[str, ...]:
        """Plain-text stop strings of a named chat format (e.g. '###' for snoozy).

        A GGUF template's stop is its end-of-generation token, which ends generation anyway.
        """
        if self._formatter is None or self.chat_template_source == "gguf":
            return ()
        stop = self._formatter(messages=[{"role": "user", "content": "x"}]).stop
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        return tuple(s for s in stops if s)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Render ``messages`` with the model's chat template and tokenize the result."""
        if self._formatter is None:
            raise BadRequestError(
                "this model has no chat template; set chat_format in its config "
                "or use /v1/completions",
                param="messages",
                code="no_chat_template",
            )
        try:
            result = self._formatter(messages=messages)  # type: ignore[arg-type]
        except Exception as exc:  # a template raising is a request problem
            raise BadRequestError(
                f"the chat template rejected these messages: {exc}", param="messages"
            ) from None
        return self.llm.tokenize(
            result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True
        )

    def check_grammar(self, grammar: str | None) -> None:
        """Raise a 400 unless llama.cpp parses ``grammar`` (GBNF, 'root' rule)."""
        if grammar is None:
            return
        parsed = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not parsed:
            raise BadRequestError(
                "the response_format grammar could not be parsed", param="response_format"
            )
        llama_cpp.llama_sampler_free(parsed)

    def text_prompt(self, prompt: str) -> list[int]:
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)

    def check_context(self, n_prompt: int, max_tokens: int | None, param: str) -> int:
        """Return the effective ``max_tokens``; raise if the request cannot fit the context."""
        if n_prompt == 0:
            raise BadRequestError("the prompt is empty", param=param)
        if n_prompt >= self.n_ctx:
            raise ContextOverflowError(
                f"This model's maximum context length is {self.n_ctx} tokens, "
                f"but the prompt has {n_prompt} tokens.",
                param=param,
            )
        if max_tokens is None:
            return self.n_ctx - n_prompt
        if n_prompt + max_tokens > self.n_ctx:
            raise ContextOverflowError(
                f"This model's maximum context length is {self.n_ctx} tokens. However, you "
                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, "
                f"{max_tokens} for the completion). Reduce the prompt or max_tokens.",
                param="max_tokens",
            )
        return max_tokens

    # ----- generation (worker thread only) -----

    def _should_abort(self, _data: ctypes.c_void_p) -> bool:
        cancel = self._cancel
        return cancel is not None and cancel.is_set()

    def _set_abort(self, on: bool) -> None:
        if on == self._abort_installed:
            return
        callback = self._abort_cb if on else llama_cpp.ggml_abort_callback()
        llama_cpp.llama_set_abort_callback(self.llm._ctx.ctx, callback, None)
        self._abort_installed = on

    def _eval(self, tokens: Sequence[int]) -> None:
        self._set_abort(len(tokens) >= ABORT_MIN_TOKENS)
        try:
            self.llm.eval(tokens)
        except RuntimeError:
            if self._cancel is not None and self._cancel.is_set():
                raise GenerationCancelled from None
            raise

    def _reuse_prefix(self, prompt: Sequence[int], reuse: bool) -> list[int]:
        """Keep the KV-cache prefix shared with ``prompt``; return the tokens still to evaluate.

        Without ``reuse`` the whole prompt is evaluated: logits then do not depend on how the
        previous request split the prompt into batches, so seeded sampling is reproducible.
        """
        llm = self.llm
        cached = llm.input_ids[: llm.n_tokens] if reuse else ()
        keep = 0
        for a, b in zip(cached, prompt, strict=False):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(prompt) - 1)  # always evaluate one token to get fresh logits
        if keep > 0 and llm._ctx.kv_cache_seq_rm(-1, keep, -1):
            llm.n_tokens = keep
        else:
            llm.reset()
            keep = 0
        self.reused_tokens = keep
        return list(prompt[keep:])

    def generate(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        cancel: threading.Event,
    ) -> Iterator[Step]:
        """Yield :class:`Step` s; the last one has a ``finish_reason``.

        Stops (without a final step) as soon as ``cancel`` is set; raises
        :class:`GenerationCancelled` when cancelled during prompt evaluation.
        """
        self._cancel = cancel
        sampler = build_sampler(params, self._vocab)
        try:
            self._eval(self._reuse_prefix(prompt, reuse=params.seed is None))
            out = TextStream(self._vocab, params)
            while not cancel.is_set():
                token = sampler.sample(self.llm._ctx, -1)
                step = out.push(token)
                if step is not None:
                    yield step
                    if step.finish_reason is not None:
                        return
                self._eval([token])
        finally:
            self._cancel = None
            self._set_abort(False)
            sampler.close()

    def close(self) -> None:
        self.llm.close()
