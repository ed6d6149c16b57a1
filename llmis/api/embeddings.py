"""``POST /v1/embeddings``, OpenAI-compatible.

``input`` is a string, a list of strings, a list of token ids or a list of token-id lists (at
most 2048 inputs, as OpenAI). ``encoding_format`` ``float`` gives JSON numbers, ``base64``
the little-endian float32 bytes (what the ``openai`` SDK asks for by default). ``dimensions``
keeps the first N components and renormalises, as OpenAI does for its text-embedding-3
models; it can be honoured for any N up to the model's size, but models not trained for
truncation (Matryoshka) lose quality when cut. ``usage`` counts the input tokens.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
import orjson
from aiohttp import web
from pydantic import Field, field_validator

from llmis.api.middleware import read_json
from llmis.ops.app_keys import MANAGER
from llmis.ops.request_context import name_model
from llmis.serving.embeddings import Embeddings, embed, lease_embedder, truncate_dimensions
from llmis.serving.protocol import LenientModel, as_batch

__all__ = ["MAX_INPUTS", "EmbeddingRequest", "routes"]

MAX_INPUTS = 2048

routes = web.RouteTableDef()


class EmbeddingRequest(LenientModel):
    """``null`` for a field means its default."""

    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _shape(cls, value: object) -> object:
        """One clear message for every malformed ``input`` instead of pydantic's union list."""
        shape = (
            "input must be a string, a list of strings, a list of token ids "
            "or a list of token-id lists"
        )
        if isinstance(value, str):
            if not value:
                raise ValueError("input must not be an empty string")
            return value
        if not isinstance(value, list) or not value:
            raise ValueError(shape if not isinstance(value, list) else "input must not be empty")
        if all(_is_token(v) for v in value):
            return value
        if len(value) > MAX_INPUTS:
            raise ValueError(f"input has {len(value)} items; at most {MAX_INPUTS} per request")
        if all(isinstance(v, str) for v in value) or all(
            isinstance(v, list) and all(_is_token(t) for t in v) for v in value
        ):
            for index, item in enumerate(value):
                if not item:
                    raise ValueError(f"input[{index}] is empty")
            return value
        raise ValueError(shape + " (not a mix)")

    def inputs(self) -> list[str | list[int]]:
        return as_batch(self.input)


def _is_token(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _encode(vector: Any, encoding_format: str) -> Any:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector  # a float32 row: vectors_response writes it as JSON numbers


def vectors_response(body: dict[str, Any]) -> web.Response:
    """A JSON response whose numpy float32 arrays are written by orjson, each number in the
    shortest form that reads back to the same float32. ``json.dumps`` of ``tolist()`` took
    ~7% of a 102-input request (float64 reprs, twice the bytes)."""
    return web.Response(
        body=orjson.dumps(body, default=_listed, option=orjson.OPT_SERIALIZE_NUMPY),
        content_type="application/json",
    )


def _listed(value: Any) -> Any:
    """What orjson does not write itself (a non-contiguous array view) as a plain list."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


@routes.post("/v1/embeddings")
async def create_embeddings(request: web.Request) -> web.Response:
    req = EmbeddingRequest.model_validate(await read_json(request))
    async with lease_embedder(request.app[MANAGER], req.model) as (embedder, pooling):
        name_model(req.model)
        # one job: its rows share decodes with every other request's (a disconnected client
        # cancels the task, which drops the rows not decoded yet)
        result: Embeddings = await embed(embedder, req.inputs(), pooling=pooling)
    tokens = result.prompt_tokens
    name_model(req.model, tokens)
    vectors = truncate_dimensions(result.vectors, req.dimensions)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    return vectors_response(
        {
            "object": "list",
            "data": data,
            "model": req.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
