"""The admin API's contract on the shared SmolLM2 server: the listing, and clean errors.

Nothing here changes what the shared server serves: every request either only reads or is
refused. Loading, unloading, swapping and eviction against real models are in
``tests/test_models.py``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import psutil
import pytest

from tests.conftest import RunningServer


def post(server: RunningServer, path: str, data: bytes | object) -> tuple[int, Any]:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    request = urllib.request.Request(
        server.url + path, data=raw, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_listing_has_state_memory_and_queue_figures(server: RunningServer) -> None:
    status, body = server.get_json("/admin/models")
    assert status == 200
    assert isinstance(body, dict)
    total = psutil.virtual_memory().total
    assert abs(body["budget_bytes"] - 0.75 * total) <= 1  # default budget: 75% of RAM
    own_rss = psutil.Process(server.process.pid).memory_info().rss
    assert abs(body["rss_bytes"] - own_rss) < 0.05 * own_rss
    rows = {m["name"]: m for m in body["data"]}
    for name in ("smollm2", "smollm2-q1"):
        row = rows[name]
        assert row["state"] == "loaded"
        assert row["source"] == "config"
        assert row["queue_depth"] >= 0 and row["in_flight"] in (0, 1)
        assert row["measured_bytes"] > 50 * 1024 * 1024
        assert abs(row["predicted_bytes"] - row["measured_bytes"]) < 0.25 * row["measured_bytes"]
        assert row["gguf"]["quantization"] == "Q4_1"
        assert row["last_used"] is not None
    assert body["used_bytes"] >= rows["smollm2"]["measured_bytes"]


@pytest.mark.parametrize(
    ("path", "data", "status", "param", "code"),
    [
        ("/admin/models/load", b"{not json", 400, None, "invalid_json"),
        ("/admin/models/load", {}, 400, "name", "missing_required_parameter"),
        ("/admin/models/load", {"name": "smollm2", "nope": 1}, 400, "nope", "invalid_value"),
        ("/admin/models/load", {"name": "smollm2", "n_ctx": 5}, 400, "n_ctx", "invalid_value"),
        ("/admin/models/load", {"name": "no-such-model"}, 404, "model", "model_not_found"),
        ("/admin/models/load", {"name": "smollm2", "n_ctx": 1024}, 409, "name", "model_loaded"),
        ("/admin/models/unload", {"name": "no-such-model"}, 404, "model", "model_not_found"),
        ("/admin/models/swap", {"alias": "smollm2", "to": "x"}, 400, "alias", "not_an_alias"),
        ("/admin/models/swap", {"alias": "chat", "to": "v9"}, 404, "model", "model_not_found"),
        ("/admin/models/swap", {"alias": "chat"}, 400, "to", "missing_required_parameter"),
    ],
)
def test_bad_admin_requests_get_openai_shaped_errors(
    server: RunningServer, path: str, data: bytes | object, status: int, param: str, code: str
) -> None:
    got, body = post(server, path, data)
    assert got == status, body
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    assert (body["error"]["param"], body["error"]["code"]) == (param, code)
    assert body["error"]["type"] == "invalid_request_error"  # 4xx: the client's, as OpenAI


def test_model_paths_are_confined_to_the_models_dir(server: RunningServer) -> None:
    for path in ("../../../etc/passwd", "/etc/passwd", "sub/../../x.gguf"):
        status, body = post(server, "/admin/models/load", {"name": "evil", "path": path})
        assert status == 403, body
        assert body["error"]["code"] == "invalid_model_file"
        assert "leads outside the models dir" in body["error"]["message"]
    status, body = post(server, "/admin/models/load", {"name": "evil", "path": "missing.gguf"})
    assert status == 404, body
    status, body = server.get_json("/admin/models")
    assert isinstance(body, dict)
    assert "evil" not in {m["name"] for m in body["data"]}


def test_admin_routes_need_post(server: RunningServer) -> None:
    status, body = server.get_json("/admin/models/load")
    assert status == 405
    assert isinstance(body, dict) and "error" in body
