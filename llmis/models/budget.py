"""Model memory: the RAM budget, predicting a model's RAM before a load, measuring it after.

A prediction is the file size (llama.cpp maps the weights and populates the mapping), plus the
f16 KV cache for ``n_ctx`` tokens (from the GGUF shape), plus an overhead for compute buffers
and the vocabulary tables. The overhead constants were fitted on the two bundled models
(SmolLM2-135M, Gemma-3-270M) at n_ctx 512..8192: ``scripts/bench_models.py`` prints the
prediction error. A measurement is the change of this process's RSS over the load.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from llmis.models.gguf import GGUFInfo

__all__ = [
    "MIN_DEFAULT_CTX",
    "MemoryPrediction",
    "fitting_context",
    "parse_budget",
    "predict_memory",
    "process_rss",
    "release_free_heap",
    "resolve_budget",
]

MiB = 1024 * 1024
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z%]*)\s*$")

# Fitted overhead: a fixed part, per batch-token activations, and per vocabulary entry
# (llama.cpp's token tables and piece cache).
_FIXED_OVERHEAD = 8 * MiB
_PER_BATCH_EMBD = 16  # bytes per (n_batch x n_embd)
_PER_VOCAB = 170  # bytes per vocabulary entry
_KV_PAD = 256  # llama.cpp pads each sequence's KV stream (llama-context.cpp, n_ctx_seq)


def parse_budget(value: int | str) -> tuple[float, bool]:
    """``(number, is_percent)`` from ``8000000000``, ``"6GiB"``, ``"512MB"`` or ``"75%"``.

    Raises ``ValueError`` with a readable message on anything else.
    """
    if isinstance(value, bool):
        raise ValueError("ram_budget must be a byte count or a string like '75%' or '6GiB'")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("ram_budget must be positive")
        return float(value), False
    match = _SIZE.match(value)
    unit = match.group(2).lower() if match else ""
    if match is None or (unit != "%" and unit not in _UNITS):
        raise ValueError(
            f"ram_budget {value!r} is not a size: write bytes (8000000000), "
            "a size with a unit ('6GiB', '512MB') or a percent of RAM ('75%')"
        )
    number = float(match.group(1))
    if unit == "%":
        if not 0 < number <= 100:
            raise ValueError(f"ram_budget {value!r}: a percent must be in (0, 100]")
        return number, True
    if number <= 0:
        raise ValueError("ram_budget must be positive")
    return number * _UNITS[unit], False


def resolve_budget(value: int | str, total: int | None = None) -> int:
    """The budget in bytes; a percent is of the machine's total RAM (psutil)."""
    number, percent = parse_budget(value)
    if not percent:
        return int(number)
    total = total if total is not None else psutil.virtual_memory().total
    return int(total * number / 100)


@dataclass(frozen=True)
class MemoryPrediction:
    weights: int
    kv_cache: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead


def predict_memory(
    info: GGUFInfo, n_ctx: int, n_batch: int, slots: int = 1, embedding_outputs: int = 0
) -> MemoryPrediction:
    """Predicted RSS growth of loading ``info`` with ``slots`` KV streams of ``n_ctx`` cells
    (CPU, f16 KV cache; llama.cpp rounds each stream up to a multiple of 256 cells).

    ``embedding_outputs``: the output rows of the model's embedding contexts together (see
    :func:`~llmis.engine.embedding_scheduler.embedding_outputs`). llama.cpp keeps
    ``n_vocab`` floats of logits per output row in every context, embedding ones included,
    and an embedding context outputs every token of its batch."""
    n_embd = info.embedding_length or 0
    n_vocab = info.vocab_size or 0
    overhead = _FIXED_OVERHEAD + _PER_BATCH_EMBD * min(n_batch, n_ctx) * n_embd
    overhead += _PER_VOCAB * n_vocab
    overhead += 4 * n_vocab * embedding_outputs
    cells = -(-n_ctx // _KV_PAD) * _KV_PAD * slots
    return MemoryPrediction(info.file_size, info.kv_cache_bytes(cells), overhead)


MIN_DEFAULT_CTX = 512  # a context default never goes below this (unless trained shorter)


def fitting_context(info: GGUFInfo, n_batch: int, slots: int, budget: int) -> tuple[int, int]:
    """The default context of a model that names none: its trained length, halved while the
    predicted memory of ``slots`` streams exceeds ``budget``. Returns ``(n_ctx, trained)``."""
    trained = info.context_length or 0
    if trained <= 0:
        return MIN_DEFAULT_CTX, 0
    n_ctx = trained
    floor = min(trained, MIN_DEFAULT_CTX)
    while n_ctx > floor and predict_memory(info, n_ctx, n_batch, slots).total > budget:
        n_ctx = max(floor, n_ctx // 2)
    return n_ctx, trained


def process_rss() -> int:
    """Resident set size of this process, in bytes."""
    return int(psutil.Process().memory_info().rss)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once (``find_library`` spawns ``ldconfig -p``).

    The symbols already loaded in this process are searched first (``dlopen(NULL)``), so in
    the usual case no library is looked up at all; None on musl and other platforms."""
    if not sys.platform.startswith("linux"):
        return None
    for searched in ("this process", "libc"):
        name = None if searched == "this process" else ctypes.util.find_library("c")
        try:
            trim = ctypes.CDLL(name).malloc_trim
        except (OSError, AttributeError, TypeError):  # musl has no malloc_trim
            continue
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        found: Callable[[int], int] = trim
        return found
    return None


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so RSS reflects frees."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
