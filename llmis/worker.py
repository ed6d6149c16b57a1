"""A worker thread per loaded model, consuming a bounded queue of generation jobs.

Jobs are submitted from the event loop. The worker runs them one at a time on its own thread
and hands every event back with ``loop.call_soon_threadsafe`` into the job's ``asyncio.Queue``,
so the event loop never blocks on llama.cpp. Cancelling a queued job removes it from the queue
at once; cancelling a running job stops it before its next token (or, during a long prompt
evaluation, through llama.cpp's abort callback).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from llmis.engine import Engine, FinishReason, GenerationCancelled, SamplingParams
from llmis.errors import APIError, ModelUnavailableError, QueueFullError

__all__ = [
    "CallJob",
    "Delta",
    "Failed",
    "Finished",
    "Job",
    "JobEvent",
    "ModelWorker",
    "SlotStats",
    "Started",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Started:
    """The worker picked the job up after ``queue_wait`` seconds."""

    queue_wait: float


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens reused from the KV cache, not evaluated again


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
T = TypeVar("T")


@dataclass(eq=False)
class Job:
    """One generation request for one prompt, owned by the event loop that submitted it."""

    prompt: Sequence[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[JobEvent] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    id: int = field(default_factory=lambda: next(_job_ids))
    done: bool = False

    def emit(self, event: JobEvent) -> None:
        """Thread-safe: queue ``event`` for the consumer on the job's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel.set()

    async def stream(self, idle_timeout: float | None = None) -> AsyncIterator[JobEvent | None]:
        """Yield events until the job ends; yield ``None`` after ``idle_timeout`` s of silence."""
        while True:
            try:
                event = await asyncio.wait_for(self.events.get(), idle_timeout)
            except TimeoutError:
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

    def _settle(self, result: Any, error: BaseException | None) -> None:
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        """Thread-safe: complete the future on the job's event loop."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._settle, result, error)


class ModelWorker:
    """Owns an :class:`Engine`; runs its jobs one at a time on a dedicated thread."""

    def __init__(self, name: str, engine: Engine, queue_size: int) -> None:
        self.name = name
        self.engine = engine
        self.queue_size = queue_size
        # for /metrics: prompt tokens of generation jobs, and how many came from the KV cache
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self._queue: deque[Job | CallJob] = deque()
        self._cond = threading.Condition()
        self._running: Job | CallJob | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"llmis-{name}", daemon=True)
        self._thread.start()

    # ----- event-loop side -----

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return 0 if self._running is None else 1

    @property
    def busy(self) -> bool:
        return self._running is not None or bool(self._queue)

    def slot_stats(self) -> list[SlotStats]:
        """The one slot: its running job and the tokens kept in the KV cache for reuse."""
        job = self._running
        job_id = job.id if isinstance(job, Job) else None
        return [SlotStats(0, job_id, self.engine.llm.n_tokens)]

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run ``fn(engine)`` on the worker thread, queued like any job; await its result.

        Raises :class:`QueueFullError` when the queue is full. If the awaiting task is
        cancelled, a still-queued call is dropped.
        """
        loop = asyncio.get_running_loop()
        job = CallJob(fn, loop, loop.create_future())
        self.submit([job])
        try:
            result: T = await job.future
            return result
        finally:
            self.cancel(job)

    def _idle_slots(self) -> int:
        """Jobs that can start at once, beyond the queue (call with the lock held)."""
        return 1 if self._running is None else 0

    def submit(self, jobs: Sequence[Job | CallJob]) -> None:
        """Queue ``jobs`` all together, or none of them when the queue cannot take them all."""
        with self._cond:
            if self._closing:
                raise ModelUnavailableError(f"model '{self.name}' is being unloaded")
            if len(jobs) > self.queue_size - len(self._queue) + self._idle_slots():
                raise QueueFullError(self.name, self.queue_size)
            self._queue.extend(jobs)
            self._cond.notify_all()

    def cancel(self, job: Job | CallJob) -> None:
        """Cancel ``job``: drop it if still queued, stop it at the next token if running."""
        job.cancel.set()
        with self._cond, contextlib.suppress(ValueError):
            self._queue.remove(job)

    async def drain(self) -> None:
        """Wait until no job is queued or running."""
        while self.busy:
            await asyncio.sleep(0.02)

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, cancel the queued ones, finish the running one, free the model."""
        with self._cond:
            self._closing = True
            dropped = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in dropped:
            job.cancel.set()
            if isinstance(job, CallJob):
                job.settle(error=_unloading(self.name))
            else:
                job.emit(Failed(_unloading(self.name)))
        self._thread.join(timeout)
        if self._thread.is_alive():  # the running job outlived the grace: stop it
            running = self._running
            if running is not None:
                running.cancel.set()
            self._thread.join(5.0)
        if self._thread.is_alive():
            # Never free a model a thread still uses: leaking it beats a segfault.
            logger.error("worker %s did not stop; its model is not freed", self.name)
            return
        self.engine.close()

    # ----- worker-thread side -----

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._running = job
            try:
                self._execute(job)
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()

    def _execute(self, job: Job | CallJob) -> None:
        if job.cancel.is_set():
            return
        if isinstance(job, CallJob):
            try:
                job.settle(job.fn(self.engine))
            except Exception as exc:
                if not isinstance(exc, APIError):
                    logger.exception("call failed in model %s", self.name)
                job.settle(error=exc)
            return
        job.emit(Started(time.monotonic() - job.enqueued_at))
        try:
            for step in self.engine.generate(job.prompt, job.params, job.cancel):
                if step.text:
                    job.emit(Delta(step.text))
                if step.finish_reason is not None:
                    self.prompt_tokens_total += len(job.prompt)
                    self.cached_tokens_total += self.engine.reused_tokens
                    job.emit(
                        Finished(
                            step.finish_reason,
                            len(job.prompt),
                            step.completion_tokens,
                            self.engine.reused_tokens,
                        )
                    )
        except GenerationCancelled:
            logger.debug("job %s cancelled during prompt evaluation", job.id)
        except APIError as exc:  # a request problem found late (e.g. its grammar)
            job.emit(Failed(exc))
        except Exception:
            logger.exception("generation failed in model %s", self.name)
            job.emit(Failed(APIError("generation failed; see the server log")))


def _unloading(name: str) -> APIError:
    return ModelUnavailableError(f"model '{name}' was unloaded before this request started")
