"""What both per-model schedulers share: a dedicated thread, its queue under one lock, and the
event-loop side's admission, idle and failure notifications.

:class:`~llmis.engine.scheduler.Scheduler` (generation) and
:class:`~llmis.engine.embedding_scheduler.EmbeddingScheduler` subclass it and say what a job is
and when their thread is idle (:meth:`ModelThread._idle_locked`). Waiting is on events set from
the thread with ``call_soon_threadsafe`` (:func:`~llmis.engine.jobs.notify`), never on timers.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from llmis.engine.jobs import Notify, notify
from llmis.errors import APIError, ModelUnavailableError

__all__ = ["ModelThread", "unloading_error"]

J = TypeVar("J")


def unloading_error(name: str) -> APIError:
    """What a job still queued when its model unloads gets."""
    return ModelUnavailableError(f"model '{name}' was unloaded before this request started")


class ModelThread(Generic[J]):
    """A model's thread and queue; subclasses implement ``_main`` and ``_idle_locked``."""

    def __init__(self, name: str, queue_size: int, thread_name: str) -> None:
        self.name = name
        self.queue_size = queue_size
        self.failure: str | None = None  # why the thread died, if it did
        self._queue: deque[J] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._idle_waiters: list[Notify] = []
        self._failure_waiters: list[Notify] = []
        self._thread = threading.Thread(target=self._main, name=thread_name, daemon=True)

    def _main(self) -> None:
        raise NotImplementedError

    def _idle_locked(self) -> bool:
        """No job queued or running on this thread (call with the lock held)."""
        raise NotImplementedError

    # ----- event-loop side -----

    def _check_open(self) -> None:
        """Refuse new jobs once the thread failed or the model unloads (lock held)."""
        if self.failure is not None:
            raise ModelUnavailableError(f"model '{self.name}' failed; it is being reloaded")
        if self._closing:
            raise ModelUnavailableError(f"model '{self.name}' is being unloaded")

    def on_failure(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        """Call ``callback`` on ``loop`` if the thread dies."""
        with self._cond:
            if self.failure is None:
                self._failure_waiters.append((loop, callback))
                return
        notify([(loop, callback)])

    async def _wait_idle_once(self) -> None:
        """Until the thread next reports itself idle (at once if it is)."""
        idle = asyncio.Event()
        with self._cond:
            if self._idle_locked():
                return
            self._idle_waiters.append((asyncio.get_running_loop(), idle.set))
        await idle.wait()

    async def drain(self) -> None:
        """Wait (on an event, not a timer) until no job is queued or running."""
        while self._thread.is_alive():
            with self._cond:
                if self._idle_locked():
                    return
            await self._wait_idle_once()

    def _unqueue(self, job: J) -> None:
        """Drop ``job`` from the queue if it is still there (lock held). Compared by identity:
        ``deque.remove`` would compare with ``==`` and, when the job is not queued, put the
        job's ``repr`` (its prompt, its result arrays) into the error it raises."""
        for index, queued in enumerate(self._queue):
            if queued is job:
                del self._queue[index]
                return

    def _stop_taking(self) -> list[J]:
        """Refuse new jobs; return the queued ones (to fail) and wake the thread."""
        with self._cond:
            self._closing = True
            dropped = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        return dropped

    def _join(self, timeout: float, stop_running: Callable[[], None]) -> bool:
        """Wait for the thread; past ``timeout``, ``stop_running()`` and wait 5 s more.
        ``False`` when it still runs: then nothing it uses may be freed."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            stop_running()
            with self._cond:
                self._cond.notify_all()
            self._thread.join(5.0)
        return not self._thread.is_alive()

    # ----- thread side -----

    def _report_idle(self) -> None:
        """Wake every :meth:`drain` (lock held: the waiters are taken under it)."""
        waiters, self._idle_waiters = self._idle_waiters, []
        notify(waiters)

    def _mark_failed(self, reason: str) -> tuple[APIError, list[J], list[Notify]]:
        """The thread is dying: refuse jobs from now on. Returns the error to fail jobs with,
        the queued jobs, and the failure callbacks to run (lock held by the caller)."""
        self.failure = reason
        self._closing = True
        dropped = list(self._queue)
        self._queue.clear()
        waiters, self._failure_waiters = self._failure_waiters, []
        error = ModelUnavailableError(
            f"model '{self.name}' failed while serving ({reason}); retry the request"
        )
        return error, dropped, waiters
