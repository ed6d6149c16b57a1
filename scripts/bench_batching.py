"""`make bench-batching`: llmis (continuous batching) against llama-server and llama-cpp-python.

Starts three servers per model, side by side, on the same GGUF file and thread count:
  llmis              ``slots`` sequences batched in one llama context
  llama-server       llama.cpp's own server (``-np`` slots), built once into
                     ``~/.cache/llmis/llama-server/<sdist hash>/`` from the llama.cpp source
                     vendored in the ``llama-cpp-python==0.3.36`` sdist (AMX off, no curl)
  llama-cpp-python   ``python -m llama_cpp.server`` (needs ``pip install -e .[bench]``)
Then, for 1, 4 and 8 concurrent streaming chat clients (128 tokens each, greedy, end-of-turn
tokens banned with ``logit_bias``), runs each server in turn, alternating the order every
round (A B C, C B A, ...) because the machine is noisy, and prints per server: aggregate
tokens/s (median of rounds), TTFT p50/p95, inter-token p50, broken streams, RSS, and the
ratios llmis / llama-server. A stream is broken when it errors, ends without ``[DONE]`` or
a finish reason, or brings fewer tokens than asked.

``--llmis-env K=V[,K=V]`` (repeatable) starts one more llmis per value, with that environment
(e.g. ``GOMP_SPINCOUNT=300000``, libgomp's own default, against llmis's thread-wait default;
see ``llmis/__init__.py``); llama-server and llama-cpp-python always run with libgomp's
defaults (:data:`OMP_KEYS` removed from their environment).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import llama_cpp
import psutil

from llmis import OMP_DEFAULTS
from llmis.models.files import resolve_resource
from tests.conftest import GEMMA_RESOURCE, SMOLLM_RESOURCE, free_port, launch

LLAMA_VERSION = "0.3.36"
AMX_OFF = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CACHE = Path(os.environ.get("LLMIS_CACHE", Path.home() / ".cache" / "llmis")) / "llama-server"
OMP_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # how llama.cpp's OpenMP threads wait
MODELS = {"smollm2": (SMOLLM_RESOURCE, None), "gemma": (GEMMA_RESOURCE, "gemma")}
QUESTIONS = [
    "Tell me a long story about a lighthouse keeper and the sea, in many chapters.",
    "Describe, step by step, how bread is made, from the field to the table.",
    "Write a long letter from a sailor to his family about a voyage around the world.",
    "Explain in detail how a city's water supply works, for a curious child.",
]


# ----- llama-server, built once -----


def llama_server_binary() -> Path:
    """Download the sdist, build ``llama-server`` from its vendored llama.cpp, cache it."""
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _cached_sdist(Path(tmp))
        key = hashlib.sha256(sdist.read_bytes()).hexdigest()[:16]
        root = CACHE / key
        binary = root / "build" / "bin" / "llama-server"
        if binary.exists():
            return binary
        print(f"building llama-server into {root} (once; takes minutes)", flush=True)
        src = root / "src"
        if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
            src.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                ["tar", "xzf", str(sdist), "-C", str(src), "--strip-components=1"], check=True
            )
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(
        [
            "cmake",
            "-S",
            str(src / "vendor" / "llama.cpp"),
            "-B",
            str(root / "build"),
            *generator,
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DBUILD_SHARED_LIBS=OFF",
            f"-DCMAKE_C_FLAGS={AMX_OFF}",
            f"-DCMAKE_CXX_FLAGS={AMX_OFF}",
        ],
        check=True,
    )
    jobs = str(os.cpu_count() or 2)
    subprocess.run(
        ["cmake", "--build", str(root / "build"), "--target", "llama-server", "-j", jobs],
        check=True,
    )
    return binary


def _cached_sdist(tmp: Path) -> Path:
    sdists = CACHE / "sdist"
    found = sorted(sdists.glob(f"llama_cpp_python-{LLAMA_VERSION}.tar.gz"))
    if found:
        return found[0]
    sdists.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"llama-cpp-python=={LLAMA_VERSION}",
            "-d",
            str(tmp),
        ],
        check=True,
    )
    target = sdists / f"llama_cpp_python-{LLAMA_VERSION}.tar.gz"
    shutil.move(str(next(tmp.glob("llama_cpp_python-*.tar.gz"))), target)
    return target


# ----- servers -----


@dataclass
class Server:
    name: str
    url: str
    model: str
    process: psutil.Process
    popen: subprocess.Popen[bytes] | None = None

    def rss(self) -> int:
        with contextlib.suppress(psutil.Error):
            procs = [self.process, *self.process.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs)
        return 0

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()


def _wait_http(url: str, popen: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"{url} exited with {popen.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up:\n{log.read_text()[-3000:]}")


def add_llmis_env_argument(parser: argparse.ArgumentParser) -> None:
    """``--llmis-env K=V[,K=V]`` (repeatable): one more llmis per value, with that environment."""
    parser.add_argument(
        "--llmis-env",
        action="append",
        default=[],
        metavar="K=V[,K=V]",
        help="also run an llmis with this environment (repeatable), e.g. GOMP_SPINCOUNT=300000",
    )


def parse_env(spec: str) -> dict[str, str]:
    """``"K=V,K=V"`` -> a dict (``""``: none)."""
    return dict(kv.split("=", 1) for kv in spec.split(",") if kv)


def clear_omp_env() -> str:
    """Drop :data:`OMP_KEYS` from this process's environment (the servers inherit it; ``import
    llmis`` sets one) and describe what each server gets."""
    for key in OMP_KEYS:
        os.environ.pop(key, None)
    ours = ",".join(f"{k}={v}" for k, v in OMP_DEFAULTS.items())
    return f"OpenMP wait: llmis {ours} (its default), llama.cpp's servers libgomp's default"


def llmis_name(spec: str) -> str:
    return f"llmis[{spec}]" if spec else "llmis"


def start_llmis(workdir: Path, model: str, args: argparse.Namespace, env_spec: str = "") -> Server:
    resource, chat_format = MODELS[model]
    fmt = f'chat_format = "{chat_format}"' if chat_format else ""
    config = f"""
[server]
host = "127.0.0.1"
threads = {args.threads}

[[models]]
name = "{model}"
resource = "{resource}"
n_ctx = {args.ctx}
slots = {args.slots}
queue_size = 64
flash_attn = "{args.flash_attn}"
{fmt}
"""
    name = llmis_name(env_spec)
    tag = "".join(c if c.isalnum() else "-" for c in name)
    running = launch(config, workdir / f"{tag}-{model}", env=parse_env(env_spec))
    return Server(name, running.url, model, psutil.Process(running.process.pid), running.process)


def start_llama_server(binary: Path, workdir: Path, model: str, args: argparse.Namespace) -> Server:
    path = resolve_resource(MODELS[model][0], workdir)
    port = free_port()
    log = workdir / f"llama-server-{model}.log"
    cmd = [str(binary), "-m", str(path), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-t", str(args.threads), "-tb", str(args.threads), "-np", str(args.slots)]
    cmd += ["-c", str(args.ctx * args.slots), "--no-webui", "-fa", args.flash_attn]
    with log.open("wb") as out:
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait_http(url + "/health", popen, log)
    return Server("llama-server", url, model, psutil.Process(popen.pid), popen)


def start_llama_cpp_python(workdir: Path, model: str, args: argparse.Namespace) -> Server:
    resource, chat_format = MODELS[model]
    port = free_port()
    log = workdir / f"llama-cpp-python-{model}.log"
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(resolve_resource(resource, workdir)),
    ]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(args.ctx)]
    cmd += ["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
    cmd += ["--model_alias", model, "--verbose", "False"]
    cmd += ["--flash_attn", str(args.flash_attn != "off")]
    if chat_format:
        cmd += ["--chat_format", chat_format]
    with log.open("wb") as out:
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait_http(url + "/v1/models", popen, log)
    return Server("llama-cpp-python", url, model, psutil.Process(popen.pid), popen)


# ----- clients -----


@dataclass
class Stream:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    broken: bool = False
    text: str = ""


def eog_bias(path: Path) -> dict[str, float]:
    """``logit_bias`` that bans every end-of-generation token, so each stream runs full length."""
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    vocab = llm._model.vocab
    banned = [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    llm.close()
    return {str(t): -100.0 for t in banned}


async def one_stream(
    session: aiohttp.ClientSession,
    server: Server,
    bias: dict[str, float],
    tokens: int,
    messages: list[dict[str, str]],
    seed: int | None = None,
) -> Stream:
    body: dict[str, object] = {
        "model": server.model,
        "messages": messages,
        "max_tokens": tokens,
        "temperature": 0.8 if seed is not None else 0,
        "logit_bias": bias,
        "stream": True,
    }
    if seed is not None:
        body["seed"] = seed
    result = Stream()
    done = finished = False
    t0 = last = time.perf_counter()
    try:
        async with session.post(server.url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                result.broken = True
                return result
            async for raw in resp.content:
                line = raw.strip()
                if line == b"data: [DONE]":
                    done = True
                    continue
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk or not chunk.get("choices"):
                    result.broken = result.broken or "error" in chunk
                    continue
                choice = chunk["choices"][0]
                finished = finished or bool(choice.get("finish_reason"))
                if choice.get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - t0
                    else:
                        result.gaps.append(now - last)
                    last = now
                    result.tokens += 1
                    result.text += choice["delta"]["content"]
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        result.broken = True
    # one chunk per token on every server here; allow a few merged/held-back pieces
    result.broken = result.broken or not (done and finished) or result.tokens < tokens * 0.9
    return result


@dataclass
class Round:
    tok_s: float
    streams: list[Stream]
    rss: int


async def run_round(
    server: Server, clients: int, bias: dict[str, float], tokens: int, seeded: bool
) -> Round:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.perf_counter()
        streams = await asyncio.gather(
            *(
                one_stream(
                    session,
                    server,
                    bias,
                    tokens,
                    [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                    seed=i + 1 if seeded else None,
                )
                for i in range(clients)
            )
        )
        wall = time.perf_counter() - t0
    return Round(sum(s.tokens for s in streams) / wall, list(streams), server.rss())


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(name: str, rounds: list[Round]) -> dict[str, float]:
    streams = [s for r in rounds for s in r.streams]
    ttfts = [s.ttft for s in streams if s.ttft is not None]
    gaps = [g for s in streams for g in s.gaps]
    return {
        "tok_s": statistics.median(r.tok_s for r in rounds),
        "ttft50": pct(ttfts, 0.5) * 1000,
        "ttft95": pct(ttfts, 0.95) * 1000,
        "itl50": pct(gaps, 0.5) * 1000,
        "itl99": pct(gaps, 0.99) * 1000,
        "broken": sum(s.broken for s in streams),
        "streams": len(streams),
        "rss": max(r.rss for r in rounds) / 2**20,
    }


def order(servers: list[Server], round_: int) -> Iterator[Server]:
    return iter(servers if round_ % 2 == 0 else servers[::-1])


async def bench_model(
    servers: list[Server], bias: dict[str, float], args: argparse.Namespace
) -> None:
    # one short request each first: otherwise whichever server runs first pays its cold start
    # (page faults of the weights, first graph) in the first measured round
    for server in servers:
        await run_round(server, 1, bias, 8, False)
    for seeded in args.seeded:
        for clients in args.clients:
            results: dict[str, list[Round]] = {s.name: [] for s in servers}
            for round_ in range(args.rounds):
                for server in order(servers, round_):
                    results[server.name].append(
                        await run_round(server, clients, bias, args.tokens, seeded)
                    )
            rows = {name: summarize(name, rounds) for name, rounds in results.items()}
            kind = "seeded" if seeded else "unseeded"
            print(f"\n  {clients} client(s), {kind}, {args.tokens} tokens, {args.rounds} rounds")
            print(
                f"  {'server':<17}{'tok/s':>8}{'TTFT p50':>10}{'p95':>8}{'ITL p50':>9}{'p99':>8}"
                f"{'broken':>9}{'RSS MB':>8}"
            )
            for name, row in rows.items():
                broken = f"{row['broken']}/{row['streams']}"
                print(
                    f"  {name:<17}{row['tok_s']:>8.1f}{row['ttft50']:>8.0f}ms"
                    f"{row['ttft95']:>6.0f}ms{row['itl50']:>7.1f}ms{row['itl99']:>6.0f}ms"
                    f"{broken:>9}{row['rss']:>8.0f}"
                )
            ratios(rows, ["tok_s", "ttft50", "ttft95", "itl50", "itl99", "rss"])
    if args.turns:
        await multi_turn(servers, bias, args)
    await long_prompt(servers, bias, args)


LONG_PROMPT = " ".join(f"Line {i}: the quick brown fox jumps over a dog." for i in range(230))


async def long_prompt(
    servers: list[Server], bias: dict[str, float], args: argparse.Namespace
) -> None:
    """3 streams run while a ~3,000-token prompt arrives: their worst inter-token gap."""
    print("\n  long prompt (~3,000 tokens) arriving during 3 streams: the streams' ITL")
    rows = {}
    for round_ in range(args.rounds):
        for server in order(servers, round_):
            timeout = aiohttp.ClientTimeout(total=900)
            async with aiohttp.ClientSession(timeout=timeout) as session:

                async def late(server: Server, content: str) -> Stream:
                    await asyncio.sleep(0.5)
                    return await one_stream(
                        session, server, bias, 4, [{"role": "user", "content": content}]
                    )

                *streams, arrival = await asyncio.gather(
                    *(
                        one_stream(session, server, bias, 128, [{"role": "user", "content": q}])
                        for q in QUESTIONS[:3]
                    ),
                    late(server, f"{LONG_PROMPT} ({server.name} {round_})"),
                )
            gaps = [g for st in streams for g in st.gaps]
            row = rows.setdefault(server.name, {"itl_max": 0.0, "itl99": 0.0, "ttft": 0.0})
            row["itl_max"] = max(row["itl_max"], max(gaps, default=0.0) * 1000)
            row["itl99"] = max(row["itl99"], pct(gaps, 0.99) * 1000)
            row["ttft"] = max(row["ttft"], (arrival.ttft or 0.0) * 1000)
    for name, row in rows.items():
        print(
            f"  {name:<17} worst ITL {row['itl_max']:>6.0f}ms  ITL p99 {row['itl99']:>6.0f}ms"
            f"  long prompt TTFT {row['ttft']:>6.0f}ms"
        )
    ratios(rows, ["itl_max", "itl99", "ttft"])


def ratios(rows: dict[str, dict[str, float]], keys: list[str]) -> None:
    if "llama-server" not in rows:
        return
    theirs = rows["llama-server"]
    for name, ours in rows.items():
        if name.startswith("llmis"):
            print(
                f"  {name} / llama-server: "
                + ", ".join(f"{k} {ours[k] / theirs[k]:.2f}x" for k in keys if theirs.get(k))
            )


async def one_user(
    session: aiohttp.ClientSession,
    server: Server,
    bias: dict[str, float],
    user: int,
    args: argparse.Namespace,
) -> list[Stream]:
    """``args.turns`` turns of one conversation, each sent when the previous answer ended."""
    history = [{"role": "system", "content": f"You are assistant number {user}. Be helpful."}]
    out = []
    for turn in range(args.turns):
        question = QUESTIONS[(user + turn) % len(QUESTIONS)]
        history.append({"role": "user", "content": f"Turn {turn}: {question}"})
        stream = await one_stream(session, server, bias, args.turn_tokens, history)
        history.append({"role": "assistant", "content": stream.text})
        out.append(stream)
    return out


async def multi_turn(
    servers: list[Server], bias: dict[str, float], args: argparse.Namespace
) -> None:
    """4 users x N turns with growing history: where a server that keeps the prompt cache wins."""
    results: dict[str, list[Stream]] = {s.name: [] for s in servers}
    for round_ in range(args.rounds):
        for server in order(servers, round_):
            timeout = aiohttp.ClientTimeout(total=900)
            # a connection per turn, as for every other stream here: llama-server closes a
            # connection after a streamed answer, and a POST on it then fails (not the server)
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
                users = await asyncio.gather(
                    *(one_user(session, server, bias, u, args) for u in range(4))
                )
            results[server.name] += [s for user in users for s in user]
    print(f"\n  multi-turn: 4 users x {args.turns} turns, {args.turn_tokens} tokens per answer")
    rows = {}
    for name, streams in results.items():
        ttfts = [s.ttft for s in streams if s.ttft is not None]
        rows[name] = {"ttft50": pct(ttfts, 0.5) * 1000, "ttft95": pct(ttfts, 0.95) * 1000}
        broken = sum(s.broken for s in streams)
        print(
            f"  {name:<17} TTFT p50 {rows[name]['ttft50']:>6.0f}ms  p95 "
            f"{rows[name]['ttft95']:>6.0f}ms  broken {broken}/{len(streams)}"
        )
    ratios(rows, ["ttft50", "ttft95"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2,gemma")
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=4096, help="context per slot (shipped)")
    parser.add_argument(
        "--flash-attn",
        choices=["auto", "on", "off"],
        default="auto",
        help="both servers' own default: auto",
    )
    parser.add_argument("--seeded", default="no,yes", help="unseeded and/or seeded requests")
    parser.add_argument("--turns", type=int, default=6, help="multi-turn workload (0 = skip)")
    parser.add_argument("--turn-tokens", type=int, default=48)
    parser.add_argument("--no-llama-cpp-python", action="store_true")
    parser.add_argument("--no-llama-server", action="store_true", help="skip building/running it")
    add_llmis_env_argument(parser)
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.seeded = [s == "yes" for s in args.seeded.split(",")]
    binary = None if args.no_llama_server else llama_server_binary()
    with_lcp = not args.no_llama_cpp_python and importlib.util.find_spec("fastapi") is not None
    if not with_lcp:
        print("llama-cpp-python's server skipped (pip install -e '.[bench]' to include it)")
    print(
        f"threads={args.threads} slots={args.slots} (llama-server -np {args.slots}) "
        f"ctx/slot={args.ctx} flash_attn={args.flash_attn}\n{clear_omp_env()}\n"
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        "the machine is shared: compare only side-by-side ratios"
    )
    with tempfile.TemporaryDirectory(prefix="llmis-bench-") as tmp:
        workdir = Path(tmp)
        for model in args.models.split(","):
            bias = eog_bias(resolve_resource(MODELS[model][0], workdir))
            servers: list[Server] = []
            try:
                for spec in ["", *args.llmis_env]:
                    servers.append(start_llmis(workdir, model, args, spec))
                if binary is not None:
                    servers.append(start_llama_server(binary, workdir, model, args))
                if with_lcp:
                    servers.append(start_llama_cpp_python(workdir, model, args))
                print(f"\n== {model}")
                asyncio.run(bench_model(servers, bias, args))
                print(f"\n  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            finally:
                for server in servers:
                    server.stop()


if __name__ == "__main__":
    main()
