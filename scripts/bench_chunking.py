"""`make bench` (stream chunking): what ``stream_options.chunk_tokens`` / ``min_interval_ms``
save at 8 concurrent clients.

One llmis server (SmolLM2, 8 slots); each round runs every variant once, interleaved (the
machine is noisy: compare within a round): 8 SSE streams of 96 tokens each (EOS banned). For
each variant it prints the median over rounds of the server's event-loop CPU time (the main
thread's user+system CPU, read with psutil, where SSE framing and writes happen; the decode
threads are left out), the events received and the aggregate tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from tests.conftest import SMOLLM_RESOURCE, launch

CLIENTS = 8
TOKENS = 96
NO_EOS = {"2": -100}
VARIANTS: dict[str, dict[str, Any]] = {
    "1 token/event (OpenAI framing)": {"chunk_tokens": 1},
    "8 tokens/event": {"chunk_tokens": 8},
    "min_interval 100 ms": {"min_interval_ms": 100},
}

CONFIG = f"""
[server]
host = "127.0.0.1"
threads = 2

[[models]]
name = "smollm2"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 512
slots = {CLIENTS}
"""


def loop_cpu(pid: int) -> float:
    """CPU seconds of the server's main thread (its event loop)."""
    for thread in psutil.Process(pid).threads():
        if thread.id == pid:
            return float(thread.user_time + thread.system_time)
    raise RuntimeError("no main thread")


async def stream(session: aiohttp.ClientSession, url: str, options: dict[str, Any]) -> int:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        "max_tokens": TOKENS,
        "logit_bias": NO_EOS,
        "temperature": 0.7,
        "stream": True,
        "stream_options": options,
    }
    events = 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        async for line in resp.content:
            if line.startswith(b"data: {"):
                events += 1
    return events


async def run(url: str, pid: int, options: dict[str, Any]) -> tuple[float, int, float]:
    async with aiohttp.ClientSession() as session:
        cpu0, t0 = loop_cpu(pid), time.perf_counter()
        events = await asyncio.gather(*(stream(session, url, options) for _ in range(CLIENTS)))
        wall = time.perf_counter() - t0
        return loop_cpu(pid) - cpu0, sum(events), CLIENTS * TOKENS / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = launch(CONFIG, Path(tmp))
        try:
            asyncio.run(run(server.url, server.process.pid, {}))  # warm up
            results: dict[str, list[tuple[float, int, float]]] = {v: [] for v in VARIANTS}
            for _ in range(args.rounds):
                for name, options in VARIANTS.items():
                    results[name].append(asyncio.run(run(server.url, server.process.pid, options)))
        finally:
            server.stop()
    base = statistics.median(r[0] for r in results[next(iter(VARIANTS))])
    print(f"{CLIENTS} clients x {TOKENS} tokens, median of {args.rounds} rounds")
    print(f"{'variant':34} {'loop CPU s':>10} {'vs 1/event':>10} {'events':>7} {'tok/s':>7}")
    for name, rows in results.items():
        cpu = statistics.median(r[0] for r in rows)
        events = int(statistics.median(r[1] for r in rows))
        tps = statistics.median(r[2] for r in rows)
        print(f"{name:34} {cpu:10.3f} {cpu / base:10.2f} {events:7d} {tps:7.1f}")


if __name__ == "__main__":
    main()
