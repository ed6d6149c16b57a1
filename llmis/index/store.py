"""The on-disk store of a search index: one directory per index under ``indexes_dir``.

::

    indexes/<name>/index.json    manifest: model, dimensions, rows, columns, timestamps
    indexes/<name>/rows.json     [{"id", "hash", "text", "fields": {column: value}}, ...]
    indexes/<name>/vectors.npy   float32 (rows x dimensions), L2-normalised, row i = rows[i]

Why numpy files rather than sqlite: a search is one matrix-vector product over every row,
which wants the vectors as one contiguous float32 matrix. ``vectors.npy`` *is* that matrix
(100k rows x 384 dims = 154 MB, read in one ``np.load`` or memory-mapped), and an exact
search over it takes milliseconds with BLAS, so no approximate index is needed at this size.
sqlite would add a per-row BLOB decode to every load and buys nothing we use: an index is
rewritten whole on each build (the row order follows the CSV), never updated row by row.
The rows (ids, texts, the other columns, content hashes) are plain JSON, readable by anything.

A build writes a hidden sibling directory and swaps it in by rename, so readers and failed
builds never see or leave a half-written index.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict

__all__ = [
    "FORMAT_VERSION",
    "NAME_PATTERN",
    "Index",
    "IndexRow",
    "Manifest",
    "index_names",
    "load_index",
    "read_manifest",
    "save_index",
    "text_hash",
    "valid_name",
]

FORMAT_VERSION = 1
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MANIFEST, ROWS, VECTORS = "index.json", "rows.json", "vectors.npy"


class Manifest(BaseModel):
    """What an index was built from and with."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    format: int = FORMAT_VERSION
    name: str
    model: str  # the config name of the model that embedded the rows
    model_file: str  # GGUF file name and size: a changed file re-embeds every row
    model_size: int
    dimensions: int
    rows: int
    text_column: str
    id_column: str | None
    columns: tuple[str, ...]
    source: str
    created: int
    updated: int


@dataclass(frozen=True)
class IndexRow:
    id: str
    text: str
    hash: str
    fields: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "hash": self.hash, "text": self.text, "fields": self.fields}


@dataclass(frozen=True)
class Index:
    manifest: Manifest
    rows: Sequence[IndexRow]
    vectors: NDArray[np.float32]


def valid_name(name: str) -> bool:
    return re.fullmatch(NAME_PATTERN, name) is not None


def text_hash(text: str) -> str:
    """The content hash that decides whether a row's text must be embedded again."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def read_manifest(directory: Path) -> Manifest:
    return Manifest.model_validate_json((directory / MANIFEST).read_bytes())


def load_index(directory: Path, *, mmap: bool = False) -> Index:
    """Read an index directory; raises ``OSError`` or ``ValueError`` when it is unreadable."""
    manifest = read_manifest(directory)
    raw = json.loads((directory / ROWS).read_text("utf-8"))
    rows = [IndexRow(r["id"], r["text"], r["hash"], dict(r["fields"])) for r in raw]
    vectors = np.load(directory / VECTORS, mmap_mode="r" if mmap else None)
    if vectors.dtype != np.float32 or vectors.shape != (manifest.rows, manifest.dimensions):
        raise ValueError(
            f"{directory}: vectors {vectors.dtype} {vectors.shape} do not match the manifest "
            f"({manifest.rows} x {manifest.dimensions} float32)"
        )
    if len(rows) != manifest.rows:
        raise ValueError(f"{directory}: {len(rows)} rows, the manifest says {manifest.rows}")
    return Index(manifest, rows, vectors)


def index_names(root: Path) -> list[str]:
    """The complete indexes under ``root`` (hidden build directories are skipped)."""
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if valid_name(d.name) and (d / MANIFEST).is_file())


def save_index(
    root: Path, manifest: Manifest, rows: Sequence[IndexRow], vectors: NDArray[np.float32]
) -> Path:
    """Write the index to ``root/<name>`` atomically (a sibling temp dir swapped in)."""
    if not valid_name(manifest.name):
        raise ValueError(f"bad index name {manifest.name!r}")
    root.mkdir(parents=True, exist_ok=True)
    final = root / manifest.name
    tmp = Path(tempfile.mkdtemp(prefix=f".{manifest.name}.", suffix=".building", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; an index is as readable as its CSV
    old: Path | None = None
    try:
        np.save(tmp / VECTORS, np.ascontiguousarray(vectors, dtype=np.float32))
        (tmp / ROWS).write_text(
            json.dumps([r.as_json() for r in rows], ensure_ascii=False), "utf-8"
        )
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2), "utf-8")
        if final.exists():
            old = root / f".{manifest.name}.{uuid.uuid4().hex[:8]}.old"
            final.rename(old)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            old.rename(final)  # put the previous index back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final
