"""One loaded GGUF model and the llama.cpp pieces its scheduler generates with.

:class:`Engine` holds the model's weights, vocabulary and chat template, and nothing that
generates: a generating model's only llama context is the one its scheduler creates with
:meth:`Engine.create_context` (``n_seq_max`` = slots, one KV stream per slot). Tokenizing,
detokenizing and rendering a chat template need only the vocabulary, so they run on any
thread; :meth:`Engine.close` waits for every such thread before it frees the model. An
embedding model also holds its embedding context (``Engine.llm``), driven by its scheduler's
thread only.

The per-sequence pieces (sampler chain, text stream) are in :mod:`llmis.engine.sampling`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import llama_cpp
import numpy as np
from llama_cpp import _internals, llama_chat_format
from llama_cpp._logger import llama_log_callback as _default_log_callback
from llama_cpp._logger import set_verbose as _set_llama_verbose

from llmis.engine.sampling import parse_grammar
from llmis.errors import APIError, BadRequestError, ContextOverflowError, ModelFileError

__all__ = [
    "Engine",
    "FlashAttention",
    "GenerationContext",
    "backend_info",
]

logger = logging.getLogger(__name__)

FlashAttention = Literal["auto", "on", "off"]
_FLASH_ATTN_TYPE = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
# llama.cpp's log line for every KV buffer it allocates (llama-kv-cache.cpp)
_KV_BUFFER = re.compile(r"KV buffer size\s*=\s*([0-9.]+)\s*MiB")
# how llama.cpp reports its choice for flash_attn = auto ("Flash Attention enabled")
_FLASH_RESOLVED = re.compile(r"(?i)flash[ _]?att")


@dataclass(eq=False)
class GenerationContext:
    """A llama context for ``n_seq`` sequences of ``n_ctx_seq`` cells each (its creator
    frees it with :meth:`close`, on the thread that decodes with it)."""

    ctx: llama_cpp.llama_context_p
    n_seq: int
    n_ctx_seq: int
    n_batch: int
    kv_bytes: int  # what llama.cpp allocated for the KV cache
    flash_attn: bool

    freed: bool = False

    def close(self) -> None:
        if not self.freed:
            self.freed = True
            llama_cpp.llama_free(self.ctx)


@contextlib.contextmanager
def _llama_log(lines: list[str]) -> Iterator[None]:
    """Collect llama.cpp's log lines (it reports allocations only there) while in the block."""

    def collect(_level: int, text: bytes, _data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    callback = llama_cpp.llama_log_callback(collect)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(_default_log_callback, ctypes.c_void_p(0))


class Engine:
    """A loaded model (weights, vocabulary, chat template); see the module docstring."""

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
        flash_attn: FlashAttention = "auto",
    ) -> None:
        self.path = path
        self.n_batch = n_batch
        self.threads = threads or 1
        # auto: llama.cpp's choice, as llama-server makes it (on where the backend has the
        # kernel, the CPU included). See README "Prompt cache" for what it means for seeds.
        self.flash_attn: FlashAttention = flash_attn
        self.embedding = embedding
        self._users = 0
        self._users_cond = threading.Condition()
        try:
            llama_cpp.llama_backend_init()  # idempotent; llama-cpp-python does it per Llama
            _set_llama_verbose(False)  # llama.cpp's log: errors only, as Llama(verbose=False)
            params = llama_cpp.llama_model_default_params()
            params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers == -1 else n_gpu_layers
            self.model: _internals.LlamaModel = _internals.LlamaModel(
                path_model=str(path), params=params, verbose=False
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelFileError(f"cannot load {path.name}: {_short(exc)}") from None
        self.vocab = self.model.vocab
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.metadata: dict[str, str] = self.model.metadata()
        # A request can use n_ctx tokens (the generation context rounds it up, to 256)
        self.n_ctx: int = n_ctx
        self.chat_template_source = "none"
        self._formatter = self._make_formatter(chat_format)
        self.chat_stops = self._format_stops()
        arch = self.metadata.get("general.architecture", "")
        # Models that declare a pooling type (BERT-style sentence encoders) only embed. A
        # decoder configured with embedding = true does both: its embedding context beside
        # the scheduler's generation context.
        self.generates = f"{arch}.pooling_type" not in self.metadata

    def check_generates(self, model: str) -> None:
        """Raise a 400 when this model can only produce embeddings."""
        if not self.generates:
            raise BadRequestError(
                f"The model '{model}' is an embedding model; use /v1/embeddings.",
                param="model",
                code="generation_not_supported",
            )

    # ----- users: threads reading the vocabulary outside the scheduler -----

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        """Hold the model for a blocking read on the calling thread; :meth:`close` waits."""
        with self._users_cond:
            if self.model.model is None:
                raise APIError("the model was unloaded", status=503, code="model_unloaded")
            self._users += 1
        try:
            yield
        finally:
            with self._users_cond:
                self._users -= 1
                self._users_cond.notify_all()

    # ----- prompt preparation (any thread: reads the vocabulary only) -----

    def _make_formatter(self, chat_format: str | None) -> llama_chat_format.ChatFormatter | None:
        if chat_format is not None:
            formatter = getattr(llama_chat_format, "format_" + chat_format.replace("-", "_"), None)
            if formatter is None:
                raise ModelFileError(f"unknown chat_format {chat_format!r}")
            self.chat_template_source = f"chat_format:{chat_format}"
            return formatter  # type: ignore[no-any-return]
        template = self.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        eos, bos = self.model.token_eos(), self.model.token_bos()
        self.chat_template_source = "gguf"
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=self.model.token_get_text(eos) if eos != -1 else "",
            bos_token=self.model.token_get_text(bos) if bos != -1 else "",
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

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        with self.use():
            return list(self.model.tokenize(text.encode("utf-8"), add_bos, special))

    @property
    def chat_template(self) -> str | None:
        """The GGUF's Jinja chat template (None under a named ``chat_format``)."""
        if self.chat_template_source != "gguf":
            return None
        return self.metadata.get("tokenizer.chat_template")

    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Render ``messages`` (and ``tools``, for a template that renders them) with the
        model's chat template and tokenize the result."""
        if self._formatter is None:
            raise BadRequestError(
                "this model has no chat template; set chat_format in its config "
                "or use /v1/completions",
                param="messages",
                code="no_chat_template",
            )
        try:
            extra: dict[str, Any] = {"tools": tools} if tools else {}
            result = self._formatter(messages=messages, **extra)  # type: ignore[arg-type]
        except Exception as exc:  # a template raising is a request problem
            raise BadRequestError(
                f"the chat template rejected these messages: {_short(exc)}", param="messages"
            ) from None
        return self.tokenize(result.prompt, add_bos=not result.added_special)

    def text_prompt(self, prompt: str) -> list[int]:
        return self.tokenize(prompt)

    def check_grammar(self, grammar: str | None, param: str = "response_format") -> None:
        """Raise a 400 unless llama.cpp parses ``grammar`` (GBNF, 'root' rule)."""
        if grammar is None:
            return
        with self.use():
            llama_cpp.llama_sampler_free(parse_grammar(self.vocab, grammar, param))

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

    # ----- the generation context (the scheduler's thread) -----

    def create_context(self, n_seq: int) -> GenerationContext:
        """A llama context for ``n_seq`` sequences with ``n_ctx`` KV cells for each.

        One KV stream per sequence (``kv_unified`` off), chosen by measurement: in a unified
        cache a sequence's logits depend on where its cells land among the other sequences'
        (a seeded request would give another output in another slot), while a stream of its
        own starts at cell 0 in every slot, and its attention spans only its own cells.
        """
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx * n_seq
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = self.threads
        params.flash_attn_type = _FLASH_ATTN_TYPE[self.flash_attn]
        params.kv_unified = False
        params.embeddings = False
        params.no_perf = True
        lines: list[str] = []
        with _llama_log(lines):
            ctx = llama_cpp.llama_init_from_model(self.model.model, params)
        if not ctx:
            errors = [line.strip() for line in lines if "error" in line.lower()]
            raise ModelFileError(
                f"cannot create a context for {self.path.name}"
                + (f": {errors[-1]}" if errors else "")
            )
        kv_bytes = sum(int(float(m) * 1024 * 1024) for m in _KV_BUFFER.findall("".join(lines)))
        n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(ctx))
        self.n_ctx = min(self.n_ctx, n_ctx_seq)
        flash = self.flash_attn == "on" or any(
            _FLASH_RESOLVED.search(line) and "enabled" in line for line in lines
        )
        return GenerationContext(ctx, n_seq, n_ctx_seq, self.n_batch, kv_bytes, flash)

    def score_continuations(
        self, prompt: Sequence[int], continuations: Sequence[Sequence[int]]
    ) -> list[float]:
        """The log-probability of each continuation's tokens right after ``prompt`` (the sum
        of each token's log-softmax), from the model's logits. Blocking; it makes a small
        context of its own, so it runs on any thread that holds the model."""
        if not prompt or not continuations or any(not c for c in continuations):
            raise BadRequestError("nothing to score", param="labels")
        longest = max(len(c) for c in continuations)
        if len(prompt) + longest >= self.n_ctx:
            raise ContextOverflowError(
                f"This model's maximum context length is {self.n_ctx} tokens; the prompt "
                f"({len(prompt)}) and a label ({longest}) do not fit.",
                param="messages",
            )
        with self.use():
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = len(prompt) + longest + 1
            params.n_batch = params.n_ubatch = self.n_batch
            params.n_seq_max = 1
            params.n_threads = params.n_threads_batch = self.threads
            params.flash_attn_type = _FLASH_ATTN_TYPE["off"]
            params.embeddings = False
            params.no_perf = True
            ctx = llama_cpp.llama_init_from_model(self.model.model, params)
            if not ctx:
                raise APIError("could not create a context to score labels")
            batch: Any = llama_cpp.llama_batch_init(max(self.n_batch, longest), 0, 1)
            try:
                return self._score(ctx, batch, prompt, continuations)
            finally:
                llama_cpp.llama_batch_free(batch)
                llama_cpp.llama_free(ctx)

    def _score(
        self,
        ctx: llama_cpp.llama_context_p,
        batch: Any,  # a llama_batch (its ctypes fields are loosely typed)
        prompt: Sequence[int],
        continuations: Sequence[Sequence[int]],
    ) -> list[float]:
        def decode(tokens: Sequence[int], start: int, all_logits: bool) -> None:
            for i, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = all_logits or i == len(tokens) - 1
            batch.n_tokens = len(tokens)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise APIError("the model failed to evaluate the labels")

        def log_softmax(index: int) -> np.ndarray[Any, Any]:
            raw = llama_cpp.llama_get_logits_ith(ctx, index)
            logits = np.ctypeslib.as_array(raw, shape=(self.n_vocab,)).astype(np.float64)
            shifted = logits - logits.max()
            return shifted - np.log(np.exp(shifted).sum())  # type: ignore[no-any-return]

        for start in range(0, len(prompt), self.n_batch):
            decode(prompt[start : start + self.n_batch], start, False)
        first = log_softmax(-1)
        mem = llama_cpp.llama_get_memory(ctx)
        scores = []
        for tokens in continuations:
            total = float(first[tokens[0]])
            if len(tokens) > 1:
                llama_cpp.llama_memory_seq_rm(mem, 0, len(prompt), -1)
                decode(tokens[:-1], len(prompt), True)
                for i, token in enumerate(tokens[1:]):
                    total += float(log_softmax(i)[token])
            scores.append(total)
        return scores

    def close(self, timeout: float = 30.0) -> bool:
        """Free the model once no thread uses it; ``False`` (leaked) if one still did."""
        with self._users_cond:
            if not self._users_cond.wait_for(lambda: self._users == 0, timeout):
                logger.error("model %s is still in use; it is not freed", self.path.name)
                return False
            self.model.close()
        return True


def _short(exc: BaseException) -> str:
    """An exception's message without server paths."""
    return re.sub(r"(/[^\s:'\"]+)+/", "", str(exc))[:300]


def backend_info() -> dict[str, str]:
    """The llama-cpp-python version and llama.cpp's system info (CPU features, backends)."""
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
    }
