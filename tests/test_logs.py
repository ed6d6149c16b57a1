"""Log lines are JSON, carry the request id from ``X-Request-ID``, and each request gets one
access-log line with status, model, tokens, TTFT and duration."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from typing import Any

from llmis.ops.logs import JsonFormatter, TextFormatter, setup_logging
from llmis.ops.request_context import RequestContext, new_request_id, request_scope
from tests.conftest import OPS_USER_KEY, RunningServer
from tests.ops_helpers import FRANCE, chat, post


def log_entries(server: RunningServer) -> list[dict[str, Any]]:
    """Every line of the server's output, parsed; the startup banner is the one non-JSON line."""
    entries = []
    for line in server.log().splitlines():
        if not line.strip() or re.match(r"^llmis \S+ serving on http://", line):
            continue
        entries.append(json.loads(line))  # fails the test on any other non-JSON line
    return entries


def for_request(server: RunningServer, request_id: str, logger: str | None = None) -> list[Any]:
    deadline = time.monotonic() + 10
    while True:
        found = [e for e in log_entries(server) if e.get("request_id") == request_id]
        if any(e["logger"] == (logger or "llmis.access") for e in found):
            return found
        assert time.monotonic() < deadline, f"no log line for {request_id}"
        time.sleep(0.05)


async def test_access_line_carries_the_request_id(ops_server: RunningServer) -> None:
    rid = "client-chosen-id-42"
    status, body, headers = await post(
        ops_server, "/v1/chat/completions", chat(max_tokens=3), OPS_USER_KEY, {"X-Request-ID": rid}
    )
    assert status == 200, body
    assert headers["X-Request-ID"] == rid
    [access] = for_request(ops_server, rid)
    assert access["level"] == "info" and access["logger"] == "llmis.access"
    assert access["method"] == "POST" and access["path"] == "/v1/chat/completions"
    assert access["status"] == 200
    assert access["model"] == "smollm2"
    assert access["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert access["completion_tokens"] == 3
    assert access["finish_reason"] == "length"
    assert 0 < access["ttft_s"] <= access["duration_s"]
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", access["ts"])


async def test_every_line_of_a_request_has_its_id(ops_server: RunningServer) -> None:
    """The content filter logs inside the request: that line carries the id too."""
    rid = "filtered-request-7"
    body = {"model": "smollm2", "messages": FRANCE, "max_tokens": 16, "temperature": 0}
    status, _, _ = await post(
        ops_server, "/v1/chat/completions", body, OPS_USER_KEY, {"X-Request-ID": rid}
    )
    assert status == 200
    lines = for_request(ops_server, rid)
    assert {e["logger"] for e in lines} == {"llmis.ops.policy", "llmis.access"}
    assert all(e["request_id"] == rid for e in lines)


async def test_generated_id_in_header_error_body_and_log(ops_server: RunningServer) -> None:
    status, body, headers = await post(
        ops_server, "/v1/chat/completions", chat(), None, {"X-Request-ID": "bad id with spaces"}
    )
    assert status == 401
    rid = headers["X-Request-ID"]
    assert re.match(r"^req-[0-9a-f]{32}$", rid)
    assert body["error"]["request_id"] == rid
    [access] = for_request(ops_server, rid)
    assert access["status"] == 401 and "model" not in access
    assert all(OPS_USER_KEY not in line for line in ops_server.log().splitlines())


def test_formats_and_scope() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = setup_logging("info", "json", out)
    try:
        log = logging.getLogger("llmis.test")
        with request_scope(RequestContext(id="r-1")):
            log.info("hello %s", "world", extra={"tokens": 3})
        log.warning("outside")
        first, second = (json.loads(line) for line in out.getvalue().splitlines())
        assert first["message"] == "hello world" and first["request_id"] == "r-1"
        assert first["tokens"] == 3 and first["level"] == "info"
        assert "request_id" not in second
        record = logging.makeLogRecord({"msg": "x", "levelname": "INFO", "request_id": "r-2"})
        assert "[r-2]: x" in TextFormatter().format(record)
        assert json.loads(JsonFormatter().format(record))["request_id"] == "r-2"
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert new_request_id("ok-id_1.2") == "ok-id_1.2"
    assert new_request_id("x" * 200).startswith("req-")
