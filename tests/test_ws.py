"""The ``/v1/ws`` chat protocol, spoken by aiohttp's WebSocket client to real models.

Most tests use the shared subprocess server (SmolLM2 as ``smollm2`` and ``smollm2-q1``: two
workers). The cancellation tests run the app in-process on a real socket so they can look at
the worker's job afterwards: a cancelled job has its cancel flag set and never emits
``Finished`` (which a job that ran to its ``max_tokens`` would).
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from llmis.app import create_app
from llmis.config import Settings
from llmis.engine.jobs import Finished, Job
from llmis.engine.scheduler import Scheduler
from llmis.ops.app_keys import MANAGER
from tests.conftest import SMOLLM_RESOURCE, RunningServer

# SmolLM2's end-of-generation tokens; banning them makes a reply run to max_tokens.
NO_EOS = {"0": -100, "2": -100, "4": -100}
EVENT_TIMEOUT = 120


def chat(id_: str | int, model: str, text: str, **params: Any) -> dict[str, Any]:
    return {
        "type": "chat",
        "id": id_,
        "model": model,
        "messages": [{"role": "user", "content": text}],
        **params,
    }


async def receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message = await ws.receive(timeout=EVENT_TIMEOUT)
    assert message.type == WSMsgType.TEXT, message
    event: dict[str, Any] = json.loads(message.data)
    return event


async def until_end(
    ws: aiohttp.ClientWebSocketResponse, ids: Sequence[str | int]
) -> list[dict[str, Any]]:
    """Every event until each of ``ids`` got its ``done`` or ``error``."""
    events, open_ids = [], set(ids)
    while open_ids:
        event = await receive(ws)
        events.append(event)
        if event["type"] in ("done", "error"):
            open_ids.discard(event["id"])
    return events


async def http_error(server: RunningServer, body: object) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{server.base_url}/chat/completions", json=body) as resp,
    ):
        payload: dict[str, Any] = await resp.json()
        return resp.status, payload


def without_request_id(error: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in error.items() if k != "request_id"}


# ----- against the shared subprocess server -----


async def test_two_ids_stream_at_once_on_one_socket(server: RunningServer) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{server.url}/v1/ws") as ws:
        params = {"max_tokens": 32, "temperature": 0, "logit_bias": NO_EOS}
        await ws.send_json(chat("a", "smollm2", "Count to fifty.", **params))
        await ws.send_json(chat(7, "smollm2-q1", "Name some animals.", **params))
        events = await until_end(ws, ["a", 7])

    def positions(id_: str | int, kind: str) -> list[int]:
        return [i for i, e in enumerate(events) if e["id"] == id_ and e["type"] == kind]

    done = {e["id"]: e for e in events if e["type"] == "done"}
    assert set(done) == {"a", 7}, events
    for id_ in ("a", 7):
        assert done[id_]["finish_reason"] == "length"
        assert done[id_]["usage"]["completion_tokens"] == 32
        assert done[id_]["usage"]["total_tokens"] == (
            done[id_]["usage"]["prompt_tokens"] + done[id_]["usage"]["completion_tokens"]
        )
        text = "".join(e["content"] for e in events if e["id"] == id_ and e["type"] == "delta")
        assert text.strip()
        assert "trimmed" not in done[id_]
    # Both were streaming at once: each one's first delta came before the other one's end.
    assert positions("a", "delta")[0] < positions(7, "done")[0]
    assert positions(7, "delta")[0] < positions("a", "done")[0]


async def test_invalid_messages_get_errors_and_the_socket_stays_usable(
    server: RunningServer,
) -> None:
    bad_temperature = chat("t", "smollm2", "hi", temperature=5)
    unknown_model = chat("m", "no-such-model", "hi")
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{server.url}/v1/ws") as ws:
        await ws.send_str("this is not json")
        event = await receive(ws)
        assert event["type"] == "error" and event["id"] is None
        assert event["status"] == 400 and event["error"]["code"] == "invalid_json"

        await ws.send_str("[1, 2]")
        event = await receive(ws)
        assert (event["type"], event["status"]) == ("error", 400)

        await ws.send_json({"type": "launch", "id": "x"})
        event = await receive(ws)
        assert event["id"] == "x" and event["error"]["param"] == "type"

        await ws.send_json({"type": "chat", "model": "smollm2", "messages": []})
        event = await receive(ws)
        assert event["error"]["code"] == "missing_required_parameter"
        assert event["error"]["param"] == "id"

        await ws.send_bytes(b"\x00\x01")
        event = await receive(ws)
        assert (event["type"], event["status"]) == ("error", 400)

        await ws.send_json({"type": "cancel", "id": "never-started"})
        event = await receive(ws)
        assert event["id"] == "never-started" and event["error"]["code"] == "unknown_id"

        # The same problems over HTTP give the same status, code and message.
        for body in (bad_temperature, unknown_model):
            await ws.send_json(body)
            event = await receive(ws)
            http_body = {k: v for k, v in body.items() if k not in ("type", "id")}
            status, payload = await http_error(server, http_body)
            assert event["type"] == "error" and event["id"] == body["id"]
            assert event["status"] == status
            assert without_request_id(event["error"]) == without_request_id(payload["error"])

        await ws.send_json({"type": "ping", "id": "p1"})
        assert await receive(ws) == {"type": "pong", "id": "p1"}

        await ws.send_json(chat("ok", "smollm2", "Say hello.", max_tokens=3))
        events = await until_end(ws, ["ok"])
        assert events[-1]["type"] == "done"
        assert events[-1]["usage"]["completion_tokens"] <= 3
        assert not ws.closed


async def test_duplicate_id_is_refused_while_the_first_runs(server: RunningServer) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{server.url}/v1/ws") as ws:
        params = {"max_tokens": 400, "logit_bias": NO_EOS}
        await ws.send_json(chat("dup", "smollm2", "Tell a long story.", **params))
        first = await receive(ws)
        assert first["type"] == "delta"
        await ws.send_json(chat("dup", "smollm2", "Again.", max_tokens=2))
        refused = await receive(ws)
        while refused["type"] == "delta":
            refused = await receive(ws)
        assert refused["type"] == "error" and refused["error"]["code"] == "duplicate_id"
        await ws.send_json({"type": "cancel", "id": "dup"})
        events = await until_end(ws, ["dup"])
        assert events[-1] == {
            "type": "done",
            "id": "dup",
            "finish_reason": "cancelled",
            "usage": None,
        }
        # An id is free again as soon as its last event is out.
        await ws.send_json(chat("dup", "smollm2", "Again.", max_tokens=2))
        events = await until_end(ws, ["dup"])
        assert events[-1]["type"] == "done" and events[-1]["finish_reason"] in ("stop", "length")


async def test_history_longer_than_the_context_is_trimmed(server: RunningServer) -> None:
    filler = "The quick brown fox jumps over the lazy dog. " * 5  # ~50 tokens a message
    messages: list[dict[str, str]] = [{"role": "system", "content": "Answer briefly."}]
    for turn in range(8):
        messages.append({"role": "user", "content": f"Story part {turn}: {filler}"})
        messages.append({"role": "assistant", "content": f"Noted part {turn}."})
    messages.append({"role": "user", "content": "What was part 7 about?"})
    # Room for 1800 tokens leaves ~250 for the prompt (n_ctx 2048); the stop strings end the
    # reply after a word or so.
    body = {"model": "smollm2", "messages": messages, "max_tokens": 1800, "stop": [" ", "\n"]}

    status, payload = await http_error(server, body)  # HTTP does not trim
    assert status == 400 and payload["error"]["code"] == "context_length_exceeded"

    async with aiohttp.ClientSession() as session, session.ws_connect(f"{server.url}/v1/ws") as ws:
        await ws.send_json({"type": "chat", "id": "long", **body})
        done = (await until_end(ws, ["long"]))[-1]
        assert done["type"] == "done", done
        # Whole turns went (user + assistant), oldest first, and the rest fits with max_tokens.
        assert done["trimmed"] > 0 and done["trimmed"] % 2 == 0
        assert done["usage"]["prompt_tokens"] + 1800 <= 2048

        await ws.send_json({"type": "chat", "id": "strict", "trim": False, **body})
        error = (await until_end(ws, ["strict"]))[-1]
        assert error["type"] == "error" and error["status"] == status
        assert without_request_id(error["error"]) == without_request_id(payload["error"])


async def test_server_pings_the_socket(server: RunningServer) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{server.url}/v1/ws", autoping=False) as ws,
    ):
        message = await ws.receive(timeout=30)  # the heartbeat is 5 s here
        assert message.type == WSMsgType.PING
        await ws.pong(message.data)
        await ws.send_json({"type": "ping"})
        assert await receive(ws) == {"type": "pong", "id": None}


def test_shutdown_closes_open_sockets(start_server: Callable[..., RunningServer]) -> None:
    own = start_server(
        f"""
[server]
threads = 1

[[models]]
name = "smollm2"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 512
"""
    )

    async def scenario() -> tuple[WSMsgType, int | None, int]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{own.url}/v1/ws") as ws,
        ):
            await ws.send_json(chat("s", "smollm2", "Hi", max_tokens=2))
            await until_end(ws, ["s"])
            own.process.send_signal(signal.SIGTERM)
            message = await ws.receive(timeout=30)
            code = await asyncio.get_running_loop().run_in_executor(None, own.process.wait, 60)
            return message.type, ws.close_code, code

    kind, close_code, exit_code = asyncio.run(scenario())
    assert kind in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
    assert close_code == aiohttp.WSCloseCode.GOING_AWAY
    assert exit_code == 0


# ----- in-process, to look at the worker's jobs -----


@pytest.fixture
async def app_client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    settings = Settings.model_validate(
        {
            "server": {"threads": 1, "keepalive_seconds": 0.5},
            "models": [
                {"name": "smollm2", "resource": SMOLLM_RESOURCE, "n_ctx": 1024, "queue_size": 4}
            ],
        }
    )
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


async def spy_jobs(client: TestClient[web.Request, web.Application]) -> list[Job]:
    """The model's worker, with every submitted job recorded in the returned list."""
    worker: Scheduler = await client.app[MANAGER].acquire("smollm2")
    jobs: list[Job] = []
    submit = worker.submit

    def recording_submit(batch: Sequence[Any]) -> None:
        jobs.extend(j for j in batch if isinstance(j, Job))
        submit(batch)

    worker.submit = recording_submit  # type: ignore[method-assign]
    return jobs


async def assert_stopped_early(client: TestClient[web.Request, web.Application], job: Job) -> None:
    worker = await client.app[MANAGER].acquire("smollm2")
    await asyncio.wait_for(worker.drain(), EVENT_TIMEOUT)
    assert job.cancel.is_set()
    leftover = []
    while not job.events.empty():
        leftover.append(job.events.get_nowait())
    assert not any(isinstance(e, Finished) for e in leftover), leftover


async def test_cancel_stops_the_job_and_the_next_request_runs(
    app_client: TestClient[web.Request, web.Application],
) -> None:
    jobs = await spy_jobs(app_client)
    async with app_client.ws_connect("/v1/ws") as ws:
        await ws.send_json(
            chat("long", "smollm2", "Tell a long story.", max_tokens=900, logit_bias=NO_EOS)
        )
        assert (await receive(ws))["type"] == "delta"
        await ws.send_json({"type": "cancel", "id": "long"})
        events = await until_end(ws, ["long"])
        assert events[-1]["finish_reason"] == "cancelled"
        await ws.send_json(chat("next", "smollm2", "Say hi.", max_tokens=4, logit_bias=NO_EOS))
        events = await until_end(ws, ["next"])
        assert events[-1]["type"] == "done" and events[-1]["usage"]["completion_tokens"] == 4
    assert len(jobs) == 2
    await assert_stopped_early(app_client, jobs[0])


async def test_closing_the_socket_cancels_its_jobs(
    app_client: TestClient[web.Request, web.Application],
) -> None:
    jobs = await spy_jobs(app_client)
    async with app_client.ws_connect("/v1/ws") as ws:
        params = {"max_tokens": 900, "logit_bias": NO_EOS}
        await ws.send_json(chat("running", "smollm2", "Tell a long story.", **params))
        await ws.send_json(chat("queued", "smollm2", "Tell another one.", **params))
        assert (await receive(ws))["type"] == "delta"
        for _ in range(EVENT_TIMEOUT * 100):  # the second one is tokenized, then queued
            if len(jobs) == 2:
                break
            await asyncio.sleep(0.01)
    assert len(jobs) == 2
    for job in jobs:
        await assert_stopped_early(app_client, job)
