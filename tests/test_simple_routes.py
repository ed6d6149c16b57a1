"""``GET /models``, ``POST /load``, ``POST /infer`` (JSON and SSE), checked as curl bytes."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import RunningServer


def curl(server: RunningServer, path: str, body: object | None = None) -> tuple[int, bytes]:
    args = ["curl", "-sS", "-N", "-o", "-", "-w", "\n%{http_code}", server.url + path]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    out = subprocess.run(args, capture_output=True, check=True, timeout=300).stdout
    payload, _, status = out.rpartition(b"\n")
    return int(status), payload


def test_models_and_load(server: RunningServer) -> None:
    status, body = curl(server, "/models")
    assert status == 200
    models = json.loads(body)["models"]
    assert [m["name"] for m in models] == ["smollm2", "smollm2-q1"]
    assert all(m["state"] in ("available", "loading", "loaded") for m in models)
    status, body = curl(server, "/load", {"model": "smollm2"})
    assert status == 200 and json.loads(body) == {"model": "smollm2", "state": "loaded"}
    status, body = curl(server, "/load", {"model": "nope"})
    assert status == 404 and json.loads(body)["error"]["param"] == "model"


def test_infer_json(server: RunningServer) -> None:
    request = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
    status, body = curl(server, "/infer", request)
    assert status == 200
    out = json.loads(body)
    assert set(out) == {"model", "text", "finish_reason", "usage"}
    assert out["model"] == "smollm2" and out["text"] and out["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 5
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    status, body = curl(server, "/infer", {**chat, "temperature": 0})
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] <= 4


def test_infer_stream_bytes(server: RunningServer) -> None:
    request = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
    status, whole = curl(server, "/infer", request)
    status, body = curl(server, "/infer?stream=true", request)
    assert status == 200
    events = [e for e in body.split(b"\n\n") if e and not e.startswith(b": ping")]
    assert events[-1] == b"data: [DONE]"
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events)
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    text = "".join(p.get("text", "") for p in payloads)
    assert text == json.loads(whole)["text"]
    assert payloads[-1]["finish_reason"] == "length"
    assert payloads[-1]["usage"]["completion_tokens"] == 5
    assert body.endswith(b"data: [DONE]\n\n")


def test_infer_bad_input(server: RunningServer) -> None:
    status, body = curl(server, "/infer", {"model": "smollm2"})
    assert status == 400 and json.loads(body)["error"]["param"] == "messages"
    status, body = curl(server, "/infer", {"model": "nope", "prompt": "x"})
    assert status == 404
    status, body = curl(server, "/infer?stream=maybe", {"model": "smollm2", "prompt": "x"})
    assert status == 400 and json.loads(body)["error"]["param"] == "stream"
