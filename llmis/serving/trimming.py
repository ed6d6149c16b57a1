"""Fitting a chat history into a model's context by dropping its oldest turns.

The leading system messages and the newest message are always kept. Whole turns go, oldest
first: a turn starts at a user message and runs up to the next one, so the kept history never
starts with an orphaned assistant reply. Token counts come from the model's own chat template
and tokenizer (a llama.cpp call: run :func:`trim_history` in a thread, :func:`trim_request`
does).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llmis.engine.scheduler import Scheduler
from llmis.errors import ContextOverflowError
from llmis.models.manager import ModelManager
from llmis.serving.generation import Generation, start_chat
from llmis.serving.policy import RequestPolicy
from llmis.serving.protocol import ChatCompletionRequest, ChatMessage

__all__ = ["Trimmed", "default_reserve", "start_trimmed_chat", "trim_history", "trim_request"]


@dataclass(frozen=True)
class Trimmed:
    messages: list[ChatMessage]
    dropped: int  # messages removed from the front of the conversation
    prompt_tokens: int  # of the kept messages


def default_reserve(n_ctx: int) -> int:
    """Room kept for the reply when the request names no ``max_tokens``."""
    return max(1, min(512, n_ctx // 4))


def _turn_starts(messages: Sequence[ChatMessage], first: int) -> list[int]:
    """Indexes (after ``first``) where a turn may start: user messages, never the last one."""
    last = len(messages) - 1
    return sorted({i for i in range(first + 1, last) if messages[i].role == "user"} | {last})


def trim_history(
    messages: Sequence[ChatMessage],
    count_tokens: Callable[[list[ChatMessage]], int],
    budget: int,
) -> Trimmed:
    """Keep the system prefix and the newest turns whose prompt fits in ``budget`` tokens.

    Drops as few turns as possible (binary search over turn boundaries: the count is
    non-increasing as turns are dropped). When even the system prefix and the last message
    do not fit, that smallest history is returned and the caller's context check reports it.
    """
    head = 0
    while head < len(messages) - 1 and messages[head].role in ("system", "developer"):
        head += 1
    system, body = list(messages[:head]), list(messages[head:])
    full = count_tokens(list(messages))
    if full <= budget or len(body) <= 1:
        return Trimmed(list(messages), 0, full)
    # Candidate cut points in ``body``: drop body[:cut]. Index 0 (drop nothing) already failed.
    cuts = [i - head for i in _turn_starts(messages, head)]
    lo, hi = 0, len(cuts) - 1
    best_tokens = count_tokens(system + body[cuts[hi] :])
    if best_tokens > budget:
        return Trimmed(system + body[cuts[hi] :], cuts[hi], best_tokens)
    while lo < hi:  # find the first cut that fits; cuts[hi] always fits
        mid = (lo + hi) // 2
        tokens = count_tokens(system + body[cuts[mid] :])
        if tokens <= budget:
            hi, best_tokens = mid, tokens
        else:
            lo = mid + 1
    return Trimmed(system + body[cuts[hi] :], cuts[hi], best_tokens)


async def trim_request(worker: Scheduler, request: ChatCompletionRequest) -> Trimmed:
    """Trim ``request.messages`` to the worker's context, leaving room for the reply.

    The reply's room is ``max_tokens`` (or ``max_completion_tokens``) when given, else
    :func:`default_reserve`. Tokenization runs in the default executor, like ``start_chat``'s.
    """
    engine = worker.engine
    reserve = request.token_limit or default_reserve(engine.n_ctx)
    budget = engine.n_ctx - reserve

    def count(messages: list[ChatMessage]) -> int:
        rendered: list[dict[str, Any]] = [m.as_template_message() for m in messages]
        return len(engine.chat_prompt(rendered))

    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, trim_history, request.messages, count, budget)


async def start_trimmed_chat(
    manager: ModelManager, request: ChatCompletionRequest, guard: RequestPolicy
) -> tuple[Generation, int]:
    """``start_chat``, but a history too long for the context loses its oldest turns first.

    Returns the generation and how many messages were dropped. The common case (it fits)
    costs nothing extra; only a :class:`ContextOverflowError` triggers trimming. When even the
    trimmed history cannot fit, that error is raised as ``start_chat`` raises it.
    """
    try:
        return await start_chat(manager, request, guard), 0
    except ContextOverflowError:
        async with manager.lease(request.model) as worker:  # not evicted while counting
            trimmed = await trim_request(worker, request)
        if trimmed.dropped == 0:
            raise
    generation = await start_chat(
        manager, request.model_copy(update={"messages": trimmed.messages}), guard
    )
    return generation, trimmed.dropped
