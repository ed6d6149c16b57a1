"""`make bench` (embeddings and search): llmis against llama-server on the same MiniLM GGUF.

1. Retrieval quality, in process: recall@1 / recall@3 of ``data/queries.csv`` (32 labelled
   queries) against ``data/topics.csv`` (102 topics) with MiniLM (llmis's batched path).
2. Throughput, llmis and llama-server started side by side on the same GGUF with the same
   thread count (llama-server as the issue measured it: ``--embedding --pooling mean -np 8
   -b 4096 -ub 4096``, built once into ``~/.cache/llmis/llama-server/``), run interleaved
   (A B, B A, ...) because the machine is noisy; per server, the median over rounds of:
     * one /v1/embeddings request of the 102 topic texts (rows/s);
     * 4 concurrent clients x 32 rows (aggregate rows/s);
     * a synthetic CSV of ``--index-rows`` (10k) rows: ``llmis index`` for llmis (rows over
       its wall time, start-up included), and for llama-server the same rows sent as
       ``llmis index`` sends them (jobs of 128 rows, 3 in flight);
   and the ratios llmis / llama-server. Only the ratios mean anything on a shared machine.
3. Search: ``POST /v1/search`` p50 / p95 on a 10k-row index through the llmis server, beside a
   one-query /v1/embeddings p50 on both servers, and exact top-k in process.
``--sweep`` first times token budgets per decode in process (how BATCH_TOKENS was chosen).
``--llmis-env K=V[,K=V]`` (repeatable) adds an llmis started with that environment (its ``llmis
index`` too), e.g. ``GOMP_SPINCOUNT=300000`` (libgomp's default wait) against llmis's own
default; llama-server runs with libgomp's defaults (see ``scripts/bench_batching.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np
import psutil

from llmis.engine.embedding_context import EmbeddingContext
from llmis.engine.llama import Engine
from llmis.index.search import top_k
from llmis.index.store import Index, IndexRow, Manifest, save_index
from llmis.serving.embeddings import embed_in_process
from scripts.bench_batching import (
    Server,
    _wait_http,
    add_llmis_env_argument,
    clear_omp_env,
    llama_server_binary,
    llmis_name,
    parse_env,
)
from scripts.convert_minilm import ensure_converted
from tests.conftest import REPO, free_port, launch

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


def quality(context: EmbeddingContext) -> tuple[float, float]:
    ids, texts, queries = load_eval()
    docs = embed_in_process(context, texts, batch_tokens=160).vectors
    q = embed_in_process(context, [query for query, _ in queries], batch_tokens=160).vectors
    ranked = np.argsort(-(q @ docs.T), axis=1)
    hits1 = sum(ids[int(r[0])] == want for r, (_, want) in zip(ranked, queries, strict=True))
    hits3 = sum(
        want in {ids[int(i)] for i in r[:3]} for r, (_, want) in zip(ranked, queries, strict=True)
    )
    return hits1 / len(queries), hits3 / len(queries)


def sweep(context: EmbeddingContext, texts: list[str], rounds: int = 5) -> None:
    """Rows/s of the topic texts at several token budgets per decode (median of rounds)."""
    print("\n  tokens per decode -> rows/s (in process, median of rounds)")
    budgets = [32, 64, 96, 128, 160, 224, 320, 512]
    rates: dict[int, list[float]] = {b: [] for b in budgets}
    for _ in range(rounds):
        for budget in budgets:
            started = time.perf_counter()
            embed_in_process(context, texts, batch_tokens=budget)
            rates[budget].append(len(texts) / (time.perf_counter() - started))
    for budget in budgets:
        print(f"    {budget:4}: {statistics.median(rates[budget]):7.1f}")


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


# ----- the servers -----


def start_llmis(workdir: Path, minilm: Path, threads: int, env_spec: str = "") -> Server:
    config = llmis_config(minilm, threads)
    running = launch(config, workdir, env=parse_env(env_spec))
    return Server(
        llmis_name(env_spec),
        running.url,
        "minilm",
        psutil.Process(running.process.pid),
        running.process,
    )


def llmis_config(minilm: Path, threads: int) -> str:
    return f"""
[server]
host = "127.0.0.1"
threads = {threads}
models_dir = "{REPO / "models"}"

[[models]]
name = "minilm"
path = ".converted/{minilm.name}"
n_ctx = 512
queue_size = 64
embedding = true
"""


def start_llama_server(binary: Path, workdir: Path, minilm: Path, threads: int) -> Server:
    port = free_port()
    log = workdir / "llama-server.log"
    cmd = [str(binary), "-m", str(minilm), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-t", str(threads), "-tb", str(threads), "--embedding", "--pooling", "mean"]
    cmd += ["-np", "8", "-b", "4096", "-ub", "4096", "-c", "4096", "--no-webui"]
    with log.open("wb") as out:
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait_http(url + "/health", popen, log)
    return Server("llama-server", url, "minilm", psutil.Process(popen.pid), popen)


# ----- the measures -----


async def embed_rows(session: aiohttp.ClientSession, server: Server, texts: list[str]) -> None:
    body = {"model": server.model, "input": texts}
    async with session.post(server.url + "/v1/embeddings", json=body) as response:
        data = await response.json()
        if response.status != 200 or len(data["data"]) != len(texts):
            raise RuntimeError(f"{server.name}: {response.status} {str(data)[:300]}")


async def one_request(server: Server, texts: list[str], repeats: int = 5) -> float:
    """Rows/s of one request of ``texts``: the median of ``repeats`` (one alone is noise)."""
    async with aiohttp.ClientSession() as session:
        await embed_rows(session, server, texts[:4])  # warm
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            await embed_rows(session, server, texts)
            seconds.append(time.perf_counter() - started)
        return len(texts) / statistics.median(seconds)


async def concurrent(server: Server, clients: int, rows: int) -> float:
    texts = synthetic_sentences(clients * rows)
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        await asyncio.gather(
            *(embed_rows(session, server, texts[c * rows : (c + 1) * rows]) for c in range(clients))
        )
        return clients * rows / (time.perf_counter() - started)


async def index_like(
    server: Server, texts: list[str], batch: int = 128, in_flight: int = 3
) -> float:
    """The rows sent as ``llmis index`` sends them: jobs of ``batch`` rows, a few in flight."""
    chunks = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    gate = asyncio.Semaphore(in_flight)
    async with aiohttp.ClientSession() as session:

        async def send(chunk: list[str]) -> None:
            async with gate:
                await embed_rows(session, server, chunk)

        started = time.perf_counter()
        await asyncio.gather(*(send(c) for c in chunks))
        return len(texts) / (time.perf_counter() - started)


def llmis_index(
    workdir: Path, csv_path: Path, rows: int, env: dict[str, str]
) -> tuple[float, float]:
    """``llmis index`` on the CSV (a fresh build each time): the rows/s it reports for its
    embedding (what llama-server's figure measures too), and rows over the whole run with
    the process start-up and the model load."""
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmis",
            "index",
            str(csv_path),
            "--config",
            str(workdir / "llmis.toml"),
            "--text-column",
            "text",
            "--model",
            "minilm",
            "--out",
            f"bench-{time.monotonic_ns()}",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=workdir,
        env={**os.environ, **env},
    )
    elapsed = time.perf_counter() - started
    print(f"      {done.stdout.strip()}  (wall {elapsed:.1f}s with start-up)", flush=True)
    reported = re.search(r"\(([0-9.]+) rows/s embedded\)", done.stdout)
    if reported is None:
        raise RuntimeError(f"llmis index printed no rate: {done.stdout!r}")
    return float(reported.group(1)), rows / elapsed


async def single_query_ms(server: Server, n: int) -> list[float]:
    texts = synthetic_sentences(n)
    out = []
    async with aiohttp.ClientSession() as session:
        for text in texts:
            started = time.perf_counter()
            await embed_rows(session, server, [text])
            out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads, both servers")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (A B, B A)")
    parser.add_argument("--index-rows", type=int, default=10_000)
    parser.add_argument("--index-rounds", type=int, default=1, help="rounds of the CSV measure")
    parser.add_argument("--queries", type=int, default=200, help="search requests to time")
    parser.add_argument("--sweep", action="store_true", help="time token budgets per decode")
    parser.add_argument("--no-llama-server", action="store_true", help="skip building/running it")
    add_llmis_env_argument(parser)
    args = parser.parse_args()
    print(clear_omp_env())

    minilm = ensure_converted(REPO / "models")
    _, topics, queries = load_eval()
    engine = Engine(minilm, n_ctx=512, threads=args.threads, embedding=True)
    try:
        context = EmbeddingContext(engine)
        r1, r3 = quality(context)
        print(
            f"\nMiniLM, {len(queries)} labelled queries over {len(topics)} topics: "
            f"recall@1 {r1:.3f}  recall@3 {r3:.3f}   (was 0.969 at @3)"
        )
        if args.sweep:
            sweep(context, topics)
        context.close()
    finally:
        engine.close()

    workdir = Path(tempfile.mkdtemp(prefix="llmis-bench-embed-"))
    small = synthetic_index("synthetic-10k", 10_000, 384, "minilm", minilm)
    save_index(workdir / "llmis" / "indexes", small.manifest, small.rows, small.vectors)
    csv_path = workdir / "synthetic.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        for i, text in enumerate(synthetic_sentences(args.index_rows)):
            writer.writerow([i, text])
    index_texts = synthetic_sentences(args.index_rows)

    specs = ["", *args.llmis_env]
    llmis_dirs = {llmis_name(spec): workdir / f"llmis{i or ''}" for i, spec in enumerate(specs)}
    llmis_envs = {llmis_name(spec): parse_env(spec) for spec in specs}
    for name, path in llmis_dirs.items():
        if name != "llmis":
            save_index(path / "indexes", small.manifest, small.rows, small.vectors)
    servers = [
        start_llmis(llmis_dirs[llmis_name(spec)], minilm, args.threads, spec) for spec in specs
    ]
    if not args.no_llama_server:
        servers.append(start_llama_server(llama_server_binary(), workdir, minilm, args.threads))
    results: dict[str, dict[str, list[float]]] = {s.name: {} for s in servers}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\nthroughput, {args.threads} threads, {args.rounds} interleaved rounds (rows/s), "
        f"load average {load}"
    )
    try:
        for round_ in range(args.rounds):
            order = servers if round_ % 2 == 0 else servers[::-1]
            for server in order:
                got = results[server.name]
                got.setdefault("one request x 102", []).append(
                    asyncio.run(one_request(server, topics))
                )
                got.setdefault("4 clients x 32", []).append(asyncio.run(concurrent(server, 4, 32)))
                print(
                    f"  round {round_ + 1} {server.name:12} "
                    f"102: {got['one request x 102'][-1]:6.1f}  "
                    f"4x32: {got['4 clients x 32'][-1]:6.1f}",
                    flush=True,
                )
        for round_ in range(args.index_rounds):
            order = servers if round_ % 2 == 0 else servers[::-1]
            for server in order:
                key = f"CSV {args.index_rows} rows"
                whole = f"{key}, llmis index with its start-up"
                if server.name in llmis_dirs:
                    rate, overall = llmis_index(
                        llmis_dirs[server.name], csv_path, args.index_rows, llmis_envs[server.name]
                    )
                else:
                    rate = overall = asyncio.run(index_like(server, index_texts))
                results[server.name].setdefault(key, []).append(rate)
                results[server.name].setdefault(whole, []).append(overall)
                print(f"  CSV round {round_ + 1} {server.name:12} {rate:6.1f} rows/s", flush=True)
        latency = {s.name: asyncio.run(single_query_ms(s, 50)) for s in servers}
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        search_ms, floor_ms = search_latency(servers[0], args.queries)
    finally:
        for server in servers:
            server.stop()

    print(f"\nmedians (rows/s), load average at the end {load}")
    names = [s.name for s in servers]
    ours = [n for n in names if n in llmis_dirs]
    theirs = "llama-server" if "llama-server" in names else None
    for key in results["llmis"]:
        medians = {n: statistics.median(results[n][key]) for n in names}
        print(f"  {key}")
        for name, median in medians.items():
            ratio = f"   {median / medians[theirs]:.2f}x llama-server" if theirs else ""
            print(f"    {name:36}{median:8.1f}{ratio if name in ours else ''}")

    query = small.vectors[0]
    topk_10k = timed(lambda: top_k(small, query, 5), 200)
    print("\nlatency (ms): p50 / p95")
    print(
        f"  POST /v1/search, 10k rows, top 5 (llmis):   "
        f"{percentile(search_ms, 50):6.2f} / {percentile(search_ms, 95):6.2f}   (target p50 <= 20)"
    )
    print(
        f"  GET /v1/indexes (llmis's floor):            "
        f"{percentile(floor_ms, 50):6.2f} / {percentile(floor_ms, 95):6.2f}"
    )
    for name, values in latency.items():
        print(
            f"  /v1/embeddings, one query ({name}): "
            f"{percentile(values, 50):6.2f} / {percentile(values, 95):6.2f}"
        )
    print(
        f"  exact top-k, 10k x 384 (in process):        "
        f"{percentile(topk_10k, 50):6.2f} / {percentile(topk_10k, 95):6.2f}"
    )


def search_latency(server: Server, n: int) -> tuple[list[float], list[float]]:
    texts = synthetic_sentences(10 + n)

    def search(i: int) -> None:
        body = {"index": "synthetic-10k", "query": texts[i], "top_k": 5}
        request = urllib.request.Request(
            server.url + "/v1/search",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            json.loads(response.read())

    def indexes() -> None:
        with urllib.request.urlopen(server.url + "/v1/indexes", timeout=30) as response:
            response.read()

    for i in range(10):  # warm-up: load the index and the model's caches
        search(i)
    counter = iter(range(10, 10 + n))
    return timed(lambda: search(next(counter)), n), timed(indexes, n)


if __name__ == "__main__":
    main()
