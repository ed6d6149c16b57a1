"""The jobs a model's scheduler runs, and the events a generation job sends back.

A :class:`Job` is created on the event loop and consumed by the model's scheduler thread,
which hands every event back with ``loop.call_soon_threadsafe`` into the job's
``asyncio.Queue`` (one wake-up per loop per decode step), so the event loop never blocks on
llama.cpp. A :class:`CallJob` is a blocking call on the model (an embedding batch, a test
probe) run between decode steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmis.engine.llama import Engine
from llmis.engine.logprobs import TokenLogprob
from llmis.engine.sampling import FinishReason, SamplingParams
from llmis.errors import APIError

__all__ = [
    "CallJob",
    "Delta",
    "Failed",
    "Finished",
    "Job",
    "JobEvent",
    "Notify",
    "SlotStats",
    "Started",
    "deliver",
    "notify",
    "settle_future",
]

# a callback to run on an event loop, from a model's thread
Notify = tuple[asyncio.AbstractEventLoop, Callable[[], None]]


def notify(waiters: Sequence[Notify]) -> None:
    """Run each callback on its loop (thread-safe); a closed loop has nobody left to tell."""
    for loop, callback in waiters:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(callback)


def settle_future(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any = None,
    error: BaseException | None = None,
) -> bool:
    """Thread-safe: complete ``future`` on ``loop``; ``False`` when the loop is closed."""

    def put() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(put)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        return False
    return True


@dataclass(frozen=True)
class Started:
    """The worker picked the job up after ``queue_wait`` seconds."""

    queue_wait: float


@dataclass(frozen=True)
class Delta:
    text: str
    # the tokens behind ``text`` when the job asked for logprobs (Job.logprobs)
    logprobs: tuple[TokenLogprob, ...] = ()
    completion_tokens: int = 0  # tokens generated so far, this text included (0: not known)


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens reused from the KV cache, not evaluated again
    stop_sequence: str | None = None  # the stop string that ended the job, if one did


@dataclass(frozen=True)
class Failed:
    error: APIError


JobEvent = Started | Delta | Finished | Failed


@dataclass(frozen=True)
class SlotStats:
    """One generation slot: the job it runs (if any) and the KV-cache tokens it holds."""

    slot: int
    job_id: int | None
    kv_tokens: int


_job_ids = itertools.count(1)


class _Tick:
    """Put in a job's queue by its deadline timer: the wait for the next event timed out."""


_TICK = _Tick()


@dataclass(eq=False)
class Job:
    """One generation request for one prompt, owned by the event loop that submitted it."""

    prompt: Sequence[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[JobEvent | _Tick] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    id: int = field(default_factory=lambda: next(_job_ids))
    done: bool = False
    logprobs: int | None = None  # report each token's logprob and this many alternatives
    _deadline: float | None = field(default=None, init=False, repr=False)  # of the wait
    _timer: asyncio.Handle | None = field(default=None, init=False, repr=False)
    _timer_at: float = field(default=0.0, init=False, repr=False)

    def emit(self, event: JobEvent) -> None:
        """Thread-safe: queue ``event`` for the consumer on the job's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel.set()

    async def next_event(self, timeout: float | None) -> JobEvent | None:
        """The next event, or ``None`` after ``timeout`` s of silence.

        No timer per token: an event already queued is taken at once (a decode step delivers
        a whole batch of events with one wake-up), and a wait moves the job's one deadline
        timer forward instead of arming a new one; the timer re-arms itself when it finds
        the deadline moved, so it fires about once per ``timeout``, not once per event.
        """
        while not self.events.empty():
            event = self.events.get_nowait()
            if not isinstance(event, _Tick):  # a tick left by a wait that had ended
                return self._took(event)
        if timeout is None:
            event = await self.events.get()
            return None if isinstance(event, _Tick) else self._took(event)
        self._deadline = self.loop.time() + timeout
        if self._timer is None or self._timer_at > self._deadline:
            self._arm(self._deadline)
        try:
            event = await self.events.get()
        finally:
            self._deadline = None
        return None if isinstance(event, _Tick) else self._took(event)

    def _took(self, event: JobEvent) -> JobEvent:
        if isinstance(event, Finished | Failed) and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return event

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        # (uvloop's handles have no when(): the time is kept here)
        self._timer, self._timer_at = self.loop.call_at(when, self._on_timer), when

    def _on_timer(self) -> None:
        self._timer = None
        if self._deadline is None:
            return  # nobody is waiting; the next wait arms a timer again
        if self.loop.time() < self._deadline:
            self._arm(self._deadline)
        else:
            self.events.put_nowait(_TICK)  # wakes the waiter, which returns None

    async def stream(self, idle_timeout: float | None = None) -> AsyncIterator[JobEvent | None]:
        """Yield events until the job ends; yield ``None`` after ``idle_timeout`` s of silence."""
        while True:
            event = await self.next_event(idle_timeout)
            if event is None:
                yield None
                continue
            if isinstance(event, Finished | Failed):
                self.done = True
            yield event
            if self.done:
                return


@dataclass(eq=False)
class CallJob:
    """A blocking call on the model's engine (e.g. an embedding batch), run in queue order."""

    fn: Callable[[Engine], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    done: bool = False

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        """Thread-safe: complete the future on the job's event loop."""
        settle_future(self.loop, self.future, result, error)


def deliver(outbox: list[tuple[Job, JobEvent]]) -> None:
    """Hand one step's events to their event loops: one wake-up per loop, not one per token."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, JobEvent]]] = {}
    for job, event in outbox:
        by_loop.setdefault(job.loop, []).append((job, event))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            for job, _ in items:
                job.cancel.set()


def _put_all(items: list[tuple[Job, JobEvent]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)
