"""Two llmis replicas behind LiteLLM's proxy (deploy/litellm.yaml), real processes on
loopback: load is spread, a saturated replica's 429 is retried on the other, and a replica that
dies loses only the streams it had already started.

LiteLLM runs from its own virtualenv (.venv-litellm, `make litellm`, pinned in
deploy/litellm-requirements.txt): its pins (openai<3, huggingface-hub<2) cannot share a venv
with llmis's. The proxy takes ~15 s to start, so one proxy serves the whole module.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, SMOLLM_RESOURCE, RunningServer, free_port, launch

pytestmark = pytest.mark.timeout(240)

LITELLM_VENV = Path(os.environ.get("LLMIS_LITELLM_VENV", REPO / ".venv-litellm"))
LITELLM = LITELLM_VENV / "bin" / "litellm"
EOS_BAN = {"0": -100, "2": -100}  # SmolLM2's end tokens: generate exactly max_tokens
REPLICA_CONFIG = f"""
[server]
host = "127.0.0.1"
threads = 1
keepalive_seconds = 0.5

[[models]]
name = "smollm2-135m-instruct"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 512
slots = 2
queue_size = 8
"""
CAPACITY = 2 + 8  # slots + queue_size: one more is a 429


@dataclass
class Topology:
    replicas: list[RunningServer]
    proxy_url: str
    key: str
    proxy: subprocess.Popen[bytes]
    log: Path

    def api_base(self, replica: RunningServer) -> str:
        return f"{replica.url}/v1"


def _litellm_binary() -> Path:
    if not LITELLM.exists():
        # the proxy's own venv, installed from the pinned requirements (make litellm)
        subprocess.run(
            ["make", "-C", str(REPO), "litellm", f"LITELLM_VENV={LITELLM_VENV}"],
            check=True,
            timeout=900,
        )
    return LITELLM


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    litellm = _litellm_binary()
    workdir = tmp_path_factory.mktemp("scale")
    replicas = [launch(REPLICA_CONFIG, workdir / f"replica{i}") for i in (1, 2)]
    config = yaml.safe_load((REPO / "deploy" / "litellm.yaml").read_text())
    deployments = config["model_list"]
    assert len(deployments) == 2 and {d["model_name"] for d in deployments} == {"smollm2"}
    for deployment, replica in zip(deployments, replicas, strict=True):
        deployment["litellm_params"]["api_base"] = f"{replica.url}/v1"
    (workdir / "litellm.yaml").write_text(yaml.safe_dump(config))
    port, key = free_port(), f"sk-{secrets.token_hex(8)}"
    log = workdir / "litellm.log"
    env = {
        **os.environ,
        "LITELLM_MASTER_KEY": key,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no cost map from the internet
        "LITELLM_TELEMETRY": "False",
        "LLMIS_API_KEY": "unused",
    }
    with log.open("wb") as out:
        proxy = subprocess.Popen(
            [
                *(str(litellm), "--config", str(workdir / "litellm.yaml")),
                *("--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"),
            ],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    topo = Topology(replicas, url, key, proxy, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proxy.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health/liveliness", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)
        yield topo
    finally:
        proxy.send_signal(signal.SIGTERM)
        try:
            proxy.wait(20)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait(10)
        for replica in replicas:
            replica.stop()


def test_litellm_config() -> None:
    """N replicas under one model name, least-busy, retries on 429/5xx/connection errors,
    cooldown; the proxy's pin is the one installed."""
    _litellm_binary()
    config = yaml.safe_load((REPO / "deploy" / "litellm.yaml").read_text())
    names = {d["model_name"] for d in config["model_list"]}
    bases = {d["litellm_params"]["api_base"] for d in config["model_list"]}
    assert len(names) == 1 and len(bases) == len(config["model_list"]) >= 2
    router = config["router_settings"]
    assert router["routing_strategy"] == "least-busy"
    assert router["num_retries"] >= 1 and router["cooldown_time"] > 0
    policy = router["retry_policy"]
    assert policy["RateLimitErrorRetries"] >= 1 and policy["InternalServerErrorRetries"] >= 1
    assert all(d["litellm_params"]["max_retries"] == 0 for d in config["model_list"])
    pins = (REPO / "deploy" / "litellm-requirements.txt").read_text().splitlines()
    (pin,) = [line for line in pins if line.startswith("litellm==")]
    version = subprocess.run(
        [str(LITELLM_VENV / "bin" / "python"), "-c", "import importlib.metadata as m;"
         "print(m.version('litellm'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert pin == f"litellm=={version}"


def metric(replica: RunningServer, name: str, **labels: str) -> float:
    with urllib.request.urlopen(replica.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


@dataclass
class Outcome:
    status: int
    api_base: str | None
    completed: bool
    text: str
    started_at: float | None = None  # the proxy's response headers: it chose its replica


async def stream(
    http: aiohttp.ClientSession, topo: Topology, max_tokens: int, **extra: object
) -> Outcome:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Count from one to twenty."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": EOS_BAN,
        "stream": True,
        **extra,
    }
    headers = {"Authorization": f"Bearer {topo.key}"}
    text, done = "", False
    try:
        async with http.post(
            topo.proxy_url + "/v1/chat/completions", json=body, headers=headers
        ) as resp:
            base = resp.headers.get("x-litellm-model-api-base")
            started = time.monotonic()
            if resp.status != 200:
                return Outcome(resp.status, base, False, await resp.text())
            async for raw in resp.content:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        break
                    for choice in chunk.get("choices", []):
                        piece = choice.get("delta", {}).get("content")
                        if piece:
                            text += piece
            return Outcome(resp.status, base, done, text, started)
    except aiohttp.ClientError as exc:
        return Outcome(-1, None, False, repr(exc))


def test_concurrent_streams_spread_over_both_replicas(topology: Topology) -> None:
    before = [metric(r, "vllm:request_success_total") for r in topology.replicas]

    async def main() -> list[Outcome]:
        async with aiohttp.ClientSession() as http:
            return await asyncio.gather(*(stream(http, topology, 6) for _ in range(16)))

    outcomes = asyncio.run(main())
    assert all(o.status == 200 and o.completed and o.text for o in outcomes), outcomes
    served = [
        metric(r, "vllm:request_success_total") - b
        for r, b in zip(topology.replicas, before, strict=True)
    ]
    assert all(n > 0 for n in served), served  # both replicas served some
    assert sum(served) == 16
    bases = {o.api_base for o in outcomes}
    assert bases == {topology.api_base(r) for r in topology.replicas}


def test_a_saturated_replica_429_is_retried_on_the_other(topology: Topology) -> None:
    busy, free = topology.replicas
    refused_before = metric(busy, "llmis:requests_total", status="429")

    async def main() -> list[Outcome]:
        async with aiohttp.ClientSession() as direct, aiohttp.ClientSession() as http:
            # a replica that answered 429 in the last test is cooling down in the proxy, which
            # then never tries it: wait until the proxy routes a request to it again
            deadline = time.monotonic() + 180
            while (await stream(http, topology, 1)).api_base != topology.api_base(busy):
                assert time.monotonic() < deadline, "the proxy never went back to that replica"
                await asyncio.sleep(0.5)
            filler = {
                "model": "smollm2-135m-instruct",
                "messages": [{"role": "user", "content": "Count."}],
                "max_tokens": 400,
                "logit_bias": EOS_BAN,
                "stream": True,
            }
            fills = [
                await direct.post(busy.url + "/v1/chat/completions", json=filler)
                for _ in range(CAPACITY)
            ]
            try:
                assert all(f.status == 200 for f in fills)
                deadline = time.monotonic() + 60
                while metric(busy, "vllm:num_requests_waiting") < CAPACITY - 2:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                # the busy replica is first in the list and idle as far as the proxy knows
                return [await stream(http, topology, 4) for _ in range(3)]
            finally:
                for f in fills:
                    f.close()

    outcomes = asyncio.run(main())
    assert all(o.status == 200 and o.completed for o in outcomes), outcomes
    assert metric(busy, "llmis:requests_total", status="429") > refused_before
    assert {o.api_base for o in outcomes} == {topology.api_base(free)}
    # the fillers' connections are closed: the busy replica drains
    deadline = time.monotonic() + 60
    while metric(busy, "vllm:num_requests_running") + metric(busy, "vllm:num_requests_waiting"):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_replica_killed_mid_run_loses_only_its_started_streams(topology: Topology) -> None:
    victim, survivor = topology.replicas
    victim_base = topology.api_base(victim)
    survivor_before = metric(survivor, "vllm:request_success_total")

    async def main() -> tuple[list[Outcome], list[Outcome], float]:
        async with aiohttp.ClientSession() as http:
            # the victim's cooldown from the last test is over once it gets a request again
            # (a loaded machine makes each probe slow: allow many of them)
            deadline = time.monotonic() + 180
            while (await stream(http, topology, 1)).api_base != victim_base:
                assert time.monotonic() < deadline, "the proxy never went back to the victim"
                await asyncio.sleep(0.5)
            first_wave = [asyncio.create_task(stream(http, topology, 48)) for _ in range(8)]
            deadline = time.monotonic() + 60
            while metric(victim, "vllm:generation_tokens_total") == 0 or not metric(
                victim, "vllm:num_requests_running"
            ):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait(10)
            killed_at = time.monotonic()
            second_wave = [stream(http, topology, 8) for _ in range(6)]
            return await asyncio.gather(*first_wave), await asyncio.gather(*second_wave), killed_at

    first, second, _ = asyncio.run(main())
    on_victim = [o for o in first if o.api_base == victim_base]
    # a stream the proxy had started relaying from the victim (its headers name the victim:
    # the proxy sends them with the replica's first chunk) was cut: it cannot be resumed
    cut = [o for o in on_victim if not o.completed]
    assert cut, "no stream was running on the victim when it was killed"
    assert all(o.started_at is not None for o in cut)
    # everything else succeeded: on the survivor, including requests retried after the
    # victim refused their connection
    rest = [o for o in first if o.api_base != victim_base] + second
    assert all(o.status == 200 and o.completed for o in rest), [
        (o.status, o.api_base, o.completed, o.text[:200]) for o in rest if not o.completed
    ]
    # ...and the survivor served every one of them (it is the only replica left; the proxy's
    # x-litellm-model-api-base header can name the replica tried first when a retry moved it)
    served = metric(survivor, "vllm:request_success_total") - survivor_before
    assert served >= len(rest)
