"""Turning what a model wrote under a :class:`~llmis.serving.tools.ToolPlan` back into content
and calls.

An :class:`OutputParser` is fed the generated text piece by piece and returns what can be sent
now, as :class:`ContentPiece` and :class:`CallPiece` items in OpenAI's streaming order: a
call's ``index``, ``id`` and ``name`` once, then its ``arguments`` text in pieces. After each
piece the whole text so far is parsed again (outputs are short) into a snapshot, and only
what grew since the last snapshot is sent, so a piece never has to be taken back:

* generic format: nothing is sent until the first key of the JSON object is known.
  ``response`` streams its string value, unescaped, as content; ``tool_call`` /
  ``tool_calls`` stream each call as soon as its name is complete, its arguments as the raw
  JSON text the grammar let through.
* hermes format: text before ``<tool_call>`` is content (a possible start of the tag is
  held back); a call is sent only once its block is closed and its JSON is a complete call
  of a declared function, so free text can never yield a half-parsed call.

The non-streamed answer is the same parse: :meth:`OutputParser.message` after the last piece.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from llmis.serving.tools import HERMES_CLOSE, HERMES_OPEN, ToolPlan

__all__ = [
    "CallPiece",
    "ContentPiece",
    "OutputParser",
    "ParsedCall",
    "Piece",
    "chat_deltas",
    "tool_call_objects",
]


@dataclass(frozen=True)
class ContentPiece:
    text: str


@dataclass(frozen=True)
class CallPiece:
    """A piece of call ``index``: the header (``id`` and ``name``) once, then arguments."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None

    def delta(self) -> dict[str, object]:
        """The OpenAI ``delta.tool_calls[i]`` object of this piece."""
        if self.name is not None:
            return {
                "index": self.index,
                "id": self.id,
                "type": "function",
                "function": {"name": self.name, "arguments": self.arguments},
            }
        return {"index": self.index, "function": {"arguments": self.arguments}}


Piece = ContentPiece | CallPiece


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str


@dataclass
class _Snapshot:
    content: str = ""
    calls: list[tuple[str | None, str]] = field(default_factory=list)  # (name, raw arguments)
    complete: bool = False  # the whole output parsed (a finished JSON object)
    invalid: bool = False  # not in the expected format: it is all content


class _Incomplete(Exception):
    pass


class _Invalid(Exception):
    pass


_WS = " \t\n\r"
_HIGH_SURROGATE = re.compile(r"(\\*)\\u[dD][89abAB][0-9a-fA-F]{2}$")


def _ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _string_end(s: str, i: int) -> int:
    """``s[i]`` is ``"``: the index after the closing quote (``_Incomplete`` if none yet)."""
    j = i + 1
    while j < len(s):
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return j + 1
        j += 1
    raise _Incomplete


def _value_end(s: str, i: int) -> int:
    """The end of the JSON value starting at ``s[i]`` (``_Incomplete`` until it is whole)."""
    if i >= len(s):
        raise _Incomplete
    c = s[i]
    if c == '"':
        return _string_end(s, i)
    if c in "{[":
        depth, j = 0, i
        while j < len(s):
            c = s[j]
            if c == '"':
                j = _string_end(s, j)
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        raise _Incomplete
    j = i
    while j < len(s) and s[j] not in ",}] \t\n\r":
        j += 1
    if j == len(s):
        raise _Incomplete  # a number or literal may still grow
    return j


def _partial_string(s: str, i: int) -> tuple[str, bool]:
    """The decoded text of the JSON string at ``s[i]`` so far, and whether it is closed."""
    try:
        end = _string_end(s, i)
        return json.loads(s[i:end]), True
    except _Incomplete:
        pass
    body = s[i + 1 :]
    cut = len(body)
    k = body.rfind("\\")
    while k >= 0:  # find the last escape start that is not itself escaped
        run = 0
        while k - run - 1 >= 0 and body[k - run - 1] == "\\":
            run += 1
        if run % 2 == 0:
            break
        k = body.rfind("\\", 0, k - run)
    if k >= 0:
        needed = 6 if body[k + 1 : k + 2] == "u" else 2
        if len(body) - k < needed:
            cut = k
    high = _HIGH_SURROGATE.search(body, 0, cut)
    if high is not None and high.end() == cut and len(high.group(1)) % 2 == 0:
        cut = high.start() + len(high.group(1))  # a high surrogate waits for its pair
    try:
        return json.loads('"' + body[:cut] + '"'), False
    except ValueError as exc:
        raise _Invalid from exc


def _call_object(s: str, i: int) -> tuple[str | None, str, int | None]:
    """Parse a call object at ``s[i]``: (name, raw arguments so far, end or None)."""
    if s[i] != "{":
        raise _Invalid
    name: str | None = None
    arguments = ""
    j = _ws(s, i + 1)
    try:
        while True:
            if j >= len(s):
                raise _Incomplete
            if s[j] == "}":
                return name, arguments, j + 1
            if s[j] == ",":
                j = _ws(s, j + 1)
                continue
            if s[j] != '"':
                raise _Invalid
            key_end = _string_end(s, j)
            key = json.loads(s[j:key_end])
            j = _ws(s, key_end)
            if j >= len(s):
                raise _Incomplete
            if s[j] != ":":
                raise _Invalid
            j = _ws(s, j + 1)
            if j >= len(s):
                raise _Incomplete
            if key == "arguments":
                try:
                    end = _value_end(s, j)
                except _Incomplete:
                    arguments = s[j:]
                    raise
                arguments = s[j:end]
                j = _ws(s, end)
            else:
                end = _value_end(s, j)
                if key == "name":
                    value = json.loads(s[j:end])
                    name = value if isinstance(value, str) else None
                j = _ws(s, end)
    except _Incomplete:
        return name, arguments, None


def _generic(text: str) -> _Snapshot:
    snap = _Snapshot()
    i = _ws(text, 0)
    if i >= len(text):
        return snap
    if text[i] != "{":
        raise _Invalid
    j = _ws(text, i + 1)
    if j >= len(text):
        return snap
    if text[j] != '"':
        raise _Invalid
    try:
        key_end = _string_end(text, j)
    except _Incomplete:
        return snap
    key = json.loads(text[j:key_end])
    j = _ws(text, key_end)
    if j >= len(text) or text[j] != ":":
        if j < len(text):
            raise _Invalid
        return snap
    j = _ws(text, j + 1)
    if j >= len(text):
        return snap
    end: int | None = None
    if key == "response":
        if text[j] != '"':
            raise _Invalid
        snap.content, closed = _partial_string(text, j)
        end = _string_end(text, j) if closed else None
    elif key == "tool_call":
        name, args, end = _call_object(text, j)
        snap.calls.append((name, args))
    elif key == "tool_calls":
        if text[j] != "[":
            raise _Invalid
        k = _ws(text, j + 1)
        while k < len(text):
            if text[k] == "]":
                end = k + 1
                break
            if text[k] == ",":
                k = _ws(text, k + 1)
                continue
            name, args, call_end = _call_object(text, k)
            snap.calls.append((name, args))
            if call_end is None:
                break
            k = _ws(text, call_end)
    else:
        raise _Invalid
    if end is not None:
        k = _ws(text, end)
        snap.complete = k < len(text) and text[k] == "}"
    return snap


def _hermes(text: str, names: frozenset[str], final: bool) -> _Snapshot:
    snap = _Snapshot()
    start = text.find(HERMES_OPEN)
    if start < 0:
        hold = 0
        if not final:
            for size in range(min(len(HERMES_OPEN) - 1, len(text)), 0, -1):
                if text.endswith(HERMES_OPEN[:size]):
                    hold = size
                    break
        snap.content = text[: len(text) - hold]
        snap.complete = final
        return snap
    snap.content = text[:start].rstrip() if final else text[:start]
    pos = start
    while pos >= 0:
        body_start = pos + len(HERMES_OPEN)
        close = text.find(HERMES_CLOSE, body_start)
        body = text[body_start:close] if close >= 0 else text[body_start:]
        if close < 0 and not final:
            break  # a call is sent whole, once its block is closed
        try:
            call = json.loads(body)
        except ValueError:
            raise _Invalid from None
        if not (
            isinstance(call, dict)
            and call.get("name") in names
            and isinstance(call.get("arguments", {}), dict)
        ):
            raise _Invalid
        arguments = json.dumps(call.get("arguments", {}), ensure_ascii=False)
        snap.calls.append((call["name"], arguments))
        if close < 0:
            break
        pos = text.find(HERMES_OPEN, close + len(HERMES_CLOSE))
    snap.complete = final
    return snap


class OutputParser:
    """Feed generated text; get the pieces to send (see the module docstring)."""

    def __init__(self, plan: ToolPlan | None) -> None:
        self.plan = plan
        self.text = ""
        self._sent_content = 0
        self._sent_args: list[int] = []  # per call: arguments characters sent
        self.calls: list[ParsedCall] = []
        self._invalid = False

    def _snapshot(self, final: bool) -> _Snapshot:
        plan = self.plan
        if plan is None or self._invalid:
            return _Snapshot(content=self.text, invalid=self._invalid)
        try:
            if plan.format == "hermes":
                return _hermes(self.text, plan.names, final)
            return _generic(self.text)
        except _Invalid:
            self._invalid = True
            return _Snapshot(content=self.text, invalid=True)

    def _diff(self, snap: _Snapshot) -> list[Piece]:
        out: list[Piece] = []
        if snap.invalid and self.calls:
            return out  # calls already went out; the rest cannot be taken as content
        if len(snap.content) > self._sent_content:
            out.append(ContentPiece(snap.content[self._sent_content :]))
            self._sent_content = len(snap.content)
        for index, (name, arguments) in enumerate(snap.calls):
            if index >= len(self.calls):
                if name is None:
                    break  # the header goes out with the name
                self.calls.append(ParsedCall(f"call_{uuid.uuid4().hex[:24]}", name, ""))
                self._sent_args.append(0)
                out.append(CallPiece(index, "", self.calls[index].id, name))
            sent = self._sent_args[index]
            if len(arguments) > sent:
                out.append(CallPiece(index, arguments[sent:]))
                self._sent_args[index] = len(arguments)
                self.calls[index].arguments = arguments
        return out

    def feed(self, text: str) -> list[Piece]:
        self.text += text
        if self.plan is None:
            self._sent_content = len(self.text)
            return [ContentPiece(text)] if text else []
        return self._diff(self._snapshot(final=False))

    def finish(self) -> list[Piece]:
        """The last pieces, once generation ended."""
        if self.plan is None:
            return []
        snap = self._snapshot(final=True)
        if snap.invalid and not self.calls and self._sent_content < len(self.text):
            # not the expected format after all: what is left goes out as content
            piece = ContentPiece(self.text[self._sent_content :])
            self._sent_content = len(self.text)
            return [piece]
        return self._diff(snap)

    @property
    def content(self) -> str:
        """The content part of the answer (after :meth:`finish`)."""
        if self.plan is None or self._invalid:
            return self.text
        return self._snapshot(final=True).content

    def finish_reason(self, reason: str) -> str:
        """OpenAI's finish reason: ``tool_calls`` when the model called and stopped."""
        return "tool_calls" if self.calls and reason == "stop" else reason


def chat_deltas(pieces: list[Piece]) -> list[dict[str, Any]]:
    """Chat-chunk ``delta`` objects for ``pieces``: content runs merged, one per call piece."""
    out: list[dict[str, Any]] = []
    for piece in pieces:
        if isinstance(piece, ContentPiece):
            if out and "content" in out[-1]:
                out[-1]["content"] += piece.text
            else:
                out.append({"content": piece.text})
        else:
            out.append({"tool_calls": [piece.delta()]})
    return out


def tool_call_objects(parser: OutputParser) -> list[dict[str, Any]] | None:
    """``message.tool_calls`` of a whole answer (None when the model called nothing)."""
    if not parser.calls:
        return None
    return [
        {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for call in parser.calls
    ]
