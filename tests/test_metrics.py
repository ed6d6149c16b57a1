"""``/metrics``: counters move by exactly the traffic sent, histograms get samples, gauges read
the model manager. Real server, real SmolLM2."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import aiohttp

from llmis.engine.jobs import SlotStats
from llmis.ops.metrics import Metrics
from tests.conftest import OPS_ADMIN_KEY, OPS_USER_KEY, RunningServer
from tests.ops_helpers import bearer, chat, post, sample, scrape, stream_chat

CHAT = "/v1/chat/completions"
M = {"model_name": "smollm2"}


async def test_counters_and_histograms_follow_traffic(ops_server: RunningServer) -> None:
    before = await scrape(ops_server, OPS_USER_KEY)
    usage = []
    for _ in range(2):
        status, body, _ = await post(ops_server, CHAT, chat(max_tokens=3), OPS_USER_KEY)
        assert status == 200, body
        usage.append(body["usage"])
    status, payloads = await stream_chat(
        ops_server,
        chat(max_tokens=3, stream=True, stream_options={"include_usage": True}),
        OPS_USER_KEY,
    )
    assert status == 200
    usage.append(payloads[-1]["usage"])
    assert (await post(ops_server, CHAT, chat(), key=None))[0] == 401
    after = await scrape(ops_server, OPS_USER_KEY)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert [u["completion_tokens"] for u in usage] == [3, 3, 3]
    prompt_tokens = sum(u["prompt_tokens"] for u in usage)
    assert delta("vllm:generation_tokens_total", **M) == 9
    assert delta("llamacpp:tokens_predicted_total", **M) == 9
    assert delta("vllm:prompt_tokens_total", **M) == prompt_tokens
    assert delta("llamacpp:prompt_tokens_total", **M) == prompt_tokens
    assert delta("vllm:request_success_total", finished_reason="length", **M) == 3
    ok = {"endpoint": CHAT, "model_name": "smollm2", "status": "200", "api": "openai"}
    assert delta("llmis:requests_total", **ok) == 3
    unauthorized = {"endpoint": CHAT, "model_name": "", "status": "401", "api": "openai"}
    assert delta("llmis:requests_total", **unauthorized) == 1
    for histogram in (
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
    ):
        assert delta(f"{histogram}_count", **M) == 3, histogram
        assert delta(f"{histogram}_bucket", le="+Inf", **M) == 3
    assert delta("vllm:time_to_first_token_seconds_sum", **M) > 0
    assert delta("vllm:e2e_request_latency_seconds_sum", **M) > 0
    # three tokens a request: at least one interval between streamed pieces each
    assert delta("vllm:inter_token_latency_seconds_count", **M) >= 3
    assert delta("llamacpp:tokens_predicted_seconds_total", **M) > 0


async def test_gauges_read_the_manager(ops_server: RunningServer) -> None:
    samples = await scrape(ops_server, OPS_ADMIN_KEY)
    assert sample(samples, "llmis:models_loaded") == 2
    for model in ("smollm2", "smollm2-q1"):
        assert ("vllm:num_requests_running", (("model_name", model),)) in samples
        assert sample(samples, "vllm:num_requests_waiting", model_name=model) == 0
    assert sample(samples, "process_resident_memory_bytes") > 50_000_000
    memory = {"model_name": "smollm2"}
    assert sample(samples, "llmis:model_memory_bytes", kind="predicted", **memory) > 50_000_000
    assert ("llmis:model_memory_bytes", (("kind", "measured"), ("model_name", "smollm2"))) in (
        samples
    )


async def test_client_disconnect_counts_a_cancellation(ops_server: RunningServer) -> None:
    labels = {"model_name": "smollm2", "reason": "client"}
    before = sample(
        await scrape(ops_server, OPS_USER_KEY), "llmis:request_cancellations_total", **labels
    )
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            ops_server.url + CHAT,
            json=chat(max_tokens=60, stream=True),
            headers=bearer(OPS_USER_KEY),
        )
        assert resp.status == 200
        async for line in resp.content:
            if b'"content":"' in line and b'"content":""' not in line:
                break
        resp.close()  # leave mid-stream
    for _ in range(100):
        after = sample(
            await scrape(ops_server, OPS_USER_KEY), "llmis:request_cancellations_total", **labels
        )
        if after > before:
            break
        await asyncio.sleep(0.1)
    assert after - before == 1


def test_manager_gauges_and_evictions_are_read_at_scrape_time() -> None:
    slots = [SlotStats(0, 7, 40), SlotStats(1, None, 25)]
    worker = SimpleNamespace(running=1, queued=3, cached_tokens_total=12, slot_stats=lambda: slots)
    entry = SimpleNamespace(name="m1", worker=worker, predicted_bytes=100, measured_bytes=None)
    manager = SimpleNamespace(entries=lambda: [entry], evictions={"m1": 2})
    text = Metrics(manager).render().decode()  # type: ignore[arg-type]
    assert 'llmis:prompt_tokens_cached_total{model_name="m1"} 12.0' in text
    assert 'llamacpp:kv_cache_tokens{model_name="m1"} 65.0' in text
    assert 'llmis:slots_busy{model_name="m1"} 1.0' in text
    assert 'vllm:num_requests_running{model_name="m1"} 1.0' in text
    assert 'vllm:num_requests_waiting{model_name="m1"} 3.0' in text
    assert 'llmis:model_memory_bytes{kind="predicted",model_name="m1"} 100.0' in text
    assert 'kind="measured"' not in text
    assert "llmis:models_loaded 1.0" in text
    manager.evictions["m1"] = 3
    assert 'llmis:model_evictions_total{model_name="m1"} 3.0' in Metrics(manager).render().decode()  # type: ignore[arg-type]


def test_each_app_has_its_own_registry() -> None:
    one, two = Metrics(), Metrics()
    one.generation_tokens.labels("m").inc(5)
    assert b'vllm:generation_tokens_total{model_name="m"} 5.0' in one.render()
    assert b'model_name="m"' not in two.render()
