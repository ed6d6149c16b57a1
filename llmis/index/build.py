"""``llmis index FILE.csv --text-column COL [--id-column COL] --model M --out NAME``.

Reads a CSV table, embeds the text column of every row with an embedding model of the config
(on that model's embedding scheduler, batched, with a rows/s progress bar) and writes the index
``<indexes_dir>/NAME`` (see :mod:`llmis.index.store`). Re-running it re-embeds only rows whose text
changed: vectors are reused by content hash from the previous build when it used the same
model file. The whole CSV is checked before any model is loaded, and the index is swapped in
only when complete, so a bad CSV or a failed build leaves the previous index (or none) intact.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from llmis.config import Settings
from llmis.errors import APIError
from llmis.index.store import (
    NAME_PATTERN,
    Index,
    IndexRow,
    Manifest,
    load_index,
    save_index,
    text_hash,
    valid_name,
)
from llmis.models.manager import ModelManager
from llmis.serving.embeddings import Embeddings, acquire_embedder, embed

IN_FLIGHT = 3  # embedding jobs queued at once

__all__ = ["BuildReport", "IndexBuildError", "Table", "add_arguments", "build", "read_table", "run"]


class IndexBuildError(Exception):
    """The CSV, the arguments or the model cannot make an index; the message says why."""


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: list[IndexRow]
    blank: int  # rows skipped because their text cell is empty


@dataclass(frozen=True)
class BuildReport:
    path: Path
    rows: int
    embedded: int  # distinct texts embedded in this run
    reused: int  # rows whose vector came from the previous build
    blank: int
    truncated: int
    seconds: float  # the whole build: reading, loading the model, embedding, saving
    embed_seconds: float  # embedding only


def _decode(path: Path, encoding: str) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IndexBuildError(f"{path}: no such file") from None
    except OSError as exc:
        raise IndexBuildError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise IndexBuildError(
            f"{path}: not valid {encoding} (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8 or pass --encoding (e.g. --encoding cp1252)"
        ) from None
    except LookupError:
        raise IndexBuildError(f"unknown encoding {encoding!r}") from None
    if not text.strip():
        raise IndexBuildError(f"{path}: the file is empty")
    return text


def read_table(
    path: Path,
    text_column: str,
    id_column: str | None = None,
    *,
    encoding: str = "utf-8-sig",
    delimiter: str = ",",
) -> Table:
    """Read and check the whole CSV; raise :class:`IndexBuildError` naming the problem."""
    reader = csv.reader(io.StringIO(_decode(path, encoding), newline=""), delimiter=delimiter)
    try:
        header = next(reader)
        records = list(reader)
    except csv.Error as exc:
        raise IndexBuildError(f"{path}: not a valid CSV (line {reader.line_num}): {exc}") from None
    columns = tuple(h.strip() for h in header)
    if len(set(columns)) != len(columns):
        raise IndexBuildError(f"{path}: the header repeats a column name: {', '.join(columns)}")
    for wanted, option in ((text_column, "--text-column"), (id_column, "--id-column")):
        if wanted is not None and wanted not in columns:
            raise IndexBuildError(
                f"{path}: no column {wanted!r} ({option}); the columns are: {', '.join(columns)}"
            )
    text_at = columns.index(text_column)
    id_at = columns.index(id_column) if id_column is not None else None
    rows: list[IndexRow] = []
    seen: dict[str, int] = {}
    blank = 0
    for number, record in enumerate(records, start=1):
        if not any(cell.strip() for cell in record):
            continue  # an empty line
        if len(record) != len(columns):
            raise IndexBuildError(
                f"{path}: data row {number} has {len(record)} fields; the header has {len(columns)}"
            )
        text = record[text_at].strip()
        if not text:
            blank += 1
            continue
        row_id = record[id_at].strip() if id_at is not None else str(number)
        if not row_id:
            raise IndexBuildError(f"{path}: data row {number} has an empty {id_column!r}")
        if row_id in seen:
            raise IndexBuildError(
                f"{path}: {id_column!r} {row_id!r} is used by data rows {seen[row_id]} and "
                f"{number}; ids must be unique"
            )
        seen[row_id] = number
        fields = dict(zip(columns, record, strict=True))
        rows.append(IndexRow(row_id, text, text_hash(text), fields))
    if not rows:
        raise IndexBuildError(f"{path}: no data rows with text in column {text_column!r}")
    return Table(columns, rows, blank)


def _previous(directory: Path, model: str, model_file: str, model_size: int) -> Index | None:
    """The existing index when its vectors can be reused (same model file), else None."""
    if not (directory / "index.json").is_file():
        return None
    try:
        old = load_index(directory)
    except (OSError, ValueError):
        return None
    same = (old.manifest.model, old.manifest.model_file, old.manifest.model_size)
    return old if same == (model, model_file, model_size) else None


async def build(
    settings: Settings,
    csv_path: Path,
    name: str,
    *,
    text_column: str,
    model: str,
    id_column: str | None = None,
    batch_size: int = 128,
    encoding: str = "utf-8-sig",
    progress: bool = True,
) -> BuildReport:
    """Build or update the index ``name`` from ``csv_path``."""
    started = time.monotonic()
    if not valid_name(name):
        raise IndexBuildError(f"bad index name {name!r}: use letters, digits, '.', '_', '-'")
    table = read_table(csv_path, text_column, id_column, encoding=encoding)
    root = settings.server.indexes_dir
    manager = ModelManager(settings)
    try:
        try:
            embedder, pooling = await acquire_embedder(manager, model)
        except APIError as exc:
            raise IndexBuildError(exc.message) from None
        path = embedder.engine.path
        model_size = path.stat().st_size
        old = _previous(root / name, model, path.name, model_size)
        known: dict[str, NDArray[np.float32]] = {}
        if old is not None:
            known = {r.hash: old.vectors[i] for i, r in enumerate(old.rows)}
        reused = sum(1 for r in table.rows if r.hash in known)
        todo = list(dict.fromkeys(r.text for r in table.rows if r.hash not in known))
        truncated = 0
        # a few jobs in flight, so the embedding thread always has the next rows queued
        # while the finished ones are stored; each job's rows are batched by the scheduler
        pending: deque[tuple[list[str], asyncio.Task[Embeddings]]] = deque()
        embed_started = time.monotonic()
        with tqdm(
            total=len(todo), unit="rows", desc=f"embedding {name}", disable=not progress
        ) as bar:
            chunks = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
            chunks.reverse()
            try:
                while chunks or pending:
                    while chunks and len(pending) < IN_FLIGHT:
                        chunk = chunks.pop()
                        job = embed(embedder, chunk, pooling=pooling, truncate=True)
                        pending.append((chunk, asyncio.ensure_future(job)))
                    done, task = pending.popleft()
                    result: Embeddings = await task
                    truncated += result.truncated
                    for text, vector in zip(done, result.vectors, strict=True):
                        known[text_hash(text)] = vector
                    bar.update(len(done))
            finally:
                for _, task in pending:
                    task.cancel()
                await asyncio.gather(*(task for _, task in pending), return_exceptions=True)
        embed_seconds = time.monotonic() - embed_started
    finally:
        await manager.close()
    vectors = np.stack([known[r.hash] for r in table.rows]).astype(np.float32)
    created = old.manifest.created if old is not None else int(time.time())
    manifest = Manifest(
        name=name,
        model=model,
        model_file=path.name,
        model_size=model_size,
        dimensions=int(vectors.shape[1]),
        rows=len(table.rows),
        text_column=text_column,
        id_column=id_column,
        columns=table.columns,
        source=str(csv_path),
        created=created,
        updated=int(time.time()),
    )
    final = save_index(root, manifest, table.rows, vectors)
    return BuildReport(
        final,
        len(table.rows),
        len(todo),
        reused,
        table.blank,
        truncated,
        time.monotonic() - started,
        embed_seconds,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("csv", type=Path, help="the CSV table (first line: column names)")
    parser.add_argument("--text-column", required=True, help="the column to embed")
    parser.add_argument("--id-column", help="a column of unique row ids (default: row number)")
    parser.add_argument("--model", required=True, help="an embedding model of the config")
    parser.add_argument("--out", required=True, help=f"index name ({NAME_PATTERN})")
    parser.add_argument("--batch-size", type=int, default=128, help="rows per embedding job")
    parser.add_argument("--encoding", default="utf-8-sig", help="CSV encoding (default UTF-8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    settings: Settings = args.settings
    if args.batch_size < 1:
        print("llmis index: error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(
            build(
                settings,
                args.csv,
                args.out,
                text_column=args.text_column,
                model=args.model,
                id_column=args.id_column,
                batch_size=args.batch_size,
                encoding=args.encoding,
                progress=not args.no_progress,
            )
        )
    except IndexBuildError as exc:
        print(f"llmis index: error: {exc}", file=sys.stderr)
        return 1
    rate = report.embedded / report.embed_seconds if report.embed_seconds > 0 else 0.0
    notes = [f"{report.embedded} embedded", f"{report.reused} unchanged"]
    if report.blank:
        notes.append(f"{report.blank} blank rows skipped")
    if report.truncated:
        notes.append(f"{report.truncated} texts truncated to the model's input limit")
    print(
        f"index {args.out!r}: {report.rows} rows ({', '.join(notes)}) -> {report.path} "
        f"in {report.seconds:.1f}s ({rate:.0f} rows/s embedded)"
    )
    return 0
