"""Batched embeddings through a real server, with the openai SDK, on the MiniLM GGUF.

Many inputs share one ``llama_decode`` and concurrent requests share batches (the embedding
scheduler); these tests check that nobody can tell: the vectors are those of one input at a
time, a bad input rejects its whole request before anything is decoded, and every concurrent
client gets exactly its own vectors in its own order.
"""

from __future__ import annotations

import asyncio
import re
import threading
import urllib.request
from collections.abc import Callable
from typing import Any

import llama_cpp
import numpy as np
import openai
import pytest

from llmis.engine.embedding_context import EmbeddingContext
from llmis.engine.embedding_scheduler import EmbeddingScheduler, embedding_outputs
from llmis.engine.llama import Engine
from llmis.models.budget import predict_memory, process_rss, release_free_heap
from llmis.models.gguf import read_gguf_info
from tests.conftest import RunningServer
from tests.test_embeddings import embedding_config, minilm_path

WORDS = ["river", "stone", "lantern", "orchard", "copper"]
WORDS += ["violin", "harbor", "meadow", "glacier", "ember"]


def _texts(n: int, seed: int) -> list[str]:
    """``n`` distinct texts of very different lengths (1 to ~200 tokens)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.choice([1, 3, 8, 20, 60, 150]))
        words = rng.choice(WORDS, size=length)
        out.append(f"{seed}-{i} " + " ".join(words))
    return out


@pytest.fixture(scope="module")
def batch_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server(embedding_config())


@pytest.fixture(scope="module")
def client(batch_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=batch_server.base_url, api_key="unused", max_retries=0)


def _vectors(result: openai.types.CreateEmbeddingResponse) -> np.ndarray:
    assert [d.index for d in result.data] == list(range(len(result.data)))
    return np.asarray([d.embedding for d in result.data], dtype=np.float32)


def _counter(server: RunningServer, name: str) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    found = re.search(rf'^llmis:{name}_total{{model_name="minilm"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_batched_vectors_equal_one_at_a_time(client: openai.OpenAI) -> None:
    texts = _texts(40, seed=1)
    assert len({len(t.split()) for t in texts}) >= 4  # mixed lengths
    batched = _vectors(client.embeddings.create(model="minilm", input=texts))
    single = np.concatenate(
        [_vectors(client.embeddings.create(model="minilm", input=t)) for t in texts]
    )
    assert batched.shape == single.shape == (40, 384)
    cosines = np.sum(batched * single, axis=1)
    assert cosines.min() >= 0.9999, cosines.min()


def test_one_long_input_rejects_the_whole_batch_before_any_work(
    client: openai.OpenAI, batch_server: RunningServer
) -> None:
    texts = [*_texts(20, seed=2), "word " * 600, *_texts(20, seed=3)]
    rows_before = _counter(batch_server, "embedding_rows")
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="minilm", input=texts)
    assert caught.value.status_code == 400
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["code"] == "context_length_exceeded"
    assert body["param"] == "input"
    assert "input[20]" in body["message"] and "at most 512 tokens" in body["message"]
    # nothing of that request was decoded, not even the 20 good inputs before the long one
    assert _counter(batch_server, "embedding_rows") == rows_before
    ok = client.embeddings.create(model="minilm", input=texts[:3])
    assert len(ok.data) == 3
    assert _counter(batch_server, "embedding_rows") == rows_before + 3


def test_concurrent_requests_each_get_their_own_vectors_in_order(
    client: openai.OpenAI, batch_server: RunningServer
) -> None:
    batches = [_texts(32, seed=10 + c) for c in range(4)]
    # each client's request alone first (test above: that equals one input at a time)
    expected = [_vectors(client.embeddings.create(model="minilm", input=b)) for b in batches]
    decodes_before = _counter(batch_server, "embedding_decodes")
    rows_before = _counter(batch_server, "embedding_rows")
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def one_client(c: int) -> None:
        try:
            own = openai.OpenAI(base_url=batch_server.base_url, api_key="unused", max_retries=0)
            start.wait()
            results[c] = _vectors(own.embeddings.create(model="minilm", input=batches[c]))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one_client, args=(c,)) for c in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    for c in range(4):
        got = results[c]
        assert got.shape == (32, 384)
        cosines = np.sum(got * expected[c], axis=1)
        assert cosines.min() >= 0.9999, (c, cosines.min())
        # and not some other client's rows: each row is nearest to its own reference
        every = np.concatenate(expected)
        assert (np.argmax(got @ every.T, axis=1) == np.arange(32) + 32 * c).all()
    assert _counter(batch_server, "embedding_rows") == rows_before + 128
    # many rows per decode (within and across requests), not one decode per row
    assert _counter(batch_server, "embedding_decodes") - decodes_before < 128 / 2


async def test_batches_decode_side_by_side_one_thread_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With 2 threads, two batches decode at once on two contexts of one thread each, and
    give the vectors one context gives; a lone query gets both threads."""
    engine = Engine(minilm_path(), n_ctx=512, threads=2, embedding=True)
    texts = _texts(48, seed=20)
    alone = EmbeddingScheduler("minilm", engine, 16, context=EmbeddingContext(engine))
    parallel = EmbeddingScheduler("minilm", engine, 16)
    loop = asyncio.get_running_loop()
    try:
        expected = (await alone.embed(texts)).vectors
        assert len(parallel.contexts) == 2
        lock = threading.Lock()
        running, peak, seen = 0, 0, []
        real_decode = EmbeddingContext.decode

        def watched(context: EmbeddingContext, seqs: Any, pooling: Any) -> Any:
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
                seen.append((threading.get_ident(), int(llama_cpp.llama_n_threads(context.ctx))))
            try:
                return real_decode(context, seqs, pooling)
            finally:
                with lock:
                    running -= 1

        monkeypatch.setattr(EmbeddingContext, "decode", watched)
        got = (await parallel.embed(texts)).vectors
        assert peak == 2  # two decodes ran at the same time
        assert len({thread for thread, _ in seen}) == 2
        # side by side, one thread each (a last batch alone in its step gets both)
        assert sum(threads == 1 for _, threads in seen) >= 2
        assert {threads for _, threads in seen} <= {1, 2}
        cosines = np.sum(got * expected, axis=1) / (
            np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
        )
        assert cosines.min() >= 0.9999, cosines.min()
        seen.clear()
        await parallel.embed(["one short query"])
        assert [threads for _, threads in seen] == [2]  # a lone batch: every thread
    finally:
        await loop.run_in_executor(None, parallel.close)
        await loop.run_in_executor(None, alone.close)
        engine.close()


async def test_the_memory_prediction_covers_every_embedding_context() -> None:
    """Both contexts' output buffers (llama.cpp keeps n_vocab floats per output token, for
    an embedding model too) are in the prediction the RAM budget uses."""
    release_free_heap()
    before = process_rss()
    engine = Engine(minilm_path(), n_ctx=512, threads=2, embedding=True)
    scheduler = EmbeddingScheduler("minilm", engine, 16)
    try:
        long_input = " ".join(WORDS * 45)  # about 500 tokens: the first context's largest
        await scheduler.embed([long_input, *_texts(64, seed=30)])
        await scheduler.embed(_texts(64, seed=31))
        grown = process_rss() - before
    finally:
        await asyncio.get_running_loop().run_in_executor(None, scheduler.close)
        engine.close()
    info = read_gguf_info(minilm_path())
    outputs = embedding_outputs(2, 512)
    predicted = predict_memory(info, 512, 512, embedding_outputs=outputs).total
    without = predict_memory(info, 512, 512).total
    assert without < 0.7 * grown  # the buffers are most of it: leaving them out is wrong
    assert 0.8 * grown <= predicted <= 1.3 * grown, (grown, predicted)
