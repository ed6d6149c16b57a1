"""API keys: each 401 and 403 path, good keys (config and environment), open paths, CORS."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from llmis.config import AuthSettings, ConfigError, load_settings
from llmis.ops.auth import AuthenticationError, KeyRing, Role, auth_middleware
from tests.conftest import OPS_ADMIN_KEY, OPS_ENV_KEY, OPS_USER_KEY, RunningServer
from tests.ops_helpers import get

ORIGIN = "http://app.example"


def error_of(raw: bytes, status: int, code: str) -> dict[str, str]:
    error: dict[str, str] = json.loads(raw)["error"]
    assert error["code"] == code
    assert error["type"] == {401: "authentication_error", 403: "permission_error"}[status]
    assert {"message", "type", "param", "code", "request_id"} == set(error)
    return error


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer "}, "missing_api_key"),
        ({"Authorization": f"Basic {OPS_USER_KEY}"}, "missing_api_key"),
        ({"Authorization": "Bearer wrong-key"}, "invalid_api_key"),
        ({"Authorization": f"Bearer {OPS_USER_KEY}x"}, "invalid_api_key"),
    ],
)
async def test_401_without_a_good_key(
    ops_server: RunningServer, headers: dict[str, str], code: str
) -> None:
    status, raw, resp_headers = await get(ops_server, "/v1/models", headers=headers)
    assert status == 401
    assert resp_headers["WWW-Authenticate"] == "Bearer"
    error_of(raw, 401, code)


async def test_good_keys(ops_server: RunningServer) -> None:
    for key in (OPS_USER_KEY, OPS_ENV_KEY, OPS_ADMIN_KEY):
        status, raw, _ = await get(ops_server, "/v1/models", key)
        assert status == 200, (key, raw)
        models = [m for m in json.loads(raw)["data"] if not m.get("preset")]  # not the presets
        assert {m["id"] for m in models} == {"smollm2", "smollm2-q1"}


async def test_admin_paths_need_the_admin_key(ops_server: RunningServer) -> None:
    for key in (OPS_USER_KEY, OPS_ENV_KEY):
        status, raw, _ = await get(ops_server, "/admin/models", key)
        assert status == 403
        error_of(raw, 403, "insufficient_permissions")
    status, raw, _ = await get(ops_server, "/admin/models")
    assert status == 401
    status, _, _ = await get(ops_server, "/admin/models", OPS_ADMIN_KEY)
    assert status not in (401, 403)  # 200 once the admin API exists, 404 before


async def test_open_and_closed_paths(ops_server: RunningServer) -> None:
    assert (await get(ops_server, "/healthz"))[0] == 200
    assert (await get(ops_server, "/metrics"))[0] == 401
    assert (await get(ops_server, "/metrics", OPS_USER_KEY))[0] == 200
    assert (await get(ops_server, "/no/such/route"))[0] == 401  # no route map for strangers
    log = ops_server.log()
    assert OPS_USER_KEY not in log and OPS_ADMIN_KEY not in log and OPS_ENV_KEY not in log


async def test_cors(ops_server: RunningServer) -> None:
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    async with aiohttp.ClientSession() as session:
        async with session.options(
            ops_server.url + "/v1/chat/completions", headers=preflight
        ) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert resp.headers["Access-Control-Allow-Credentials"] == "true"
            assert "POST" in resp.headers["Access-Control-Allow-Methods"]
            assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
            assert resp.headers["Vary"] == "Origin"
        async with session.options(
            ops_server.url + "/v1/chat/completions",
            headers={**preflight, "Origin": "http://evil.example"},
        ) as resp:
            assert resp.status == 403
            assert "Access-Control-Allow-Origin" not in resp.headers
    status, _, headers = await get(ops_server, "/v1/models", headers={"Origin": ORIGIN})
    assert status == 401  # the error is readable by the page: it carries CORS headers
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "X-Request-ID" in headers["Access-Control-Expose-Headers"]
    _, _, headers = await get(ops_server, "/healthz", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in headers


def test_wildcard_origin_with_credentials_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "llmis.toml"
    config.write_text('[cors]\nallow_origins = ["*"]\nallow_credentials = true\n')
    with pytest.raises(ConfigError, match="cannot be combined with allow_credentials"):
        load_settings(config)


def test_keyring() -> None:
    ring = KeyRing.from_settings(
        AuthSettings(api_keys=("u1",), admin_keys=("a1",)),  # type: ignore[arg-type]
        {"LLMIS_API_KEYS": " u2 , ,u3", "LLMIS_ADMIN_KEYS": "a2"},
    )
    assert ring.enabled and ring.has_admin
    assert [ring.role(k) for k in ("u1", "u2", "u3", "a1", "a2", "x", "")] == [
        Role.USER,
        Role.USER,
        Role.USER,
        Role.ADMIN,
        Role.ADMIN,
        None,
        None,
    ]
    assert not KeyRing.from_settings(AuthSettings(), {}).enabled


async def test_open_path_prefixes() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    middleware = auth_middleware(KeyRing(["k"], []), ["/healthz", "/static/*"])
    for path, expected in [("/healthz", 200), ("/static/app.js", 200), ("/healthz/x", 401)]:
        request = make_mocked_request("GET", path)
        try:
            status = (await middleware(request, handler)).status
        except AuthenticationError as exc:
            status = exc.status
        assert status == expected, path
    assert "u1" not in repr(AuthSettings(api_keys=("u1",)))  # type: ignore[arg-type]
