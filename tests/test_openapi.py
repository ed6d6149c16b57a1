"""``GET /openapi.json``: a valid OpenAPI 3.1 document that covers every route of the real app.

The app is built in-process (no model is loaded: the models start in ``cleanup_ctx``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate

from llmis.api.admin import LoadBody
from llmis.api.openapi import OPERATIONS, build_document
from llmis.app import create_app
from llmis.config import Settings
from llmis.serving.protocol import ChatCompletionRequest


def registered(app: web.Application) -> set[tuple[str, str]]:
    """``(method, path)`` of every route, in OpenAPI's spelling (HEAD comes with GET)."""
    found: set[tuple[str, str]] = set()
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        path = resource.canonical
        if isinstance(resource, web.StaticResource):
            path = f"{path}/{{filename}}"
        found.add((route.method.lower(), path))
    heads = {(m, p) for m, p in found if m == "head"}
    assert {("get", p) for _, p in heads} <= found, "a HEAD route without its GET"
    return found - heads


def documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for path, item in document["paths"].items() for method in item}


@pytest.fixture
def app() -> web.Application:
    return create_app(Settings())


def test_the_document_is_valid_openapi_3_1() -> None:
    document = build_document()
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema
    json.dumps(document)  # and it is plain JSON


def test_every_registered_route_is_documented_and_nothing_else(app: web.Application) -> None:
    routes = registered(app)
    paths = documented(build_document())
    assert routes - paths == set(), "routes missing from llmis.api.openapi.OPERATIONS"
    assert paths - routes == set(), "documented operations the app does not register"
    assert len({op.operation_id for op in OPERATIONS}) == len(OPERATIONS)


def test_bodies_are_the_pydantic_models_schemas() -> None:
    document = build_document()
    schemas = document["components"]["schemas"]
    chat = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    ref = chat["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ChatCompletionRequest"
    expected = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = expected.pop("$defs")
    assert schemas["ChatCompletionRequest"] == expected
    assert all(schemas[name] == schema for name, schema in defs.items())
    load = LoadBody.model_json_schema(ref_template="#/components/schemas/{model}")
    assert schemas["LoadBody"] == load
    # every $ref resolves inside the document
    refs = {r.removeprefix("#/components/schemas/") for r in _refs(document)}
    assert refs <= set(schemas)


def test_errors_use_the_openai_shape_and_list_their_statuses() -> None:
    document = build_document()
    error = document["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    assert {"message", "type", "param", "code"} <= set(error["properties"]["error"]["properties"])
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "403", "404", "413", "429", "503"} <= set(chat)
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    media = response["content"]["application/json"]["schema"]
                    family = (
                        "OllamaError"
                        if path.startswith("/api/")
                        else "AnthropicError"
                        if path.startswith("/v1/messages")
                        else "Error"
                    )
                    assert media == {"$ref": f"#/components/schemas/{family}"}, (method, path)
            if method in ("post", "delete"):  # they take a JSON body: bad JSON 400, too large 413
                assert "requestBody" in operation, path
                assert {"400", "413"} <= set(operation["responses"]), path
            else:
                assert "requestBody" not in operation, path


async def test_served_at_openapi_json(app: web.Application) -> None:
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/openapi.json")
        assert resp.status == 200
        assert resp.content_type == "application/json"
        served = await resp.json()
    assert served == json.loads(json.dumps(build_document()))


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []
