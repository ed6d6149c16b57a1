"""The one place exceptions become HTTP responses, in the calling API family's error shape
(OpenAI's, Ollama's or Anthropic's: :mod:`llmis.ops.families`)."""

from __future__ import annotations

import json
import logging

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import ValidationError

from llmis.errors import APIError, BadRequestError
from llmis.ops.app_keys import OVERSIGHT, SETTINGS
from llmis.ops.families import api_family, error_for, family_error_body
from llmis.ops.policy import Guard
from llmis.ops.request_context import REQUEST_CONTEXT

__all__ = ["error_middleware", "parse_json", "read_json", "request_policy", "validation_error"]

logger = logging.getLogger(__name__)


def request_policy(request: web.Request, model: str) -> Guard:
    """The policy (caps, timeouts, content filter, metrics) of ``request``'s generation on
    ``model``, to pass to the serving layer."""
    app = request.app
    return Guard.for_request(model, app[SETTINGS], app.get(OVERSIGHT), request.get(REQUEST_CONTEXT))


_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def validation_error(exc: ValidationError) -> APIError:
    """A pydantic error as a 400 naming the first bad field in ``param``."""
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    if len(exc.errors()) > 1:
        message += f" (and {len(exc.errors()) - 1} more problems)"
    return BadRequestError(
        f"{param}: {message}" if param else message,
        param=param,
        status=400,
        code="invalid_value" if first["type"] != "missing" else "missing_required_parameter",
    )


async def read_json(request: web.Request) -> object:
    """The request body as JSON, or a 400 / 413 in OpenAI's shape."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadRequestError(
            f"The request body is larger than the limit of "
            f"{request.app[SETTINGS].server.max_body_bytes} bytes.",
            status=413,
            code="request_too_large",
        ) from None
    return parse_json(raw, "body of your request")


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes | str, what: str = "body of your request") -> object:
    """Strict JSON (no NaN / Infinity), or a 400 ``invalid_json``; deep nesting is a 400 too."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise BadRequestError(
            f"We could not parse the JSON {what}: it is nested too deeply.",
            code="invalid_json",
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise BadRequestError(
            f"We could not parse the JSON {what}: {exc}", code="invalid_json"
        ) from None


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    if exc.status == 404:
        message = "Not found: no such route."
    elif exc.status == 405:
        message = f"Method not allowed; use {exc.headers.get('Allow', 'another method')}."
    else:
        message = exc.reason
    type_ = _HTTP_TYPES.get(
        exc.status, "server_error" if exc.status >= 500 else "invalid_request_error"
    )
    headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
    body = family_error_body(api_family(request.path), exc.status, message, type_)
    return web.json_response(body, status=exc.status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as exc:
        if exc.status >= 500:
            logger.warning("%s %s -> %s: %s", request.method, request.path, exc.status, exc.message)
        body = error_for(api_family(request.path), exc)
        return web.json_response(body, status=exc.status, headers=exc.headers)
    except ValidationError as exc:
        err = validation_error(exc)
        return web.json_response(error_for(api_family(request.path), err), status=err.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error(request, exc)
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        message = "The server had an error while processing your request."
        body = family_error_body(api_family(request.path), 500, message, "server_error")
        return web.json_response(body, status=500)
