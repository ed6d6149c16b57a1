"""The per-request policy the serving layer applies to a generation, as an interface.

The handler that serves a request builds its policy (caps, timeouts, the output content filter,
metrics, shutdown: :class:`llmis.ops.policy.Guard`) and passes it to
:func:`~llmis.serving.generation.start_chat` and friends. Serving only calls these methods, so it
depends on no operations code, and no generation runs without the policy its caller chose.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import Protocol

from llmis.engine.jobs import Job, JobEvent

__all__ = ["RequestPolicy"]


class RequestPolicy(Protocol):
    """What serving asks of a request's policy, before queueing and while generating."""

    def admitted(self) -> None:
        """The model exists and the request is going ahead on it."""

    def check_prompt_text(self, texts: Iterable[str], param: str) -> None:
        """Raise a 400 when the prompt's text is refused (the input content filter)."""

    def max_tokens(self, n_prompt: int, requested: int | None, param: str) -> int | None:
        """Apply the caps to the prompt size and ``max_tokens``; return what to ask for."""

    def clamp(self, effective: int, requested: int | None) -> int:
        """The engine's default ``max_tokens`` (the rest of the context), capped."""

    def cancelled(self, job: Job) -> None:
        """The request ended before ``job`` did."""

    def events(
        self, job: Job, cancel: Callable[[Job], None], keepalive: float | None = None
    ) -> AsyncIterator[JobEvent | None]:
        """``job``'s events with the policy applied; ``None`` = send a keepalive ping."""
