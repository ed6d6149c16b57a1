"""The one generation scheduler of a loaded model: continuous batching on one llama context.

Every generating model runs here; one sequence is a batch of one. The scheduler owns the
model's only llama context (``n_seq_max = slots``, one KV stream of ``n_ctx`` cells per slot)
and a thread that loops over decode steps. Each step decodes the next token of every
generating sequence in one ``llama_batch``, then one prompt chunk of each sequence still
evaluating its prompt, each chunk in a decode of its own (chunked prefill: a long prompt is
spread over steps, so the other streams keep getting tokens; at most ``n_batch`` tokens a
step). llama.cpp cuts a batch that mixes sequences into micro-batches with the same number of
tokens per sequence, so a chunk beside decode rows would be evaluated in two pieces anyway;
alone it is evaluated the same way every time. After each decode its sequences sample, each
with its own :class:`~llmis.engine.sampling.Sampler`; one step's events go to each event loop with a
single wake-up, handed over before any later decode of the step (a prompt chunk) would hold
them back. A request whose prompt equals the one a slot just evaluated samples its first
token from that prompt's saved logits, with no decode at all, and that token goes out at once.

Prompt chunks are aligned to fixed positions (multiples of :attr:`Scheduler.chunk`), and a
sequence never has two chunks in one step. llama.cpp's kernels give bit-identical results
for a chunk whatever else shares the batch, but not for other splits of the same tokens
(``scripts/bench_batching.py --check-invariance`` shows which). So a prompt's KV is the same
however it arrived, and the prompt cache can serve seeded requests too:

* an unseeded request reuses the longest cached prefix of its slot;
* a seeded request reuses it only up to a chunk boundary that was itself evaluated in whole
  aligned chunks (never generated tokens, which are decoded one by one), so its output is the
  same as on a fresh context.

A new prompt goes to the free slot it would reuse the most cached tokens from, by those rules
(least recently used on a tie). A cancelled job's slot is emptied before the next step. A
failure inside one sequence (its sampler, its grammar) fails that request only; a failed
decode fails the sequences in that batch; if the thread itself dies, every waiting and running
request gets an error and the scheduler reports itself failed (``on_failure``). Blocking calls
(:meth:`call`, e.g. an embedding batch) run between steps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import llama_cpp
import numpy as np

from llmis.engine.embedding_scheduler import EmbeddingScheduler
from llmis.engine.jobs import (
    CallJob,
    Delta,
    Failed,
    Finished,
    Job,
    JobEvent,
    SlotStats,
    Started,
    deliver,
    notify,
)
from llmis.engine.llama import Engine, GenerationContext
from llmis.engine.logprobs import token_logprob
from llmis.engine.model_thread import ModelThread, unloading_error
from llmis.engine.sampling import Sampler, TextStream
from llmis.engine.slots import Slot
from llmis.errors import APIError, QueueFullError

__all__ = ["Scheduler"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# llama.cpp pads the cells a decode attends to up to a multiple of 256, and its CPU flash
# attention splits them among threads for a lone token from 512 on (ggml-cpu ops.cpp): a
# sequence with more than this many cells in use takes that path when it decodes alone
ONE_PASS_CELLS = 256


class Scheduler(ModelThread[Job | CallJob]):
    """Runs up to ``slots`` generation jobs of one model at once on a dedicated thread."""

    def __init__(self, name: str, engine: Engine, queue_size: int, slots: int) -> None:
        super().__init__(name, queue_size, f"llmis-{name}")
        self.engine = engine
        self.slots = slots if engine.generates else 0
        # for /metrics: prompt tokens of generation jobs, and how many came from the KV cache
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self._calls_running = 0
        self._uses = 0
        self._slots = [Slot(i) for i in range(self.slots)]
        self._gen: GenerationContext | None = None
        self._batch: Any = None  # a llama_batch of n_batch tokens
        self.kv_bytes = 0
        self.flash_attn = False
        self.chunk = 1
        if self.slots:
            self._gen = engine.create_context(self.slots)
            self.kv_bytes = self._gen.kv_bytes
            self.flash_attn = self._gen.flash_attn
            # one aligned chunk per sequence per step, beside one decode row per slot
            self.chunk = max(1, min(256, self._gen.n_batch - self.slots))
            self._batch = llama_cpp.llama_batch_init(self._gen.n_batch, 0, 1)
        # an embedding model's inputs are batched by a thread of their own
        self.embedder: EmbeddingScheduler | None = None
        if engine.embedding:
            try:
                self.embedder = EmbeddingScheduler(name, engine, queue_size)
            except BaseException:
                self._release_context()
                raise
        self._thread.start()

    # ----- event-loop side -----

    @property
    def queued(self) -> int:
        return len(self._queue) + (self.embedder.queued if self.embedder else 0)

    @property
    def running(self) -> int:
        embedding = self.embedder.running if self.embedder else 0
        return sum(s.job is not None for s in self._slots) + self._calls_running + embedding

    @property
    def busy(self) -> bool:
        return self.running > 0 or self.queued > 0

    def slot_stats(self) -> list[SlotStats]:
        """Per slot: the running job's id and the KV cells held (a finished sequence's
        tokens stay cached for prefix reuse until the slot is reused)."""
        return [
            SlotStats(s.seq_id, None if s.job is None else s.job.id, len(s.tokens))
            for s in self._slots
        ]

    def on_failure(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        """Call ``callback`` on ``loop`` if the scheduler thread (or the embedding one) dies."""
        if self.embedder is not None:
            self.embedder.on_failure(loop, callback)
        super().on_failure(loop, callback)

    def _idle_locked(self) -> bool:
        return not self._queue and not self._active() and not self._calls_running

    async def drain(self) -> None:
        """Wait (on events, not a timer) until no job is queued or running, here or in the
        embedding scheduler."""
        while self.busy and self._thread.is_alive():
            if self.embedder is not None and self.embedder.busy:
                await self.embedder.drain()
            else:
                await self._wait_idle_once()

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run ``fn(engine)`` on the scheduler thread between steps; await its result.

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
        if not self.slots:
            return 1 if self._calls_running == 0 else 0
        return sum(s.job is None for s in self._slots)

    def submit(self, jobs: Sequence[Job | CallJob]) -> None:
        """Queue ``jobs`` all together, or none of them when the queue cannot take them all."""
        with self._cond:
            self._check_open()
            if len(jobs) > self.queue_size - len(self._queue) + self._idle_slots():
                raise QueueFullError(self.name, self.queue_size)
            self._queue.extend(jobs)
            self._cond.notify_all()

    def cancel(self, job: Job | CallJob) -> None:
        """Cancel ``job``: drop it if still queued, stop it before the next step if running."""
        job.cancel.set()
        with self._cond:
            self._unqueue(job)
            self._cond.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, fail the queued ones, finish the running ones, free the model.

        Blocking: call it in a thread. A model a thread still uses is never freed.
        """
        for job in self._stop_taking():
            _fail(job, unloading_error(self.name))

        def stop_running() -> None:  # the running jobs outlived the grace
            for slot in self._slots:
                if slot.job is not None:
                    slot.job.cancel.set()

        if not self._join(timeout, stop_running):
            # Never free a model a thread still uses: leaking it beats a segfault.
            logger.error("scheduler of %s did not stop; its model is not freed", self.name)
            return
        if self.embedder is not None and not self.embedder.close(timeout):
            return  # never free a model its embedding thread still uses
        self.engine.close()

    # ----- scheduler-thread side -----

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            logger.exception("the scheduler of model %s died", self.name)
            self._die(f"{type(exc).__name__} in the scheduler")
        finally:
            for slot in self._slots:
                self._release(slot)
            self._release_context()
            with self._cond:
                self._report_idle()

    def _release_context(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._gen is not None:
            self._gen.close()

    def _die(self, reason: str) -> None:
        """Fail every waiting and running job and tell the model manager."""
        with self._cond:
            error, dropped, waiters = self._mark_failed(reason)
        for job in dropped:
            _fail(job, error)
        for slot in self._slots:
            if slot.job is not None:
                _fail(slot.job, error)
                slot.job = None
        notify(waiters)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._queue and not self._active():
                    self._report_idle()
                    self._cond.wait()
                if self._closing and not self._active():
                    return
                calls, admitted = self._admit()
                self._calls_running = len(calls)
            for call in calls:
                self._execute_call(call)
            with self._cond:
                self._calls_running = 0
            outbox: list[tuple[Job, JobEvent]] = []
            for slot, keep in admitted:
                self._start(slot, keep, outbox)
            for slot in self._slots:
                if slot.job is not None and slot.job.cancel.is_set():
                    logger.debug("job %s cancelled in slot %d", slot.job.id, slot.seq_id)
                    self._release(slot, forget=True)
            if self._active():
                self._step(outbox)
            deliver(outbox)

    def _active(self) -> bool:
        return any(s.job is not None for s in self._slots)

    def _admit(self) -> tuple[list[CallJob], list[tuple[Slot, int]]]:
        """Under the lock: take calls and jobs off the front of the queue while slots are free.
        Each admitted job's slot comes with how many prompt tokens it reuses from there."""
        calls: list[CallJob] = []
        admitted: list[tuple[Slot, int]] = []
        while self._queue:
            job = self._queue[0]
            if isinstance(job, CallJob):
                calls.append(job)
                self._queue.popleft()
                continue
            if not self.slots:
                self._queue.popleft()
                job.emit(Failed(APIError("this model does not generate text", status=400)))
                continue
            free = [s for s in self._slots if s.job is None]
            if not free:
                break
            self._queue.popleft()
            # the slot that gives this job the most cached tokens (a seeded job counts only
            # canonically evaluated ones), least recently used on a tie
            prompt, seeded = job.prompt, job.params.seed is not None
            keep, _, slot = max(
                ((s.reusable(prompt, seeded, self.chunk), -s.last_used, s) for s in free),
                key=lambda choice: choice[:2],
            )
            slot.job = job
            admitted.append((slot, keep))
        return calls, admitted

    def _execute_call(self, job: CallJob) -> None:
        if job.cancel.is_set():
            return
        try:
            job.settle(job.fn(self.engine))
        except Exception as exc:
            if not isinstance(exc, APIError):
                logger.exception("call failed in model %s", self.name)
            job.settle(error=exc)

    def _start(self, slot: Slot, keep: int, outbox: list[tuple[Job, JobEvent]]) -> None:
        """Start the slot's job, reusing ``keep`` cached prompt tokens (:meth:`Slot.reusable`)."""
        job = slot.job
        assert job is not None and self._gen is not None
        if job.cancel.is_set():
            slot.job = None
            return
        try:
            prompt = list(job.prompt)
            mem = llama_cpp.llama_get_memory(self._gen.ctx)
            if keep < len(slot.tokens) and not llama_cpp.llama_memory_seq_rm(
                mem, slot.seq_id, keep, -1
            ):
                llama_cpp.llama_memory_seq_rm(mem, slot.seq_id, -1, -1)
                keep = 0
            slot.evaluating_canonically = keep % self.chunk == 0 and keep <= slot.canonical
            slot.tokens = prompt[:keep]
            slot.canonical = min(slot.canonical, keep)
            slot.pending = prompt[keep:]
            slot.from_logits = keep == len(prompt)
            if keep < slot.prompt_len:  # the KV behind the saved logits is going away
                slot.prompt_logits = None
                slot.prompt_len = 0
            slot.cached = keep
            slot.next_token = None
            slot.sampler = Sampler(job.params, self.engine.vocab)
            slot.out = TextStream(self.engine.vocab, job.params)
        except Exception as exc:
            self._fail_slot(slot, job, exc, "could not start", outbox)
            return
        self._uses += 1
        slot.last_used = self._uses
        self.prompt_tokens_total += len(prompt)
        self.cached_tokens_total += keep
        outbox.append((job, Started(time.monotonic() - job.enqueued_at)))

    def _fail_slot(
        self,
        slot: Slot,
        job: Job,
        exc: Exception,
        what: str,
        outbox: list[tuple[Job, JobEvent]],
    ) -> None:
        """One sequence failed: its request gets a clean error, the others go on."""
        if not isinstance(exc, APIError):
            logger.exception("%s job %s in model %s", what, job.id, self.name)
        outbox.append((job, Failed(_as_api_error(exc))))
        self._release(slot, forget=True)

    def _release(self, slot: Slot, forget: bool = False) -> None:
        """End the slot's job; ``forget`` also drops its KV cells (a cancelled or failed job)."""
        if forget and self._gen is not None:
            mem = llama_cpp.llama_get_memory(self._gen.ctx)
            llama_cpp.llama_memory_seq_rm(mem, slot.seq_id, -1, -1)
            slot.tokens = []
            slot.canonical = 0
            slot.prompt_logits = None
            slot.prompt_len = 0
        if slot.sampler is not None:
            slot.sampler.close()
        slot.sampler = slot.out = None
        slot.pending = []
        slot.next_token = None
        slot.logits_at = -1
        slot.from_logits = False
        slot.logprobs = []
        with self._cond:
            slot.job = None

    def _save_prompt_logits(self, slot: Slot, ctx: llama_cpp.llama_context_p) -> None:
        """Keep the logits after the prompt, for the next request with the same prompt."""
        n_vocab = self.engine.n_vocab
        if slot.prompt_logits is None or slot.prompt_logits.shape != (n_vocab,):
            slot.prompt_logits = np.empty(n_vocab, dtype=np.float32)
        row = llama_cpp.llama_get_logits_ith(ctx, slot.logits_at)
        slot.prompt_logits[:] = np.ctypeslib.as_array(row, shape=(n_vocab,))
        slot.prompt_len = len(slot.tokens)
        slot.prompt_canonical = slot.evaluating_canonically

    def _step(self, outbox: list[tuple[Job, JobEvent]]) -> None:
        """One decode of every generating sequence's next token, then one prompt chunk of
        each sequence still evaluating its prompt (each chunk a decode of its own, so it is
        evaluated the same whatever else is in flight); each sequence with logits samples."""
        gen = self._gen
        assert gen is not None
        active = [s for s in self._slots if s.job is not None]
        for slot in active:
            if slot.from_logits:  # the same prompt as before: its saved logits, no decode
                self._sample(slot, outbox)
        _flush(outbox)  # a first token sampled without a decode goes out before the decode
        rows = [s for s in active if s.next_token is not None]
        alone = [s for s in rows if self._decodes_alone(s)]
        together = [s for s in rows if s not in alone]
        for group in ([together] if together else []) + [[s] for s in alone]:
            self._clear()
            for slot in group:
                assert slot.next_token is not None
                self._add(slot, slot.next_token, True)
                slot.next_token = None
            if self._decode(group, outbox):
                for slot in group:
                    self._sample(slot, outbox)
        room = gen.n_batch - len(rows)
        if any(slot.pending and slot.job is not None for slot in active):
            _flush(outbox)  # the running streams' tokens do not wait for a prompt chunk
        chunk = self.chunk
        for slot in sorted(active, key=lambda s: s.last_used):
            if not slot.pending or slot.job is None:
                continue
            start = len(slot.tokens)
            size = min(len(slot.pending), chunk - start % chunk)  # up to the next boundary
            if size > room:
                continue  # never split a chunk: it waits for the next step
            room -= size
            piece, slot.pending = slot.pending[:size], slot.pending[size:]
            self._clear()
            for i, token in enumerate(piece):
                self._add(slot, token, not slot.pending and i == size - 1)
            if start == slot.canonical and start % chunk == 0 and size == chunk:
                slot.canonical = start + size  # a whole aligned chunk on a canonical prefix
            if self._decode([slot], outbox) and not slot.pending:
                self._sample(slot, outbox)

    def _decodes_alone(self, slot: Slot) -> bool:
        """Whether the slot's next token is decoded in a ``llama_decode`` of its own.

        With flash attention on, llama.cpp's CPU kernel takes another path for a batch of one
        token of one sequence once it has more than ``ONE_PASS_CELLS`` cells in use: it splits
        the cells among the threads and merges the parts, which rounds differently from the
        one-pass path a row takes beside other sequences. A seeded sequence that long is
        therefore always decoded alone, as a fresh context decodes it, so its output does not
        depend on what else is in flight; shorter ones, and unseeded ones, share the batch.
        """
        return (
            self.flash_attn
            and slot.job is not None
            and slot.job.params.seed is not None
            and len(slot.tokens) + 1 > ONE_PASS_CELLS  # with the token it decodes
        )

    def _clear(self) -> None:
        self._batch.n_tokens = 0

    def _add(self, slot: Slot, token: int, logits: bool) -> None:
        batch = self._batch
        n = batch.n_tokens
        batch.token[n] = token
        batch.pos[n] = len(slot.tokens)
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = slot.seq_id
        batch.logits[n] = logits
        slot.tokens.append(token)
        if logits:
            slot.logits_at = n
        batch.n_tokens = n + 1

    def _decode(self, slots: list[Slot], outbox: list[tuple[Job, JobEvent]]) -> bool:
        """Decode the batch; on failure fail the sequences in it (the others go on)."""
        assert self._gen is not None
        status = llama_cpp.llama_decode(self._gen.ctx, self._batch)
        if status == 0:
            return True
        logger.error("llama_decode returned %d in model %s", status, self.name)
        error = APIError("the model failed to evaluate this batch; retry the request")
        for slot in slots:
            if slot.job is not None:
                outbox.append((slot.job, Failed(error)))
                self._release(slot, forget=True)
        return False

    def _sample(self, slot: Slot, outbox: list[tuple[Job, JobEvent]]) -> None:
        """Sample the slot's next token from the last decode (or its saved prompt logits)."""
        job, sampler, out, gen = slot.job, slot.sampler, slot.out, self._gen
        assert job is not None and sampler is not None and out is not None and gen is not None
        try:
            if slot.from_logits:
                assert slot.prompt_logits is not None
                slot.from_logits = False
                row = slot.prompt_logits
                token = sampler.sample_logits(row)
            else:
                if len(slot.tokens) == len(job.prompt):  # the prompt's last token
                    self._save_prompt_logits(slot, gen.ctx)
                token = sampler.sample(gen.ctx, slot.logits_at)
                row = None
            if job.logprobs is not None and not llama_cpp.llama_vocab_is_eog(
                self.engine.vocab, token
            ):
                if row is None:
                    n_vocab = self.engine.n_vocab
                    logits = llama_cpp.llama_get_logits_ith(gen.ctx, slot.logits_at)
                    row = np.ctypeslib.as_array(logits, shape=(n_vocab,))
                slot.logprobs.append(token_logprob(row, self.engine.vocab, token, job.logprobs))
        except Exception as exc:
            self._fail_slot(slot, job, exc, "sampling failed for", outbox)
            return
        slot.logits_at = -1
        step = out.push(token)
        finishing = step is not None and step.finish_reason is not None
        if step is not None and (step.text or (finishing and slot.logprobs)):
            delta = Delta(step.text, tuple(slot.logprobs), step.completion_tokens)
            outbox.append((job, delta))
            slot.logprobs = []
        if step is not None and step.finish_reason is not None:
            n_prompt, n_out = len(job.prompt), step.completion_tokens
            finished = Finished(
                step.finish_reason, n_prompt, n_out, slot.cached, step.stop_sequence
            )
            outbox.append((job, finished))
            self._release(slot)
        else:
            slot.next_token = token


def _flush(outbox: list[tuple[Job, JobEvent]]) -> None:
    """Hand the events gathered so far to their loops before a decode makes them wait."""
    if any(not isinstance(event, Started) for _, event in outbox):
        deliver(outbox)
        outbox.clear()


def _as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    return APIError("generation failed; see the server log")


def _fail(job: Job | CallJob, error: APIError) -> None:
    job.cancel.set()
    if isinstance(job, CallJob):
        job.settle(error=error)
    else:
        job.emit(Failed(error))
