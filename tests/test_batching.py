"""Continuous batching (``llmis.batching.BatchWorker``) on the real SmolLM2 model.

The worker-level tests drive a BatchWorker directly and compare its output token for token
with the single-sequence path (``Engine.generate`` on a fresh context). The server tests
run a real llmis with a batched and an unbatched copy of the model side by side.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmis.batching import BatchWorker
from llmis.engine import Engine, SamplingParams
from llmis.worker import Delta, Failed, Finished, Job, Started
from tests.conftest import SMOLLM_RESOURCE, RunningServer, smollm_path

QUESTIONS = [
    "Write a short poem about the sea.",
    "List three colors and describe each.",
    "Explain why the sky is blue.",
    "Tell me a story about a dragon.",
    "What is a prime number?",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0)


def messages(question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def reference() -> Iterator[Engine]:
    engine = Engine(smollm_path(), n_ctx=512, threads=2)
    yield engine
    engine.close()


@pytest.fixture
async def worker() -> AsyncIterator[BatchWorker]:
    worker = BatchWorker("smollm2", Engine(smollm_path(), n_ctx=512, threads=2), 8, slots=3)
    yield worker
    await asyncio.get_running_loop().run_in_executor(None, worker.close)


def single(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY) -> str:
    """The single-sequence path on an empty KV cache."""
    engine.llm.reset()
    return "".join(s.text for s in engine.generate(prompt, params, threading.Event()))


class Run:
    """One job on a worker, its events collected as they arrive."""

    def __init__(self, worker: BatchWorker, prompt: list[int], params: SamplingParams) -> None:
        self.job = Job(prompt, params, asyncio.get_running_loop())
        self.text = ""
        self.deltas = 0
        self.finished: Finished | None = None
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
                raise event.error

    async def result(self) -> str:
        await asyncio.wait_for(self.task, 120)
        return self.text


async def test_greedy_equals_single_path_when_joining_mid_flight(
    worker: BatchWorker, reference: Engine
) -> None:
    prompts = [reference.chat_prompt(messages(q)) for q in QUESTIONS[:4]]
    expected = [single(reference, p) for p in prompts]
    first = Run(worker, prompts[0], GREEDY)
    await first.first_delta.wait()  # the others join while the first is generating
    assert first.finished is None
    later = [Run(worker, p, GREEDY) for p in prompts[1:]]  # 3 slots: the last one queues
    texts = [await first.result()] + [await r.result() for r in later]
    assert texts == expected
    assert all(r.finished is not None and r.finished.finish_reason == "length" for r in later)
    assert first.finished is not None and first.finished.completion_tokens == 24


async def test_cancel_one_sequence_leaves_the_others_intact(
    worker: BatchWorker, reference: Engine
) -> None:
    prompts = [reference.chat_prompt(messages(q)) for q in QUESTIONS[:3]]
    expected = [single(reference, p) for p in (prompts[0], prompts[2])]
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


async def test_seeded_sampling_is_reproducible_per_sequence(
    worker: BatchWorker, reference: Engine
) -> None:
    prompt = reference.chat_prompt(messages("Invent a name for a cat."))
    others = [reference.chat_prompt(messages(q)) for q in QUESTIONS[:2]]

    def seeded(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=24, temperature=1.0, top_k=0, top_p=1.0, seed=seed)

    alone = await Run(worker, prompt, seeded(7)).result()
    # the same seed again, now batched beside other sequences with other seeds
    crowd = [Run(worker, others[0], seeded(1)), Run(worker, prompt, seeded(7))]
    crowd.append(Run(worker, others[1], seeded(2)))
    texts = [await r.result() for r in crowd]
    assert texts[1] == alone
    other_seed = await Run(worker, prompt, seeded(8)).result()
    assert other_seed != alone


async def test_all_slots_free_after_a_burst(worker: BatchWorker, reference: Engine) -> None:
    prompts = [reference.chat_prompt(messages(q)) for q in QUESTIONS] * 2  # 10 jobs, 3 slots
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


async def test_prefix_reuse_on_second_chat_turn(worker: BatchWorker, reference: Engine) -> None:
    turn1 = messages("Name a fruit.")
    first = Run(worker, reference.chat_prompt(turn1), GREEDY)
    reply = await first.result()
    assert first.finished is not None and first.finished.cached_tokens == 0
    turn2 = [*turn1, {"role": "assistant", "content": reply}, *messages("And a vegetable?")]
    prompt2 = reference.chat_prompt(turn2)
    second = Run(worker, prompt2, GREEDY)
    text = await second.result()
    assert second.finished is not None
    assert second.finished.cached_tokens >= len(first.job.prompt)  # turn 1 was not evaluated again
    assert second.finished.cached_tokens < len(prompt2)
    assert text == single(reference, prompt2)  # same output as evaluating the whole prompt


async def test_call_runs_between_steps_on_the_engine(
    worker: BatchWorker, reference: Engine
) -> None:
    run = Run(worker, reference.chat_prompt(messages(QUESTIONS[0])), GREEDY)
    await run.first_delta.wait()
    n_vocab = await worker.call(lambda engine: engine.llm.n_vocab())
    assert n_vocab == reference.llm.n_vocab()
    assert await run.result() == single(reference, list(run.job.prompt))


# ----- through a real server -----

BATCHED_CONFIG = f"""
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
"""


@pytest.fixture(scope="module")
def batched_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server(BATCHED_CONFIG)


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


def test_server_concurrent_streams_equal_unbatched(batched_server: RunningServer) -> None:
    bodies = [{"messages": messages(q), "max_tokens": 16} for q in QUESTIONS]
    expected = [stream_chat(batched_server, "single", b)["text"] for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: stream_chat(batched_server, "batched", b), bodies))
    assert [r["text"] for r in results] == expected
    assert all(r["done"] and r["finish"] == "length" for r in results)
    assert all(r["usage"]["completion_tokens"] == 16 for r in results)
    status, listing = batched_server.get_json("/admin/models")
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


def test_server_reports_cached_prompt_tokens(batched_server: RunningServer) -> None:
    before = scrape_cached(batched_server, "batched")
    turn1 = messages("Name a bird.")
    first = stream_chat(batched_server, "batched", {"messages": turn1, "max_tokens": 12})
    turn2 = [*turn1, {"role": "assistant", "content": first["text"]}, *messages("Why?")]
    second = stream_chat(batched_server, "batched", {"messages": turn2, "max_tokens": 12})
    details = second["usage"]["prompt_tokens_details"]
    assert details["cached_tokens"] >= first["usage"]["prompt_tokens"]
    assert details["cached_tokens"] < second["usage"]["prompt_tokens"]
    cached_in_usage = first["usage"]["prompt_tokens_details"]["cached_tokens"]
    cached_in_usage += details["cached_tokens"]
    assert scrape_cached(batched_server, "batched") - before == cached_in_usage
    # a seed turns prefix reuse off: the whole prompt is evaluated, on the unbatched path
    fresh = stream_chat(batched_server, "single", {"messages": turn2, "max_tokens": 12, "seed": 1})
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["text"] == fresh["text"]


def test_server_unbatched_path_reports_cached_prompt_tokens(batched_server: RunningServer) -> None:
    turn1 = messages("Name a tree.")
    first = stream_chat(batched_server, "single", {"messages": turn1, "max_tokens": 12})
    turn2 = [*turn1, {"role": "assistant", "content": first["text"]}, *messages("Where?")]
    second = stream_chat(batched_server, "single", {"messages": turn2, "max_tokens": 12})
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first["usage"]["prompt_tokens"] <= cached < second["usage"]["prompt_tokens"]


def test_server_batched_path_enforces_response_format(batched_server: RunningServer) -> None:
    schema = {"type": "object", "properties": {"n": {"enum": [1, 2, 3]}}, "required": ["n"]}
    body = {
        "messages": messages("Pick a number."),
        "max_tokens": 30,
        "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
    }
    batched = stream_chat(batched_server, "batched", body)
    single = stream_chat(batched_server, "single", body)
    assert json.loads(batched["text"])["n"] in {1, 2, 3}
    assert batched["text"] == single["text"]
