"""The embedding scheduler of a model: a thread that batches every request's inputs together.

It mirrors the generation scheduler (:mod:`llmis.engine.scheduler`): requests queue
:class:`EmbedJob` s from the event loop; a thread of its own takes every queued job, checks and
tokenizes all of a job's inputs before any of them is decoded (one bad input fails its whole
request, 400, before any work), and then decodes batches that mix the rows of every waiting
request. Each batch first takes one row of every job (so a one-query ``/v1/search`` never waits
behind a long ``/v1/embeddings`` request), then fills up in arrival order, within
:attr:`EmbeddingScheduler.batch_tokens` tokens and ``n_seq_max`` sequences. A job's result
(and its ``then`` step, e.g. a search's top-k, run on this thread) goes back to its event loop
with ``call_soon_threadsafe`` once its last row is decoded. A cancelled job drops its rows
before the next batch. A failed decode fails the jobs in that batch only; if the thread itself
dies, every job gets an error and ``on_failure`` callbacks run (the model is reloaded).

How many tokens go in one decode, and why, is in :mod:`llmis.engine.embedding_context`.

Decodes run data-parallel: with ``threads`` llama.cpp threads the scheduler keeps
``workers(threads)`` contexts (2 for 2 threads), and a step with that many batches' worth of
rows decodes one batch per context at once, each context on one thread of its own (the
scheduler's thread and helper threads). A lone batch (a one-query search) decodes on the first
context with every thread. On a small model a decode is dozens of tiny operations with a
thread barrier after each; split among threads, a third of the time went to those barriers
(py-spy), while whole batches side by side need none: 1.2-1.3x the rows/s on MiniLM at 2
threads, measured in process.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from llmis.engine.embedding_context import (
    BATCH_TOKENS,
    EmbeddingContext,
    EmbeddingInput,
    Pooling,
)
from llmis.engine.jobs import notify, settle_future
from llmis.engine.llama import Engine
from llmis.engine.model_thread import ModelThread, unloading_error
from llmis.errors import APIError, QueueFullError

__all__ = [
    "EmbedJob",
    "EmbeddingScheduler",
    "EmbeddingsResult",
    "embedding_outputs",
    "workers",
]

logger = logging.getLogger(__name__)

MAX_WORKERS = 4  # contexts decoding side by side at most (beyond, each gets more threads)


@dataclass(frozen=True)
class EmbeddingsResult:
    """Raw vectors (one row per input, unnormalised) and the tokens the inputs took."""

    vectors: NDArray[np.float32]
    prompt_tokens: int
    truncated: int = 0


@dataclass(eq=False)
class EmbedJob:
    """One request's inputs; settled with ``then(result)`` (or the result) on its loop."""

    inputs: Sequence[EmbeddingInput]
    pooling: Pooling
    truncate: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    then: Callable[[EmbeddingsResult], Any] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    # the scheduler thread's state
    seqs: list[list[int]] = field(default_factory=list)
    rows: NDArray[np.float32] | None = None
    next: int = 0  # the next input to put in a batch
    done: int = 0  # inputs decoded
    truncated: int = 0

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        """Thread-safe: complete the future on the job's event loop."""
        if not settle_future(self.loop, self.future, result, error):
            self.cancel.set()  # the loop is closed: nobody is listening any more


class EmbeddingScheduler(ModelThread[EmbedJob]):
    """Batches the embedding jobs of one model on a dedicated thread."""

    def __init__(
        self,
        name: str,
        engine: Engine,
        queue_size: int,
        *,
        batch_tokens: int = BATCH_TOKENS,
        context: EmbeddingContext | None = None,
    ) -> None:
        super().__init__(name, queue_size, f"llmis-embed-{name}")
        self.engine = engine
        count, self.threads_each = workers(engine.threads)
        if context is not None:
            count, self.threads_each = 1, engine.threads
        self.contexts: list[EmbeddingContext] = []
        self._helpers: ThreadPoolExecutor | None = None
        try:
            self.contexts.append(context or EmbeddingContext(engine, batch_tokens=batch_tokens))
            for _ in range(count - 1):
                self.contexts.append(
                    EmbeddingContext(engine, batch_tokens=batch_tokens, threads=self.threads_each)
                )
        except BaseException:
            for made in self.contexts:
                made.close()
            raise
        if count > 1:
            self._helpers = ThreadPoolExecutor(count - 1, f"llmis-embed-{name}")
        self.context = self.contexts[0]  # tokenizes, and decodes a lone batch
        self.batch_tokens = min(batch_tokens, self.context.n_batch)
        # for tests and /metrics: what the thread decoded
        self.rows_total = 0
        self.tokens_total = 0
        self.decodes_total = 0
        self._active: list[EmbedJob] = []
        self._thread.start()

    # ----- event-loop side -----

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def busy(self) -> bool:
        return bool(self._queue) or bool(self._active)

    async def embed(
        self,
        inputs: Sequence[EmbeddingInput],
        *,
        pooling: Pooling = "mean",
        truncate: bool = False,
        then: Callable[[EmbeddingsResult], Any] | None = None,
    ) -> Any:
        """Queue ``inputs`` and await their :class:`EmbeddingsResult` (or ``then`` of it).

        Raises :class:`QueueFullError` when the queue is full; if the awaiting task is
        cancelled, the job's remaining rows are dropped.
        """
        loop = asyncio.get_running_loop()
        job = EmbedJob(list(inputs), pooling, truncate, loop, loop.create_future(), then)
        self.submit(job)
        try:
            return await job.future
        finally:
            self.cancel(job)

    def submit(self, job: EmbedJob) -> None:
        with self._cond:
            self._check_open()
            # queue_size waiting beyond the jobs one batch can hold rows of
            if len(self._queue) + len(self._active) >= self.queue_size + self.context.n_seq_max:
                raise QueueFullError(self.name, self.queue_size)
            self._queue.append(job)
            self._cond.notify_all()

    def cancel(self, job: EmbedJob) -> None:
        job.cancel.set()
        with self._cond:
            self._unqueue(job)

    def _idle_locked(self) -> bool:
        return not self.busy

    def close(self, timeout: float = 30.0) -> bool:
        """Fail queued jobs, finish the running ones, free the context (blocking).

        ``False`` when the thread did not stop: then nothing is freed.
        """
        for job in self._stop_taking():
            job.settle(error=unloading_error(self.name))

        def stop_running() -> None:
            for job in list(self._active):
                job.cancel.set()

        if not self._join(timeout, stop_running):
            logger.error("embedding scheduler of %s did not stop; not freed", self.name)
            return False
        return True

    # ----- the thread -----

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            logger.exception("the embedding scheduler of model %s died", self.name)
            self._die(f"{type(exc).__name__} in the embedding scheduler")
        finally:
            if self._helpers is not None:
                self._helpers.shutdown(wait=True)  # no decode runs past this point
            for context in self.contexts:
                context.close()
            with self._cond:
                self._report_idle()

    def _die(self, reason: str) -> None:
        with self._cond:
            error, dropped, waiters = self._mark_failed(reason)
            jobs = [*dropped, *self._active]
            self._active = []
        for job in jobs:
            job.settle(error=error)
        notify(waiters)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._queue and not self._active:
                    self._report_idle()
                    self._cond.wait()
                if self._closing and not self._active and not self._queue:
                    return
                new = list(self._queue)
                self._queue.clear()
            admitted = [job for job in new if self._admit(job)]
            with self._cond:
                self._active = [j for j in self._active if not j.cancel.is_set()] + admitted
            if self._active:
                self._step()

    def _admit(self, job: EmbedJob) -> bool:
        """Tokenize and check every input of ``job``; a bad one fails the job, undecoded."""
        if job.cancel.is_set():
            return False
        try:
            job.seqs, job.truncated = self.context.tokenize(job.inputs, job.truncate)
        except Exception as exc:
            if not isinstance(exc, APIError):
                logger.exception("embedding input check failed in model %s", self.name)
                exc = APIError("the inputs could not be tokenized")
            job.settle(error=exc)
            return False
        job.rows = np.empty((len(job.seqs), self.context.n_embd), dtype=np.float32)
        return True

    def _pack(self) -> list[tuple[EmbedJob, int]]:
        """This batch's rows: one of every job first, then in arrival order."""
        ctx = self.context
        picked: list[tuple[EmbedJob, int]] = []
        tokens = 0
        jobs = self._active
        taken = {id(job): job.next for job in jobs}

        def take(job: EmbedJob) -> bool:
            nonlocal tokens
            at = taken[id(job)]
            if at >= len(job.seqs) or len(picked) >= ctx.n_seq_max:
                return False
            size = len(job.seqs[at])
            if picked and tokens + size > self.batch_tokens:
                return False
            picked.append((job, at))
            taken[id(job)] = at + 1
            tokens += size
            return True

        for job in jobs:
            take(job)
        for job in jobs:
            while take(job):
                pass
        for job in jobs:
            job.next = taken[id(job)]
        return picked

    def _step(self) -> None:
        """Up to one batch per context, decoded side by side; then the rows go to their jobs."""
        batches: list[tuple[list[tuple[EmbedJob, int]], Pooling]] = []
        while len(batches) < len(self.contexts):
            picked = self._pack()
            if not picked:
                break
            if batches and sum(len(job.seqs[i]) for job, i in picked) > self.batch_tokens:
                # an input longer than a batch goes to the first context only: llama.cpp
                # keeps a context's output buffer (n_vocab floats per token) at its largest
                _put_back(picked)
                break
            batches.append(_one_pooling(picked))
        if not batches:
            return
        contexts = self.contexts[: len(batches)]
        threads = self.engine.threads if len(batches) == 1 else self.threads_each
        for context in contexts:
            context.set_threads(threads)
        helpers = self._helpers
        pending: list[Future[NDArray[np.float32] | APIError]] = []
        if helpers is not None:
            pending = [
                helpers.submit(_decode, context, picked, pooling)
                for context, (picked, pooling) in zip(contexts[1:], batches[1:], strict=True)
            ]
        outcomes = [_decode(contexts[0], *batches[0]), *(f.result() for f in pending)]
        failed: dict[int, EmbedJob] = {}
        for (picked, _), outcome in zip(batches, outcomes, strict=True):
            if isinstance(outcome, APIError):
                for job, _ in picked:
                    if id(job) not in failed:
                        failed[id(job)] = job
                        job.settle(error=outcome)
                continue
            self.decodes_total += 1
            self.rows_total += len(picked)
            self.tokens_total += sum(len(job.seqs[i]) for job, i in picked)
            for (job, i), vector in zip(picked, outcome, strict=True):
                assert job.rows is not None
                job.rows[i] = vector
                job.done += 1
        finished = [
            job for job in self._active if id(job) not in failed and job.done == len(job.seqs)
        ]
        if not finished and not failed:
            return
        with self._cond:
            self._active = [j for j in self._active if id(j) not in failed and j.done < len(j.seqs)]
        for job in finished:
            self._finish(job)

    def _finish(self, job: EmbedJob) -> None:
        assert job.rows is not None
        result = EmbeddingsResult(job.rows, sum(len(s) for s in job.seqs), job.truncated)
        if job.then is None:
            job.settle(result)
            return
        try:
            job.settle(job.then(result))
        except Exception as exc:
            if not isinstance(exc, APIError):
                logger.exception("an embedding job's last step failed in model %s", self.name)
                exc = APIError("the request failed after embedding; see the server log")
            job.settle(error=exc)


def embedding_outputs(threads: int, max_input_tokens: int) -> int:
    """The output rows the embedding contexts reach together: the first decodes inputs up to
    ``max_input_tokens`` long, the others only batches of :data:`BATCH_TOKENS`."""
    count, _ = workers(threads)
    return max(max_input_tokens, BATCH_TOKENS) + (count - 1) * BATCH_TOKENS


def workers(threads: int) -> tuple[int, int]:
    """How many contexts decode side by side, and the threads of each, for ``threads``."""
    count = max(1, min(threads, MAX_WORKERS))
    return count, max(1, threads // count)


def _one_pooling(picked: list[tuple[EmbedJob, int]]) -> tuple[list[tuple[EmbedJob, int]], Pooling]:
    """One pooling per batch: rows of jobs with another pooling go back for a later batch."""
    pooling = picked[0][0].pooling
    _put_back([(job, i) for job, i in picked if job.pooling != pooling])
    return [(job, i) for job, i in picked if job.pooling == pooling], pooling


def _put_back(rows: list[tuple[EmbedJob, int]]) -> None:
    """Rows packed but not decoded in this step: their jobs take them again in a later batch."""
    for job, i in rows:
        job.next = min(job.next, i)


def _decode(
    context: EmbeddingContext, picked: list[tuple[EmbedJob, int]], pooling: Pooling
) -> NDArray[np.float32] | APIError:
    """The batch's vectors, or the error that fails its jobs (any other exception is a bug
    and ends the scheduler)."""
    try:
        return context.decode([job.seqs[i] for job, i in picked], pooling)
    except APIError as exc:
        return exc
