"""`make bench` (embeddings and search): retrieval quality, throughput and query latency.

For each embedding model tried (all-MiniLM-L6-v2 converted to GGUF; the bundled SmolLM2-135M
with llmis's mean pooling and with last-token pooling):
  * recall@1 and recall@3 of ``data/queries.csv`` (32 labelled queries) against
    ``data/topics.csv`` (102 topics), embedding the ``text`` column;
  * embedding throughput in rows/s (batches of 32 synthetic sentences, in process).
Then, for the chosen model (MiniLM), on a synthetic 10k-row index:
  * query latency of ``POST /v1/search`` through a real llmis server (p50 / p95), and its
    parts measured in process: embedding the query, and the exact top-k over 10k and 100k rows.
The synthetic index holds random unit vectors: latency does not depend on what they mean.
Models run with ``--threads`` llama.cpp threads (default 1: on the shared 2-core machine 2
threads measured slower, 12 vs 61 rows/s for MiniLM, as the threads spin against other load).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llmis.embeddings import Pooling, embed
from llmis.engine import Engine
from llmis.index import Index, IndexRow, Manifest, save_index
from llmis.search import top_k
from scripts.convert_minilm import ensure_converted
from tests.conftest import REPO, launch, smollm_path

TOPICS = REPO / "data" / "topics.csv"
QUERIES = REPO / "data" / "queries.csv"


def load_eval() -> tuple[list[str], list[str], list[tuple[str, str]]]:
    with TOPICS.open(encoding="utf-8") as handle:
        topics = list(csv.DictReader(handle))
    with QUERIES.open(encoding="utf-8") as handle:
        queries = [(r["query"], r["expected_id"]) for r in csv.DictReader(handle)]
    return [t["id"] for t in topics], [t["text"] for t in topics], queries


def synthetic_sentences(n: int) -> list[str]:
    subjects = ["a gardener", "the committee", "my neighbour", "a software team", "the museum"]
    verbs = ["repaired", "discussed", "photographed", "planned", "measured", "recommended"]
    objects = ["an old bicycle", "the quarterly budget", "a mountain trail", "the new database"]
    extras = ["before dawn", "with great care", "for the third time", "despite the rain"]
    return [
        f"{subjects[i % 5]} {verbs[i % 6]} {objects[i % 4]} {extras[(i // 7) % 4]} (#{i})"
        for i in range(n)
    ]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def quality(engine: Engine, pooling: Pooling) -> tuple[float, float, float]:
    ids, texts, queries = load_eval()
    docs = np.concatenate(
        [
            embed(engine, texts[i : i + 32], pooling=pooling).vectors
            for i in range(0, len(texts), 32)
        ]
    )
    q = embed(engine, [query for query, _ in queries], pooling=pooling).vectors
    ranked = np.argsort(-(q @ docs.T), axis=1)
    hits1 = sum(ids[int(r[0])] == want for r, (_, want) in zip(ranked, queries, strict=True))
    hits3 = sum(
        want in {ids[int(i)] for i in r[:3]} for r, (_, want) in zip(ranked, queries, strict=True)
    )
    sentences = synthetic_sentences(256)
    started = time.perf_counter()
    for i in range(0, len(sentences), 32):
        embed(engine, sentences[i : i + 32], pooling=pooling)
    rate = len(sentences) / (time.perf_counter() - started)
    return hits1 / len(queries), hits3 / len(queries), rate


def synthetic_index(name: str, rows: int, dim: int, model: str, path: Path) -> Index:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    texts = synthetic_sentences(rows)
    table = [IndexRow(str(i), t, str(i), {"text": t}) for i, t in enumerate(texts)]
    manifest = Manifest(
        name=name,
        model=model,
        model_file=path.name,
        model_size=path.stat().st_size,
        dimensions=dim,
        rows=rows,
        text_column="text",
        id_column=None,
        columns=("text",),
        source="synthetic",
        created=int(time.time()),
        updated=int(time.time()),
    )
    return Index(manifest, table, vectors)


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="1 beats 2 on a busy machine")
    parser.add_argument("--queries", type=int, default=200, help="search requests to time")
    args = parser.parse_args()

    minilm = ensure_converted(REPO / "models")
    candidates: list[tuple[str, Path, Pooling]] = [
        ("all-MiniLM-L6-v2 (BERT GGUF, mean)", minilm, "mean"),
        ("SmolLM2-135M Q4_1, mean-pooled", smollm_path(), "mean"),
        ("SmolLM2-135M Q4_1, last-token", smollm_path(), "last"),
    ]
    _, topics, queries = load_eval()
    print(
        f"\nembeddings bench: {len(queries)} labelled queries over {len(topics)} topics, "
        f"{args.threads} threads"
    )
    print(f"  {'model':40} {'recall@1':>8} {'recall@3':>8} {'rows/s':>8}")
    engines: dict[Path, Engine] = {}
    try:
        for label, path, pooling in candidates:
            if path not in engines:
                engines[path] = Engine(path, n_ctx=512, threads=args.threads, embedding=True)
            r1, r3, rate = quality(engines[path], pooling)
            print(f"  {label:40} {r1:8.3f} {r3:8.3f} {rate:8.1f}")
        engine = engines[minilm]
        embed_ms = timed(lambda: embed(engine, ["how do I fix a dripping tap"]), 50)
    finally:
        for engine in engines.values():
            engine.close()

    small = synthetic_index("synthetic-10k", 10_000, 384, "minilm", minilm)
    large = synthetic_index("synthetic-100k", 100_000, 384, "minilm", minilm)
    query = small.vectors[0]
    topk_10k = timed(lambda: top_k(small, query, 5), 200)
    topk_100k = timed(lambda: top_k(large, query, 5), 50)

    workdir = Path(tempfile.mkdtemp(prefix="llmis-bench-embed-"))
    save_index(workdir / "indexes", small.manifest, small.rows, small.vectors)
    config = f"""
[server]
host = "127.0.0.1"
threads = {args.threads}
models_dir = "{REPO / "models"}"

[[models]]
name = "minilm"
path = ".converted/{minilm.name}"
n_ctx = 512
embedding = true
"""
    server = launch(config, workdir)
    try:
        queries_text = synthetic_sentences(10 + args.queries)

        def search(i: int) -> None:
            body = {"index": "synthetic-10k", "query": queries_text[i], "top_k": 5}
            request = urllib.request.Request(
                server.url + "/v1/search",
                json.dumps(body).encode(),
                {"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                json.loads(response.read())

        for i in range(10):  # warm-up: load the index and the model's caches
            search(i)
        counter = iter(range(10, 10 + args.queries))
        http_ms = timed(lambda: search(next(counter)), args.queries)
        floor_ms = timed(lambda: server.get_json("/v1/indexes"), args.queries)
    finally:
        server.stop()

    print("\nsearch latency (ms): p50 / p95")
    print(
        f"  POST /v1/search, 10k rows, top 5 (server, end to end): "
        f"{percentile(http_ms, 50):6.2f} / {percentile(http_ms, 95):6.2f}   (target p50 <= 20)"
    )
    print(
        f"  GET /v1/indexes (the server's floor, no model work):  "
        f"{percentile(floor_ms, 50):6.2f} / {percentile(floor_ms, 95):6.2f}"
    )
    print(
        f"  embed one query (MiniLM, in process):                 "
        f"{percentile(embed_ms, 50):6.2f} / {percentile(embed_ms, 95):6.2f}"
    )
    print(
        f"  exact top-k, 10k x 384 float32:                        "
        f"{percentile(topk_10k, 50):6.2f} / {percentile(topk_10k, 95):6.2f}"
    )
    print(
        f"  exact top-k, 100k x 384 float32:                       "
        f"{percentile(topk_100k, 50):6.2f} / {percentile(topk_100k, 95):6.2f}"
    )


if __name__ == "__main__":
    main()
