"""Stream chunking and pacing: ``stream_options.chunk_tokens`` and ``min_interval_ms``.

A generation's text arrives as one :class:`~llmis.engine.jobs.Delta` per decode step (about one
token). :func:`coalesce` merges them before a transport frames them: an event goes out once it
holds at least ``chunk_tokens`` tokens *and* at least ``min_interval_ms`` have passed since the
previous event (the first event is never held back by the interval). Whatever is held when the
generation ends goes out as one last event before the end (``Finished`` or ``Failed``), so no
text is lost. Keepalive ticks (``None``) pass through. With the defaults (1 token, 0 ms) every
delta is its own event: OpenAI's framing.

Held text waits for the next delta, not for a timer: it goes out at most one token late.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llmis.config import StreamingSettings
from llmis.engine.jobs import Delta, JobEvent
from llmis.engine.logprobs import TokenLogprob
from llmis.serving.protocol import StreamOptions

__all__ = ["Pacing", "coalesce", "pacing"]


@dataclass(frozen=True)
class Pacing:
    chunk_tokens: int = 1
    min_interval: float = 0.0  # seconds

    @property
    def passthrough(self) -> bool:
        return self.chunk_tokens <= 1 and self.min_interval <= 0


def pacing(defaults: StreamingSettings, options: StreamOptions | None) -> Pacing:
    """The request's ``stream_options`` over the config's ``[streaming]`` defaults."""
    chunk = defaults.chunk_tokens
    interval = defaults.min_interval_ms
    if options is not None:
        chunk = options.chunk_tokens if options.chunk_tokens is not None else chunk
        if options.min_interval_ms is not None:
            interval = options.min_interval_ms
    return Pacing(chunk, interval / 1000.0)


async def coalesce(
    events: AsyncIterator[JobEvent | None], pace: Pacing
) -> AsyncIterator[JobEvent | None]:
    """``events`` with their deltas merged as ``pace`` says (see the module docstring)."""
    if pace.passthrough:
        async for event in events:
            yield event
        return
    held: list[str] = []
    held_logprobs: list[TokenLogprob] = []
    held_tokens = 0
    counted = 0  # the generation's token count at the last delta
    last_sent = float("-inf")
    async for event in events:
        if isinstance(event, Delta):
            held.append(event.text)
            held_logprobs.extend(event.logprobs)
            if event.completion_tokens:
                held_tokens += max(event.completion_tokens - counted, 0)
                counted = event.completion_tokens
            else:
                held_tokens += 1
            now = time.monotonic()
            if held_tokens >= pace.chunk_tokens and now - last_sent >= pace.min_interval:
                yield Delta("".join(held), tuple(held_logprobs), counted)
                held, held_logprobs, held_tokens, last_sent = [], [], 0, now
            continue
        if event is not None and held:  # the end: the remainder first
            yield Delta("".join(held), tuple(held_logprobs), counted)
            held, held_logprobs, held_tokens = [], [], 0
        yield event
    if held:
        yield Delta("".join(held), tuple(held_logprobs), counted)
