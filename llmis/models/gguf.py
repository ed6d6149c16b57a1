"""GGUF file metadata, read without loading the model (header only; large arrays skipped).

Gives what the catalog, ``llmis models`` and the memory predictor need: architecture,
parameter count, quant type, training context length, chat template presence, and the
attention shape that sizes the KV cache. A file that is not GGUF, or is truncated, raises
:class:`~llmis.errors.ModelFileError`.
"""

from __future__ import annotations

import math
import os
import struct
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

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
    vocab_size: int | None = None

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


class _Array:
    """A GGUF array value that was skipped rather than read: only its length is kept."""

    def __init__(self, count: int) -> None:
        self.count = count


_SCALARS: dict[int, struct.Struct] = {
    gguf.GGUFValueType.UINT8: struct.Struct("<B"),
    gguf.GGUFValueType.INT8: struct.Struct("<b"),
    gguf.GGUFValueType.UINT16: struct.Struct("<H"),
    gguf.GGUFValueType.INT16: struct.Struct("<h"),
    gguf.GGUFValueType.UINT32: struct.Struct("<I"),
    gguf.GGUFValueType.INT32: struct.Struct("<i"),
    gguf.GGUFValueType.FLOAT32: struct.Struct("<f"),
    gguf.GGUFValueType.BOOL: struct.Struct("<?"),
    gguf.GGUFValueType.UINT64: struct.Struct("<Q"),
    gguf.GGUFValueType.INT64: struct.Struct("<q"),
    gguf.GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_SMALL_ARRAY = 4096  # numeric arrays up to this length are read (per-layer values)


class _Truncated(Exception):
    pass


class _Header:
    """Streams the GGUF header (key/values, tensor infos) and seeks past large arrays.

    The ``gguf`` package's reader builds a Python object per array element, which takes
    tens of seconds on a 262k-token vocabulary; this reads only what the catalog needs.
    """

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self._f = handle
        self._size = size

    def read(self, n: int) -> bytes:
        data = self._f.read(n)
        if len(data) != n:
            raise _Truncated
        return data

    def skip(self, n: int) -> None:
        if self._f.tell() + n > self._size:
            raise _Truncated
        self._f.seek(n, 1)

    def u32(self) -> int:
        return int(_U32.unpack(self.read(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self.read(8))[0])

    def string(self) -> str:
        n = self.u64()
        if n > self._size:
            raise _Truncated
        return self.read(n).decode("utf-8", "replace")

    def value(self, vtype: int) -> Any:
        if vtype == gguf.GGUFValueType.STRING:
            return self.string()
        if vtype == gguf.GGUFValueType.ARRAY:
            return self.array()
        scalar = _SCALARS.get(vtype)
        if scalar is None:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return scalar.unpack(self.read(scalar.size))[0]

    def array(self) -> list[Any] | _Array:
        atype, count = self.u32(), self.u64()
        scalar = _SCALARS.get(atype)
        if scalar is not None:
            if count <= _SMALL_ARRAY:
                data = self.read(scalar.size * count)
                return [v[0] for v in scalar.iter_unpack(data)]
            self.skip(scalar.size * count)
        elif atype == gguf.GGUFValueType.STRING:
            for _ in range(count):
                self.skip(self.u64())
        else:
            for _ in range(count):
                self.value(atype)
        return _Array(count)

    def position(self) -> int:
        return self._f.tell()


def _int(value: Any) -> int | None:
    if isinstance(value, list):  # per-layer values (e.g. head_count_kv): take the largest
        value = max(value) if value else None
    if isinstance(value, bool):
        return int(value)
    return int(value) if isinstance(value, int | float) else None


def _count(value: Any) -> int | None:
    if isinstance(value, _Array):
        return value.count
    return len(value) if isinstance(value, list) else None


def _tensor_bytes(n_elements: int, ggml_type: int) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    return n_elements * type_size // block


def read_gguf_info(path: Path) -> GGUFInfo:
    """Read the metadata of the GGUF file at ``path``."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ModelFileError(f"cannot read {path.name}: {exc.strerror}") from None
    with handle:
        size = os.fstat(handle.fileno()).st_size
        magic = handle.read(4)
        if magic != _MAGIC:
            raise ModelFileError(f"{path.name} is not a GGUF file (bad magic {magic!r})")
        header = _Header(handle, size)
        try:
            version = header.u32()
            if version not in (2, 3):
                raise ValueError(f"unsupported GGUF version {version}")
            n_tensors, n_kv = header.u64(), header.u64()
            fields: dict[str, Any] = {}
            for _ in range(n_kv):
                key = header.string()
                fields[key] = header.value(header.u32())
            tensors: list[tuple[int, int, int]] = []  # (offset, n_elements, type)
            for _ in range(n_tensors):
                header.string()
                dims = [header.u64() for _ in range(header.u32())]
                ggml_type, offset = header.u32(), header.u64()
                tensors.append((offset, math.prod(dims), ggml_type))
            alignment = _int(fields.get("general.alignment")) or 32
            data_start = -(-header.position() // alignment) * alignment
            last = max((data_start + off + _tensor_bytes(n, t) for off, n, t in tensors), default=0)
        except _Truncated:
            raise ModelFileError(
                f"{path.name} is not a valid GGUF file: its header is truncated"
            ) from None
        except (ValueError, KeyError, struct.error) as exc:
            raise ModelFileError(f"{path.name} is not a valid GGUF file: {exc}") from None
    if last > size:
        raise ModelFileError(f"{path.name} is truncated: tensors end at {last}, file has {size}")
    arch = str(fields.get("general.architecture") or "unknown")
    try:
        quant = gguf.LlamaFileType(int(fields["general.file_type"])).name.removeprefix("MOSTLY_")
    except (KeyError, TypeError, ValueError):
        quant = "unknown"
    params = _int(fields.get("general.parameter_count")) or sum(n for _, n, _ in tensors)

    def arch_int(key: str) -> int | None:
        return _int(fields.get(f"{arch}.{key}"))

    name = fields.get("general.name")
    return GGUFInfo(
        path=str(path),
        file_size=size,
        name=name if isinstance(name, str) else None,
        architecture=arch,
        parameters=params,
        quant=quant,
        context_length=arch_int("context_length"),
        has_chat_template="tokenizer.chat_template" in fields,
        block_count=arch_int("block_count"),
        embedding_length=arch_int("embedding_length"),
        head_count=arch_int("attention.head_count"),
        head_count_kv=arch_int("attention.head_count_kv"),
        key_length=arch_int("attention.key_length"),
        value_length=arch_int("attention.value_length"),
        vocab_size=_count(fields.get("tokenizer.ggml.tokens")),
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
