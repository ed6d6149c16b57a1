"""llama.cpp's GBNF grammars for JSON: any JSON value, or JSON that follows a schema.

The converter is llama-cpp-python's (``llama_cpp.llama_grammar``); it is pure Python but lives
in the llama_cpp package, so it is reached only through here. It raises bare exceptions on
schemas it cannot convert: :class:`GrammarError` carries their text.
"""

from __future__ import annotations

import json
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

__all__ = ["JSON_GBNF", "GrammarError", "SchemaTooDeepError", "schema_grammar"]


class GrammarError(ValueError):
    """The JSON schema cannot be turned into a grammar; the message says why."""


class SchemaTooDeepError(GrammarError):
    """The JSON schema is nested too deeply to convert."""


def schema_grammar(schema: str | dict[str, Any]) -> str:
    """The GBNF grammar of JSON that follows ``schema`` (blocking CPU work)."""
    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        grammar: str = json_schema_to_gbnf(text)
    except RecursionError:
        raise SchemaTooDeepError("the JSON schema is nested too deeply") from None
    except Exception as exc:  # the converter raises bare exceptions on bad schemas
        raise GrammarError(str(exc)[:200] or type(exc).__name__) from None
    return grammar
