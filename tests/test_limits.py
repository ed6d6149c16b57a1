"""Per-request caps, token-bucket rate limits (trip, then recover), and timeouts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import aiohttp
import pytest

from llmis.config import LimitSettings
from llmis.engine.jobs import Delta, Failed, Finished, Job, Started
from llmis.engine.sampling import SamplingParams
from llmis.ops.policy import Guard
from llmis.ops.ratelimit import RateLimiter, RateLimitError
from tests.conftest import OPS_USER_KEY, RunningServer, smollm_config
from tests.ops_helpers import bearer, chat, finish_reasons, get, post, sample, scrape, stream_chat

CHAT = "/v1/chat/completions"
REQ_KEY, TOK_KEY, OTHER_KEY = "rate-requests", "rate-tokens", "rate-other"


@pytest.fixture(scope="module")
def limits_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    extra = f"""
[auth]
api_keys = ["{REQ_KEY}", "{TOK_KEY}", "{OTHER_KEY}"]
open_paths = ["/healthz", "/metrics"]

[limits]
rate_requests = 2
rate_tokens = 3
rate_window_seconds = 4
"""
    return start_server(smollm_config(extra_server=extra))


@pytest.fixture(scope="module")
def timeout_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server(smollm_config(extra_server="[limits]\nrequest_timeout = 2.0\n"))


# ----- caps -----


async def test_max_tokens_ceiling(ops_server: RunningServer) -> None:
    status, body, _ = await post(ops_server, CHAT, chat(max_tokens=65), OPS_USER_KEY)
    assert status == 400
    assert body["error"]["code"] == "max_tokens_too_large"
    assert body["error"]["param"] == "max_tokens"
    assert "at most 64" in body["error"]["message"]
    async with (  # the ceiling itself is accepted (leave once the stream has started)
        aiohttp.ClientSession() as session,
        session.post(
            ops_server.url + CHAT,
            json=chat(max_tokens=64, stream=True),
            headers=bearer(OPS_USER_KEY),
        ) as resp,
    ):
        assert resp.status == 200


async def test_prompt_length_cap(ops_server: RunningServer) -> None:
    long = chat(messages=[{"role": "user", "content": "word " * 300}])
    status, body, _ = await post(ops_server, CHAT, long, OPS_USER_KEY)
    assert status == 400
    assert body["error"]["code"] == "prompt_too_long"
    assert body["error"]["param"] == "messages"
    assert "at most 200" in body["error"]["message"]
    completion = {"model": "smollm2", "prompt": "word " * 300, "max_tokens": 1}
    status, body, _ = await post(ops_server, "/v1/completions", completion, OPS_USER_KEY)
    assert status == 400 and body["error"]["param"] == "prompt"


# ----- rate limits -----


async def test_request_rate_trips_then_recovers(limits_server: RunningServer) -> None:
    before = await scrape(limits_server)
    for _ in range(2):
        assert (await get(limits_server, "/v1/models", REQ_KEY))[0] == 200
    status, raw, headers = await get(limits_server, "/v1/models", REQ_KEY)
    assert status == 429
    error = json.loads(raw)["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
    retry_after = int(headers["Retry-After"])
    assert 1 <= retry_after <= 2  # one request refills in 4 s / 2
    assert (await get(limits_server, "/v1/models", OTHER_KEY))[0] == 200  # per key
    await asyncio.sleep(retry_after + 0.1)
    assert (await get(limits_server, "/v1/models", REQ_KEY))[0] == 200
    after = await scrape(limits_server)
    assert (
        sample(after, "llmis:rate_limited_requests_total", limit="requests")
        - sample(before, "llmis:rate_limited_requests_total", limit="requests")
        == 1
    )


async def test_generated_token_rate_trips_then_recovers(limits_server: RunningServer) -> None:
    status, body, _ = await post(limits_server, CHAT, chat(max_tokens=5), TOK_KEY)
    assert status == 200 and body["usage"]["completion_tokens"] == 5  # 3 allowed: now at -2
    status, body, headers = await post(limits_server, CHAT, chat(max_tokens=1), TOK_KEY)
    assert status == 429, body
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "tokens" in body["error"]["message"]
    await asyncio.sleep(int(headers["Retry-After"]) + 0.1)
    assert (await get(limits_server, "/v1/models", TOK_KEY))[0] == 200


def test_token_bucket_arithmetic() -> None:
    now = [0.0]
    limiter = RateLimiter(
        LimitSettings(rate_requests=3, rate_tokens=10, rate_window_seconds=60), lambda: now[0]
    )
    for _ in range(3):
        limiter.admit("a")
    with pytest.raises(RateLimitError) as exc:
        limiter.admit("a")
    assert exc.value.headers["Retry-After"] == "20" and exc.value.limit == "requests"
    limiter.admit("b")
    now[0] = 20.0
    limiter.admit("a")
    limiter.spend_tokens("b", 16)  # 10 - 16 = -6; refills 1 token per 6 s
    with pytest.raises(RateLimitError) as exc:
        limiter.admit("b")
    # 6 tokens to refill at 1 per 6 s: 36 s brings it to zero; it must be above zero
    assert exc.value.limit == "tokens" and exc.value.headers["Retry-After"] == "37"
    now[0] = 20.0 + 36.1
    limiter.admit("b")


# ----- timeouts -----


async def test_total_timeout_ends_a_stream_cleanly(timeout_server: RunningServer) -> None:
    status, payloads = await stream_chat(timeout_server, chat(max_tokens=1500, stream=True))
    assert status == 200
    error = payloads[-1]["error"]
    assert error["code"] == "request_timeout" and error["type"] == "timeout_error"
    assert "2s" in error["message"]
    assert finish_reasons(payloads) == []
    status, body, _ = await post(timeout_server, CHAT, chat(max_tokens=1500))
    assert status == 504 and body["error"]["code"] == "request_timeout"
    samples = await scrape(timeout_server)
    stopped = sample(
        samples, "llmis:request_cancellations_total", model_name="smollm2", reason="timeout"
    )
    assert stopped == 2
    assert (await get(timeout_server, "/healthz"))[0] == 200


async def test_idle_timeout_between_tokens() -> None:
    """A job that starts and then goes silent is ended by the idle limit (no model needed)."""
    loop = asyncio.get_running_loop()
    job = Job([1, 2, 3], SamplingParams(max_tokens=5), loop)
    cancelled: list[Job] = []
    guard = Guard("m", LimitSettings(idle_timeout=0.2))
    job.events.put_nowait(Started(0.0))
    job.events.put_nowait(Delta("hi"))
    events = [e async for e in guard.events(job, cancelled.append, keepalive=0.05)]
    assert events[:2] == [Started(0.0), Delta("hi")]
    assert set(events[2:-1]) == {None}  # keepalive pings while waiting
    last = events[-1]
    assert isinstance(last, Failed) and last.error.code == "idle_timeout"
    assert last.error.status == 504 and cancelled == [job] and job.done
    # a job that keeps talking is not cut
    job2 = Job([1], SamplingParams(max_tokens=5), loop)
    for event in (Started(0.0), Delta("a"), Finished("stop", 1, 1)):
        job2.events.put_nowait(event)
    assert [e async for e in guard.events(job2, cancelled.append)][-1] == Finished("stop", 1, 1)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_stream_of_events_arms_one_deadline_timer(loop_kind: str) -> None:
    """Waiting for each token with a deadline costs no timer per token, and silence still
    ends the wait on time; on both event loops the server runs on."""
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    armed: list[float] = []
    real_call_at = loop.call_at

    def counting(when: float, callback: Callable[..., object], *args: object) -> asyncio.Handle:
        armed.append(when)
        return real_call_at(when, callback, *args)

    async def scenario() -> None:
        job = Job([1], SamplingParams(max_tokens=5), loop)
        for i in range(50):
            loop.call_soon(job.events.put_nowait, Delta(str(i)))  # arrives while it waits
            assert await job.next_event(30.0) == Delta(str(i))
        assert len(armed) == 1
        started = loop.time()
        assert await job.next_event(0.05) is None  # a nearer deadline: the timer moves up
        assert 0.04 <= loop.time() - started < 5
        # a deadline already due (uvloop then hands back a plain Handle, with no when())
        assert await job.next_event(0.0) is None
        loop.call_soon(job.events.put_nowait, Delta("late"))
        assert await job.next_event(0.0) == Delta("late")  # arrived with the due timer
        loop.call_soon(job.events.put_nowait, Delta("next"))
        assert await job.next_event(30.0) == Delta("next")  # a leftover tick is no timeout
        loop.call_soon(job.events.put_nowait, Finished("stop", 1, 1))
        assert await job.next_event(30.0) == Finished("stop", 1, 1)

    loop.call_at = counting  # type: ignore[method-assign]
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
