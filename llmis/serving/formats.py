"""A request's output constraints and sampling values, as the engine takes them.

``response_format`` becomes a llama.cpp grammar (JSON, or JSON following a schema): CPU work,
done once per request in a thread by :func:`compile_grammar` before the request is queued.
:func:`sampling_params` turns the request's sampling fields into the engine's
:class:`~llmis.engine.sampling.SamplingParams`.
"""

from __future__ import annotations

import asyncio

from llmis.engine.grammar import JSON_GBNF, GrammarError, SchemaTooDeepError, schema_grammar
from llmis.engine.sampling import SamplingParams
from llmis.errors import BadRequestError
from llmis.serving.protocol import (
    GREEDY_BELOW,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseFormat,
)

__all__ = ["compile_grammar", "request_grammar", "sampling_params"]


def _build(fmt: ResponseFormat) -> str | None:
    if fmt.type == "json_object":
        return JSON_GBNF
    if fmt.type != "json_schema" or fmt.schema_text is None:
        return None
    try:
        return schema_grammar(fmt.schema_text)
    except SchemaTooDeepError:
        raise BadRequestError(
            "response_format: the JSON schema is nested too deeply to be enforced",
            param="response_format",
            code="invalid_value",
        ) from None
    except GrammarError as exc:
        raise BadRequestError(
            f"response_format: this JSON schema cannot be enforced: {exc}",
            param="response_format",
            code="invalid_value",
        ) from None


def request_grammar(request: ChatCompletionRequest | CompletionRequest) -> str | None:
    """The grammar the request's ``response_format`` asks for (built on first use: blocking)."""
    fmt = request.response_format
    return fmt.grammar_with(_build) if fmt is not None else None


async def compile_grammar(request: ChatCompletionRequest | CompletionRequest) -> None:
    """Build the request's ``response_format`` grammar in a thread, off the event loop."""
    if request.response_format is not None:
        await asyncio.get_running_loop().run_in_executor(None, request_grammar, request)


def sampling_params(
    request: ChatCompletionRequest | CompletionRequest, max_tokens: int
) -> SamplingParams:
    """The engine's sampling values for ``request``: its fields, else the engine's defaults."""
    defaults = SamplingParams(max_tokens=max_tokens)
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())

    def pick(value: float | None, default: float) -> float:
        return default if value is None else value

    temperature = pick(request.temperature, defaults.temperature)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=pick(request.top_p, defaults.top_p),
        top_k=request.top_k if request.top_k is not None else defaults.top_k,
        min_p=pick(request.min_p, defaults.min_p),
        repeat_penalty=pick(request.repeat_penalty, defaults.repeat_penalty),
        presence_penalty=pick(request.presence_penalty, defaults.presence_penalty),
        frequency_penalty=pick(request.frequency_penalty, defaults.frequency_penalty),
        seed=request.seed,
        stop=stop,
        logit_bias={int(k): v for k, v in (request.logit_bias or {}).items()},
        grammar=request_grammar(request),
    )
