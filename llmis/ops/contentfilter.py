"""A denylist of keywords and regexes, checked on prompts and on generated text.

Keywords match whole words, case-insensitively; patterns are Python regexes used as written.
A matching prompt is refused with 400 ``content_filter``. Generated text is scanned as it
streams: :class:`OutputScanner` releases text ``holdback_chars`` behind the model, so that a
match split across tokens is caught before its first character is sent; at a match, the
text before it is released and the generation ends with ``finish_reason: "content_filter"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from llmis.config import FilterSettings
from llmis.errors import BadRequestError

__all__ = ["ContentFilter", "ContentFilterError", "OutputScanner"]

# How far back from the released text a new scan starts: matches longer than this that
# began in text already released may be missed.
_RESCAN_CHARS = 1024


class ContentFilterError(BadRequestError):
    code = "content_filter"


class ContentFilter:
    def __init__(self, settings: FilterSettings) -> None:
        self.holdback = settings.holdback_chars
        self._regexes = [re.compile(p) for p in settings.patterns]
        if settings.keywords:
            words = "|".join(re.escape(k.strip()) for k in settings.keywords)
            self._regexes.append(re.compile(rf"(?<!\w)(?:{words})(?!\w)", re.IGNORECASE))

    @property
    def enabled(self) -> bool:
        return bool(self._regexes)

    def search(self, text: str, start: int = 0) -> re.Match[str] | None:
        """The match that starts first in ``text[start:]``, or ``None``."""
        found = [m for m in (r.search(text, start) for r in self._regexes) if m is not None]
        return min(found, key=lambda m: m.start(), default=None)

    def check_prompt(self, texts: Iterable[str], param: str) -> None:
        """Raise :class:`ContentFilterError` when any of ``texts`` matches."""
        if self.enabled and any(self.search(text) for text in texts):
            raise ContentFilterError(
                "The prompt was rejected by this server's content filter.", param=param
            )

    def scanner(self) -> OutputScanner:
        return OutputScanner(self)


class OutputScanner:
    """Generated text in, text safe to send out; ``tripped`` once the filter matched."""

    def __init__(self, content_filter: ContentFilter) -> None:
        self.filter = content_filter
        self.text = ""
        self.released = 0
        self.tripped = False

    def _release(self, end: int) -> str:
        end = max(end, self.released)
        out, self.released = self.text[self.released : end], end
        return out

    def feed(self, piece: str, final: bool = False) -> str:
        """Add ``piece``; return the text that may be sent now (all of it when ``final``)."""
        if self.tripped:
            return ""
        self.text += piece
        match = self.filter.search(self.text, max(0, self.released - _RESCAN_CHARS))
        if match is not None:
            self.tripped = True
            return self._release(match.start())
        return self._release(len(self.text) if final else len(self.text) - self.filter.holdback)
