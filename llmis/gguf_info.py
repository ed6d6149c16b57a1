"""GGUF file metadata, read without loading the model (the ``gguf`` package's reader).

Gives what the catalog, ``llmis models`` and the memory predictor need: architecture,
parameter count, quant type, training context length, chat template presence, and the
attention shape that sizes the KV cache. A file that is not GGUF, or is truncated, raises
:class:`~llmis.errors.ModelFileError`.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf

from llmis.errors import ModelFileError

__all__ = ["GGUFInfo", "GGUFInfoCache", "read_gguf_info"]

_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFInfo:
    path: str
    file_size: int
    name: str | None
    architecture: str
    parameters: int
    quant: str
    context_length: int | None
    has_chat_template: bool
    block_count: int | None
    embedding_length: int | None
    head_count: int | None
    head_count_kv: int | None
    key_length: int | None
    value_length: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def kv_cache_bytes(self, n_ctx: int, bytes_per_value: int = 2) -> int:
        """Size of an f16 KV cache for ``n_ctx`` tokens (0 when the shape is unknown)."""
        if not (self.block_count and self.embedding_length and self.head_count):
            return 0
        head_dim = self.embedding_length // self.head_count
        kv_heads = self.head_count_kv or self.head_count
        k = (self.key_length or head_dim) * kv_heads
        v = (self.value_length or head_dim) * kv_heads
        return self.block_count * n_ctx * (k + v) * bytes_per_value


def _scalar(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        return None
    try:
        return field.contents()
    except (IndexError, ValueError):
        return None


def _int(value: Any) -> int | None:
    if isinstance(value, list):  # per-layer values (e.g. head_count_kv): take the largest
        value = max(value) if value else None
    return int(value) if isinstance(value, int | float) else None


def read_gguf_info(path: Path) -> GGUFInfo:
    """Read the metadata of the GGUF file at ``path``."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelFileError(f"cannot read {path.name}: {exc.strerror}") from None
    if magic != _MAGIC:
        raise ModelFileError(f"{path.name} is not a GGUF file (bad magic {magic!r})")
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except (ValueError, IndexError, OSError, TypeError) as exc:
        raise ModelFileError(f"{path.name} is not a valid GGUF file (truncated?): {exc}") from None
    size = path.stat().st_size
    last = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if last > size:
        raise ModelFileError(f"{path.name} is truncated: tensors end at {last}, file has {size}")
    arch = str(_scalar(reader, "general.architecture") or "unknown")
    file_type = _scalar(reader, "general.file_type")
    try:
        quant = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        quant = "unknown"
    params = _int(_scalar(reader, "general.parameter_count")) or sum(
        int(t.n_elements) for t in reader.tensors
    )

    def arch_int(key: str) -> int | None:
        return _int(_scalar(reader, f"{arch}.{key}"))

    return GGUFInfo(
        path=str(path),
        file_size=size,
        name=_scalar(reader, "general.name"),
        architecture=arch,
        parameters=params,
        quant=quant,
        context_length=arch_int("context_length"),
        has_chat_template=reader.get_field("tokenizer.chat_template") is not None,
        block_count=arch_int("block_count"),
        embedding_length=arch_int("embedding_length"),
        head_count=arch_int("attention.head_count"),
        head_count_kv=arch_int("attention.head_count_kv"),
        key_length=arch_int("attention.key_length"),
        value_length=arch_int("attention.value_length"),
    )


class GGUFInfoCache:
    """Memoises :func:`read_gguf_info` by (path, size, mtime); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, int, int], GGUFInfo] = {}

    def get(self, path: Path) -> GGUFInfo:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        info = read_gguf_info(path)
        with self._lock:
            self._cache[key] = info
        return info
