"""The generation scheduler (``llmis.engine.scheduler.Scheduler``) on the real SmolLM2 model.

The scheduler-level tests drive a Scheduler directly and compare its output token for token
with a batch of one on a fresh context. The server tests run a real llmis with a 4-slot and a
1-slot copy of the model side by side.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import llama_cpp
import pytest
from llama_cpp.llama_grammar import JSON_GBNF
from prometheus_client.parser import text_string_to_metric_families

import llmis.engine.scheduler
from llmis.config import Settings
from llmis.engine.jobs import Delta, Failed, Finished, Job, Started
from llmis.engine.llama import Engine
from llmis.engine.sampling import SamplingParams
from llmis.engine.scheduler import Scheduler
from llmis.errors import APIError
from llmis.models.budget import predict_memory
from llmis.models.gguf import read_gguf_info
from llmis.models.manager import ModelManager
from tests.conftest import SMOLLM_RESOURCE, RunningServer, smollm_path

QUESTIONS = [
    "Write a short poem about the sea.",
    "List three colors and describe each.",
    "Explain why the sky is blue.",
    "Tell me a story about a dragon.",
    "What is a prime number?",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0)
# a system prompt longer than two prefill chunks (256 tokens), shared by several requests
SYSTEM = " ".join(f"Rule {i}: answer briefly, politely and in plain English." for i in range(60))


def messages(question: str, system: str | None = None) -> list[dict[str, Any]]:
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": question}]


def new_scheduler(slots: int) -> Scheduler:
    return Scheduler("smollm2", Engine(smollm_path(), n_ctx=1024, threads=2), 16, slots)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    """For rendering prompts only (no context)."""
    eng = Engine(smollm_path(), n_ctx=1024, threads=2)
    yield eng
    eng.close()


@pytest.fixture
async def worker() -> AsyncIterator[Scheduler]:
    worker = new_scheduler(3)
    yield worker
    await asyncio.get_running_loop().run_in_executor(None, worker.close)


class Run:
    """One job on a scheduler, its events collected as they arrive."""

    def __init__(self, worker: Scheduler, prompt: list[int], params: SamplingParams) -> None:
        self.job = Job(prompt, params, asyncio.get_running_loop())
        self.text = ""
        self.deltas = 0
        self.finished: Finished | None = None
        self.failed: APIError | None = None
        self.started = asyncio.Event()
        self.first_delta = asyncio.Event()
        worker.submit([self.job])
        self.task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        async for event in self.job.stream():
            if isinstance(event, Started):
                self.started.set()
            elif isinstance(event, Delta):
                self.text += event.text
                self.deltas += 1
                self.first_delta.set()
            elif isinstance(event, Finished):
                self.finished = event
            elif isinstance(event, Failed):
                self.failed = event.error

    async def result(self) -> str:
        await asyncio.wait_for(self.task, 120)
        if self.failed is not None:
            raise self.failed
        return self.text


async def single(prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[str]:
    """Each prompt alone on a fresh 1-slot scheduler: the reference output."""
    out = []
    for prompt in prompts:
        ref = new_scheduler(1)
        try:
            out.append(await Run(ref, prompt, params).result())
        finally:
            await asyncio.get_running_loop().run_in_executor(None, ref.close)
    return out


async def test_greedy_equals_a_batch_of_one_when_joining_mid_flight(
    worker: Scheduler, engine: Engine
) -> None:
    prompts = [engine.chat_prompt(messages(q)) for q in QUESTIONS[:4]]
    expected = await single(prompts)
    first = Run(worker, prompts[0], GREEDY)
    await first.first_delta.wait()  # the others join while the first is generating
    assert first.finished is None
    later = [Run(worker, p, GREEDY) for p in prompts[1:]]  # 3 slots: the last one queues
    texts = [await first.result()] + [await r.result() for r in later]
    assert texts == expected
    assert all(r.finished is not None and r.finished.finish_reason == "length" for r in later)
    assert first.finished is not None and first.finished.completion_tokens == 24


async def test_cancel_one_sequence_leaves_the_others_intact(
    worker: Scheduler, engine: Engine
) -> None:
    prompts = [engine.chat_prompt(messages(q)) for q in QUESTIONS[:3]]
    expected = await single([prompts[0], prompts[2]])
    runs = [Run(worker, p, GREEDY) for p in prompts]
    await runs[1].first_delta.wait()
    worker.cancel(runs[1].job)
    victim_slot = next(s.slot for s in worker.slot_stats() if s.job_id == runs[1].job.id)
    assert [await runs[0].result(), await runs[2].result()] == expected
    assert runs[1].finished is None and runs[1].deltas < 24
    runs[1].task.cancel()
    await worker.drain()
    stats = worker.slot_stats()
    assert stats[victim_slot].kv_tokens == 0  # the cancelled sequence's cells are gone
    assert all(s.job_id is None for s in stats)


def seeded(seed: int, max_tokens: int = 24) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, top_k=0, top_p=1.0, seed=seed)


async def test_seeded_sampling_is_reproducible_with_the_prompt_cache_on(
    worker: Scheduler, engine: Engine
) -> None:
    prompt = engine.chat_prompt(messages("Invent a name for a cat.", SYSTEM))
    assert len(prompt) > 2 * worker.chunk  # the shared system prompt spans whole chunks
    [fresh] = await single([prompt], seeded(7))
    # warm every slot with the same system prompt and other questions (unseeded and seeded)
    warm = [engine.chat_prompt(messages(q, SYSTEM)) for q in QUESTIONS[:3]]
    await asyncio.gather(*(Run(worker, p, GREEDY).result() for p in warm[:2]))
    await Run(worker, warm[2], seeded(3)).result()
    # the same seed again, batched beside other sequences, on a slot that caches the prefix
    others = [engine.chat_prompt(messages(q)) for q in QUESTIONS[3:5]]
    crowd = [Run(worker, others[0], seeded(1)), Run(worker, prompt, seeded(7))]
    crowd.append(Run(worker, others[1], GREEDY))
    texts = [await r.result() for r in crowd]
    again = crowd[1].finished
    assert again is not None and again.cached_tokens >= 2 * worker.chunk  # the cache served it
    assert texts[1] == fresh
    other_seed = await Run(worker, prompt, seeded(8)).result()
    assert other_seed != fresh


async def test_a_seeded_sequence_crossing_into_the_split_attention_path_matches_a_fresh_one(
    worker: Scheduler, engine: Engine
) -> None:
    """Flash attention is on (llama.cpp's ``auto`` on the CPU), and its kernel rounds a lone
    token differently once a sequence holds more than 256 cells. A seeded sequence whose
    generation crosses that line while others decode beside it gives what it gives alone."""
    assert worker.flash_attn
    boundary = llmis.engine.scheduler.ONE_PASS_CELLS
    prompt = next(
        p
        for n in range(0, len(SYSTEM), 8)
        if boundary - 12
        <= len(p := engine.chat_prompt(messages("Name a cat.", SYSTEM[:n])))
        < boundary - 4
    )
    ends = {llama_cpp.llama_vocab_eos(engine.vocab), llama_cpp.llama_vocab_eot(engine.vocab)}
    params = SamplingParams(  # runs its 32 tokens, so it crosses 256 cells mid-generation
        max_tokens=32,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        seed=5,
        logit_bias=dict.fromkeys(ends - {-1}, -100.0),
    )
    [fresh] = await single([prompt], params)
    others = [engine.chat_prompt(messages(q)) for q in QUESTIONS[:2]]
    crowd = [Run(worker, p, SamplingParams(max_tokens=96, temperature=0)) for p in others]
    for run in crowd:
        await run.first_delta.wait()  # both are decoding when the seeded one starts
    seeded_run = Run(worker, prompt, params)
    assert await seeded_run.result() == fresh
    assert seeded_run.finished is not None
    assert len(prompt) + seeded_run.finished.completion_tokens > boundary + 8  # it crossed
    assert all(r.finished is None for r in crowd)  # the others decoded beside it throughout
    await asyncio.gather(*(r.result() for r in crowd))


async def test_a_repeated_prompt_samples_from_the_saved_logits(
    worker: Scheduler, engine: Engine
) -> None:
    """The same prompt again needs no decode before its first token, seeded or not, and
    gives what a fresh context gives."""
    prompt = engine.chat_prompt(messages("Invent a name for a dog."))
    [fresh_seeded] = await single([prompt], seeded(11))
    [fresh_greedy] = await single([prompt])
    first = Run(worker, prompt, seeded(11))
    assert await first.result() == fresh_seeded
    assert first.finished is not None and first.finished.cached_tokens == 0
    for params, expected in [(seeded(11), fresh_seeded), (GREEDY, fresh_greedy)] * 2:
        again = Run(worker, prompt, params)
        assert await again.result() == expected
        assert again.finished is not None
        assert again.finished.cached_tokens == len(prompt)  # every prompt token from cache
    # a prompt extending the cached one is evaluated past it, and still matches
    longer = prompt + engine.tokenize(" Also", add_bos=False)
    [fresh_longer] = await single([longer], seeded(11))
    extended = Run(worker, longer, seeded(11))
    assert await extended.result() == fresh_longer


async def test_a_token_sampled_without_a_decode_goes_out_before_the_next_decode(
    worker: Scheduler, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first token of a repeated prompt (from the saved logits) reaches the client while
    the scheduler decodes the second one, not after it."""
    prompt = engine.chat_prompt(messages("Invent a name for a bird."))
    await Run(worker, prompt, GREEDY).result()
    gate, held = threading.Event(), threading.Event()
    real_decode = llama_cpp.llama_decode

    def holding(ctx: Any, batch: Any) -> int:
        held.set()
        gate.wait(30)
        return int(real_decode(ctx, batch))

    monkeypatch.setattr(llmis.engine.scheduler.llama_cpp, "llama_decode", holding)
    again = Run(worker, prompt, GREEDY)
    try:
        await asyncio.wait_for(again.first_delta.wait(), 10)
        assert await asyncio.to_thread(held.wait, 10)  # the next decode started, and waits
        assert not gate.is_set()
    finally:
        gate.set()
    monkeypatch.undo()
    await again.result()
    assert again.finished is not None and again.finished.cached_tokens == len(prompt)


async def test_a_seeded_request_takes_the_slot_whose_cache_it_can_use(
    worker: Scheduler, engine: Engine
) -> None:
    """Two slots hold the same prompt, one evaluated after a partial reuse (not canonical),
    the other canonically. A seeded request for it takes the canonical one, from its saved
    logits, even though the other is less recently used."""
    prompt = engine.chat_prompt(messages("Invent a name for a horse.", SYSTEM))
    await Run(worker, engine.chat_prompt(messages(QUESTIONS[0], SYSTEM)), GREEDY).result()
    # the unseeded copy reuses the system prompt's slot at an unaligned length; the seeded
    # one, started while that slot is busy, is evaluated canonically in an empty slot
    unseeded = Run(worker, prompt, GREEDY)
    await unseeded.first_delta.wait()
    first = Run(worker, prompt, seeded(4))
    await asyncio.gather(unseeded.result(), first.result())
    assert unseeded.finished is not None and unseeded.finished.cached_tokens % worker.chunk
    again = Run(worker, prompt, seeded(4))
    assert await again.result() == await first.result()
    assert again.finished is not None and again.finished.cached_tokens == len(prompt)


async def test_all_slots_free_after_a_burst(worker: Scheduler, engine: Engine) -> None:
    prompts = [engine.chat_prompt(messages(q)) for q in QUESTIONS] * 2  # 10 jobs, 3 slots
    params = SamplingParams(max_tokens=8, temperature=0)
    runs = [Run(worker, p, params) for p in prompts]
    peak = 0
    while not all(r.task.done() for r in runs):
        peak = max(peak, worker.running)
        await asyncio.sleep(0.005)
    assert peak == 3  # every slot was used, never more
    texts = [await r.result() for r in runs]
    assert texts[:5] == texts[5:]  # the same prompt gives the same greedy text in any slot
    await worker.drain()
    assert (worker.running, worker.queued, worker.busy) == (0, 0, False)
    stats = worker.slot_stats()
    assert [s.job_id for s in stats] == [None, None, None]
    # finished sequences keep their tokens cached for reuse, bounded by prompt + output
    assert all(0 < s.kv_tokens <= max(len(p) for p in prompts) + 8 for s in stats)
    assert worker.prompt_tokens_total == sum(len(p) for p in prompts)
    assert 0 < worker.cached_tokens_total < worker.prompt_tokens_total


async def test_prefix_reuse_on_second_chat_turn(worker: Scheduler, engine: Engine) -> None:
    turn1 = messages("Name a fruit.")
    first = Run(worker, engine.chat_prompt(turn1), GREEDY)
    reply = await first.result()
    assert first.finished is not None and first.finished.cached_tokens == 0
    turn2 = [*turn1, {"role": "assistant", "content": reply}, *messages("And a vegetable?")]
    prompt2 = engine.chat_prompt(turn2)
    second = Run(worker, prompt2, GREEDY)
    text = await second.result()
    assert second.finished is not None
    assert second.finished.cached_tokens >= len(first.job.prompt)  # turn 1 was not evaluated again
    assert second.finished.cached_tokens < len(prompt2)
    assert text == (await single([prompt2]))[0]  # greedy: the same text as a fresh evaluation


async def test_call_runs_between_steps(worker: Scheduler, engine: Engine) -> None:
    run = Run(worker, engine.chat_prompt(messages(QUESTIONS[0])), GREEDY)
    await run.first_delta.wait()
    assert await worker.call(lambda e: e.n_vocab) == engine.n_vocab
    assert await run.result() == (await single([list(run.job.prompt)]))[0]


async def test_kv_allocated_matches_the_prediction(worker: Scheduler) -> None:
    info = read_gguf_info(smollm_path())
    predicted = predict_memory(info, 1024, 512, worker.slots).kv_cache
    assert worker.kv_bytes > 0
    assert abs(worker.kv_bytes - predicted) <= 0.05 * predicted, (worker.kv_bytes, predicted)
    assert worker.engine.n_ctx == 1024


# ----- failures stay inside the request that caused them -----


async def test_a_sampler_failure_fails_only_its_request(
    worker: Scheduler, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = llmis.engine.scheduler.Sampler

    class Broken(real):  # type: ignore[misc, valid-type]
        def sample(self, ctx: Any, index: int) -> int:
            raise RuntimeError("injected")

    monkeypatch.setattr(
        llmis.engine.scheduler,
        "Sampler",
        lambda params, vocab: (Broken if params.seed == 666 else real)(params, vocab),
    )
    prompts = [engine.chat_prompt(messages(q)) for q in QUESTIONS[:3]]
    expected = await single([prompts[0], prompts[2]])
    good = Run(worker, prompts[0], GREEDY)
    bad = Run(worker, prompts[1], SamplingParams(max_tokens=24, temperature=0, seed=666))
    other = Run(worker, prompts[2], GREEDY)
    assert [await good.result(), await other.result()] == expected
    with pytest.raises(APIError, match="generation failed"):
        await bad.result()
    await worker.drain()
    assert all(s.job_id is None for s in worker.slot_stats())


async def test_a_failed_decode_fails_its_batch_and_the_scheduler_goes_on(
    worker: Scheduler, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_decode = llama_cpp.llama_decode
    calls = {"n": 0}

    def decode_failing_once(ctx: Any, batch: Any) -> int:
        calls["n"] += 1
        return -1 if calls["n"] == 3 else int(real_decode(ctx, batch))

    monkeypatch.setattr(llama_cpp, "llama_decode", decode_failing_once)
    prompt = engine.chat_prompt(messages(QUESTIONS[0]))
    with pytest.raises(APIError, match="failed to evaluate"):
        await Run(worker, prompt, GREEDY).result()
    monkeypatch.setattr(llama_cpp, "llama_decode", real_decode)
    assert await Run(worker, prompt, GREEDY).result() == (await single([prompt]))[0]


async def test_a_dead_scheduler_fails_everything_and_the_model_reloads() -> None:
    model = {"name": "smollm2", "resource": SMOLLM_RESOURCE, "n_ctx": 512, "slots": 2}
    settings = Settings.model_validate(
        {"server": {"threads": 2, "models_dir": "models"}, "models": [{**model, "queue_size": 4}]}
    )
    manager = ModelManager(settings)
    try:
        worker = await manager.acquire("smollm2")
        prompt = worker.engine.chat_prompt(messages(QUESTIONS[0]))

        def boom(outbox: Any) -> None:
            raise SystemError("injected scheduler crash")

        running = Run(worker, prompt, SamplingParams(max_tokens=400, temperature=0))
        await running.first_delta.wait()
        queued = [Run(worker, prompt, GREEDY) for _ in range(3)]  # 1 runs beside, 2 queue
        worker._step = boom  # type: ignore[method-assign]
        for run in [running, *queued]:
            with pytest.raises(APIError, match="failed while serving"):
                await run.result()
        assert worker.failure is not None
        entry = manager.entry("smollm2")
        for _ in range(100):
            if entry.worker is None:
                break
            await asyncio.sleep(0.05)
        assert entry.state.value == "failed" and entry.worker is None
        with pytest.raises(APIError) as refused:  # backoff: no reload on every request
            await manager.acquire("smollm2")
        assert refused.value.code == "model_failed"
        assert "Retry-After" in refused.value.headers
        entry.retry_at = 0.0  # the backoff has passed
        fresh = await manager.acquire("smollm2")
        assert fresh is not worker
        assert await Run(fresh, prompt, GREEDY).result() == (await single([prompt]))[0]
    finally:
        await manager.close()


async def test_close_waits_for_threads_reading_the_model() -> None:
    engine = Engine(smollm_path(), n_ctx=256, threads=2)
    entered, release = threading.Event(), threading.Event()

    def reader() -> None:
        with engine.use():
            entered.set()
            release.wait(10)
            engine.tokenize("still safe to read the vocabulary")

    thread = threading.Thread(target=reader)
    thread.start()
    entered.wait(10)
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive()  # close() waits for the reader
    release.set()
    thread.join(10)
    closer.join(10)
    assert not closer.is_alive()
    with pytest.raises(APIError):
        engine.tokenize("after close")


async def test_a_lease_is_held_until_prompt_preparation_ends() -> None:
    from llmis.serving.generation import _blocking

    settings = Settings.model_validate(
        {
            "server": {"threads": 2, "models_dir": "models"},
            "models": [{"name": "smollm2", "resource": SMOLLM_RESOURCE, "n_ctx": 256}],
        }
    )
    manager = ModelManager(settings)
    release = threading.Event()
    try:

        async def request() -> None:
            async with manager.lease("smollm2") as worker:
                await _blocking(lambda: (release.wait(10), worker.engine.tokenize("x")))

        task = asyncio.create_task(request())
        entry = manager.entry("smollm2")
        for _ in range(200):
            if entry.leases:
                break
            await asyncio.sleep(0.02)
        task.cancel()  # the client went away while its prompt was being prepared
        await asyncio.sleep(0.1)
        assert entry.leases == 1 and not task.done()  # the thread still reads the model
        unload = asyncio.create_task(manager.unload("smollm2"))
        await asyncio.sleep(0.1)
        assert not unload.done() and entry.worker is not None
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(unload, 30)
        assert entry.leases == 0 and entry.worker is None
    finally:
        release.set()
        await manager.close()


# ----- no sampler setting can abort the process through the grammar -----


async def test_grammar_sampling_survives_any_sampler_setting(
    worker: Scheduler, engine: Engine
) -> None:
    rng = random.Random(12)
    prompt = engine.chat_prompt(messages("Give me JSON describing a cat."))
    schema_grammar = (
        'root ::= "{" ws "\\"n\\"" ws ":" ws ("1" | "2" | "3") ws "}"\nws ::= [ \\t\\n]*'
    )
    cases = [
        # the reproducer: a penalty that turns logits into inf/NaN
        SamplingParams(max_tokens=16, repeat_penalty=5e-324, seed=2, grammar=JSON_GBNF),
        # truncation that leaves no allowed candidate, and a bias against every allowed token
        SamplingParams(max_tokens=16, top_k=1, min_p=1.0, seed=3, grammar=schema_grammar),
        SamplingParams(
            max_tokens=16,
            temperature=0,
            logit_bias={t: -100.0 for t in engine.tokenize("{", add_bos=False)},
            grammar=schema_grammar,
        ),
    ]
    for _ in range(12):
        cases.append(
            SamplingParams(
                max_tokens=rng.choice([4, 16, 32]),
                temperature=rng.choice([0.0, 0.5, 1.0, 5.0, 1e6]),
                top_k=rng.choice([0, 1, 2, 40]),
                top_p=rng.choice([0.0, 0.1, 1.0]),
                min_p=rng.choice([0.0, 0.5, 1.0]),
                repeat_penalty=rng.choice([1e-30, 0.5, 1.0, 2.0, 1e30]),
                presence_penalty=rng.choice([-2.0, 0.0, 2.0]),
                frequency_penalty=rng.choice([-2.0, 0.0, 2.0]),
                seed=rng.randrange(1000),
                grammar=rng.choice([JSON_GBNF, schema_grammar]),
            )
        )
    runs = [Run(worker, prompt, params) for params in cases]
    for run, params in zip(runs, cases, strict=True):
        await asyncio.wait_for(run.task, 120)
        if run.failed is not None:  # a clean per-request error is allowed, nothing else
            assert run.failed.code == "grammar_dead_end", run.failed
            continue
        assert run.finished is not None
        if params.grammar == schema_grammar and run.finished.finish_reason == "stop":
            assert json.loads(run.text)["n"] in (1, 2, 3)
    assert (await Run(worker, prompt, GREEDY).result()) != ""  # and the scheduler goes on


# ----- through a real server -----

SERVER_CONFIG = f"""
[server]
host = "127.0.0.1"
threads = 2

[[models]]
name = "batched"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 512
slots = 4

[[models]]
name = "single"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 512
slots = 1
"""


@pytest.fixture(scope="module")
def server4(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server(SERVER_CONFIG)


def stream_chat(server: RunningServer, model: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST a streaming chat request; return the text, finish reason, usage and chunk count."""
    payload = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        **body,
    }
    request = urllib.request.Request(
        server.base_url + "/chat/completions",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    text, finish, usage, done = "", None, None, False
    with urllib.request.urlopen(request, timeout=120) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                text += choice["delta"].get("content", "")
                finish = choice["finish_reason"] or finish
    return {"text": text, "finish": finish, "usage": usage, "done": done}


def test_server_concurrent_streams_equal_unbatched(server4: RunningServer) -> None:
    bodies = [{"messages": messages(q), "max_tokens": 16} for q in QUESTIONS]
    expected = [stream_chat(server4, "single", b)["text"] for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: stream_chat(server4, "batched", b), bodies))
    assert [r["text"] for r in results] == expected
    assert all(r["done"] and r["finish"] == "length" for r in results)
    assert all(r["usage"]["completion_tokens"] == 16 for r in results)
    status, listing = server4.get_json("/admin/models")
    assert status == 200 and isinstance(listing, dict)
    slots = next(m["slots"] for m in listing["data"] if m["name"] == "batched")
    assert [s["job_id"] for s in slots] == [None] * 4  # the burst is over: every slot is free
    assert all(s["kv_tokens"] > 0 for s in slots)  # 5 requests used all 4; prefixes stay cached


def scrape_cached(server: RunningServer, model: str) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "llmis:prompt_tokens_cached_total"
                and sample.labels.get("model_name") == model
            ):
                return float(sample.value)
    raise AssertionError(f"no llmis:prompt_tokens_cached_total for {model}")


def test_server_reports_cached_prompt_tokens(server4: RunningServer) -> None:
    before = scrape_cached(server4, "batched")
    turn1 = messages("Name a bird.")
    first = stream_chat(server4, "batched", {"messages": turn1, "max_tokens": 12})
    turn2 = [*turn1, {"role": "assistant", "content": first["text"]}, *messages("Why?")]
    second = stream_chat(server4, "batched", {"messages": turn2, "max_tokens": 12})
    details = second["usage"]["prompt_tokens_details"]
    assert details["cached_tokens"] >= first["usage"]["prompt_tokens"]
    assert details["cached_tokens"] < second["usage"]["prompt_tokens"]
    cached_in_usage = first["usage"]["prompt_tokens_details"]["cached_tokens"]
    cached_in_usage += details["cached_tokens"]
    assert scrape_cached(server4, "batched") - before == cached_in_usage
    # greedy on a batch of one, without turn 1 in its cache: the same text
    fresh = stream_chat(server4, "single", {"messages": turn2, "max_tokens": 12})
    assert second["text"] == fresh["text"]


def test_server_one_slot_reports_cached_prompt_tokens(server4: RunningServer) -> None:
    turn1 = messages("Name a tree.")
    first = stream_chat(server4, "single", {"messages": turn1, "max_tokens": 12})
    turn2 = [*turn1, {"role": "assistant", "content": first["text"]}, *messages("Where?")]
    second = stream_chat(server4, "single", {"messages": turn2, "max_tokens": 12})
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first["usage"]["prompt_tokens"] <= cached < second["usage"]["prompt_tokens"]


def test_server_enforces_response_format(server4: RunningServer) -> None:
    schema = {"type": "object", "properties": {"n": {"enum": [1, 2, 3]}}, "required": ["n"]}
    body = {
        "messages": messages("Pick a number."),
        "max_tokens": 30,
        "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
    }
    batched = stream_chat(server4, "batched", body)
    single = stream_chat(server4, "single", body)
    assert json.loads(batched["text"])["n"] in {1, 2, 3}
    assert batched["text"] == single["text"]
