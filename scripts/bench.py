"""`make bench` (serving): one stream through the server vs the same model in process.

Runs, interleaved round by round (the machine is noisy, so only side-by-side ratios mean
anything):
  A  llama-cpp-python in process: ``Llama.create_chat_completion(stream=True)``
  B  llmis's scheduler in process (a batch of one), no server
  C  the llmis server, one SSE stream read with aiohttp
Each run generates 128 tokens (EOS banned, greedy) after a chat prompt. Prints per-variant
medians of decode tokens/s and time to first token, and the ratios C/A.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable, Iterable

import aiohttp
from llama_cpp import Llama

from llmis.engine.jobs import Delta, Job
from llmis.engine.llama import Engine
from llmis.engine.sampling import SamplingParams
from llmis.engine.scheduler import Scheduler
from tests.conftest import launch, smollm_config, smollm_path

TOKENS = 128
EOS = 2


def messages(round_: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Story {round_}: tell me about a lighthouse keeper."}]


def timed(chunks: Iterable[object]) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _ in chunks]
    return t0, stamps


def run_llama(llm: Llama, round_: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    stamps: list[float] = []
    for chunk in llm.create_chat_completion(
        messages=messages(round_),  # type: ignore[arg-type]
        max_tokens=TOKENS,
        temperature=0,
        logit_bias={EOS: -100.0},
        stream=True,
    ):
        if chunk["choices"][0]["delta"].get("content"):  # type: ignore[index, union-attr]
            stamps.append(time.perf_counter())
    return summarize(t0, stamps)


def run_engine(scheduler: Scheduler, round_: int) -> tuple[float, float]:
    async def one() -> tuple[float, float]:
        t0 = time.perf_counter()
        prompt = scheduler.engine.chat_prompt(messages(round_))
        params = SamplingParams(max_tokens=TOKENS, temperature=0, logit_bias={EOS: -100.0})
        job = Job(prompt, params, asyncio.get_running_loop())
        scheduler.submit([job])
        stamps = [time.perf_counter() async for e in job.stream() if isinstance(e, Delta)]
        return summarize(t0, stamps)

    return asyncio.run(one())


async def run_server(url: str, round_: int) -> tuple[float, float]:
    body = {
        "model": "smollm2",
        "messages": messages(round_),
        "max_tokens": TOKENS,
        "temperature": 0,
        "logit_bias": {str(EOS): -100},
        "stream": True,
    }
    stamps: list[float] = []
    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    choice = json.loads(line[6:])["choices"]
                    if choice and choice[0]["delta"].get("content"):
                        stamps.append(time.perf_counter())
    return summarize(t0, stamps)


def summarize(t0: float, stamps: list[float]) -> tuple[float, float]:
    """(decode tokens/s after the first token, time to first token in ms)."""
    if len(stamps) < 2:
        raise RuntimeError("too few tokens streamed")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), (stamps[0] - t0) * 1000


def report(name: str, rows: list[tuple[float, float]]) -> tuple[float, float]:
    tps = statistics.median(r[0] for r in rows)
    ttft = statistics.median(r[1] for r in rows)
    print(f"  {name:<38} {tps:8.1f} tok/s   TTFT {ttft:7.1f} ms   (n={len(rows)})")
    return tps, ttft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import tempfile
    from pathlib import Path

    workdir = Path(tempfile.mkdtemp(prefix="llmis-bench-"))
    server = launch(smollm_config().replace("threads = 2", f"threads = {args.threads}"), workdir)
    path = str(smollm_path())
    llm = Llama(
        path, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads, verbose=False
    )
    engine = Scheduler(
        "smollm2", Engine(smollm_path(), n_ctx=2048, threads=args.threads), 16, slots=4
    )
    variants: dict[str, Callable[[int], tuple[float, float]]] = {
        "A llama-cpp-python in process": lambda r: run_llama(llm, r),
        "B llmis engine in process": lambda r: run_engine(engine, r),
        "C llmis server (SSE, aiohttp)": lambda r: asyncio.run(run_server(server.url, r)),
    }
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    try:
        for fn in variants.values():  # warm-up, not counted
            fn(-1)
        for round_ in range(args.rounds):
            order = list(variants.items())
            if round_ % 2:
                order.reverse()  # A B C C B A ...: no variant always runs first
            for name, fn in order:
                results[name].append(fn(round_))
    finally:
        server.stop()
        engine.close()
    print(
        f"\nserving bench: SmolLM2-135M Q4_1, {TOKENS} tokens, {args.threads} threads, "
        f"{args.rounds} interleaved rounds (medians)"
    )
    a = report("A llama-cpp-python in process", results["A llama-cpp-python in process"])
    b = report("B llmis engine in process", results["B llmis engine in process"])
    c = report("C llmis server (SSE, aiohttp)", results["C llmis server (SSE, aiohttp)"])
    paired = [
        rc[0] / ra[0]
        for ra, rc in zip(
            results["A llama-cpp-python in process"],
            results["C llmis server (SSE, aiohttp)"],
            strict=True,
        )
    ]
    print(
        f"  tokens/s ratio server/in-process (C/A): {c[0] / a[0]:.3f}  "
        f"(per-round median {statistics.median(paired):.3f}; target >= 0.95)"
    )
    print(f"  tokens/s ratio engine/in-process (B/A): {b[0] / a[0]:.3f}")
    print(
        f"  TTFT added by the server (C - A): {c[1] - a[1]:+.1f} ms  (target <= +10 ms); "
        f"C - B: {c[1] - b[1]:+.1f} ms"
    )


if __name__ == "__main__":
    main()
