"""Continuous batching: one worker thread decodes several sequences of a model together.

:class:`BatchWorker` has the interface of :class:`llmis.worker.ModelWorker` and consumes the
same :class:`~llmis.worker.Job` s, emitting the same events, so no transport needs to know.
It owns a second llama context on the engine's model with ``n_seq_max = slots``; every
sequence (slot) has its own KV stream of ``engine.n_ctx`` cells. Each decode step puts the
next token of every generating sequence and chunks of newly admitted prompts into one
``llama_batch`` (at most ``n_batch`` tokens), then samples every sequence whose logits it
produced with that sequence's own sampler chain.

* Jobs join and leave between steps; a cancelled job's slot is emptied
  (``llama_memory_seq_rm``) before the next step.
* A finished sequence keeps its tokens in its slot: a new prompt goes to the free slot that
  shares the longest prefix with it, and only the rest of the prompt is evaluated.
* Blocking calls (:meth:`BatchWorker.call`) run between steps on the engine's own context,
  which the batch never touches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import llama_cpp
from llama_cpp import _internals

from llmis.engine import Engine, TextStream, build_sampler
from llmis.errors import APIError
from llmis.worker import (
    CallJob,
    Delta,
    Failed,
    Finished,
    Job,
    JobEvent,
    ModelWorker,
    SlotStats,
    Started,
)

__all__ = ["BatchWorker"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # tokens whose KV the sequence holds
    job: Job | None = None
    sampler: _internals.LlamaSampler | None = None
    out: TextStream | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to evaluate
    next_token: int | None = None  # sampled, to be decoded in the next step
    logits_at: int = -1  # batch index of this sequence's logits after a decode
    cached: int = 0  # prompt tokens reused from the slot's previous sequence
    last_used: int = 0
    kv_tokens: int = 0  # snapshot for other threads


def _deliver(outbox: list[tuple[Job, JobEvent]]) -> None:
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


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class BatchWorker(ModelWorker):
    """Runs up to ``slots`` generation jobs of one model at once on a dedicated thread.

    Queueing, cancelling, :meth:`call`, :meth:`drain` and :meth:`close` are inherited.
    """

    def __init__(self, name: str, engine: Engine, queue_size: int, slots: int) -> None:
        self.slots = slots
        self._slots = [_Slot(i) for i in range(slots)]
        self._calls_running = 0
        self._uses = 0
        llm = engine.llm
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_seq_max = slots
        params.n_ctx = engine.n_ctx * slots
        params.kv_unified = False  # one KV stream per sequence, each of engine.n_ctx cells
        params.embeddings = False
        self._ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self._mem = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._n_batch = int(params.n_batch)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._vocab = llm._model.vocab
        # the shared queue state, then the thread (which runs this class's _run)
        super().__init__(name, engine, queue_size)

    # ----- event-loop side -----

    @property
    def running(self) -> int:
        return sum(s.job is not None for s in self._slots) + self._calls_running

    @property
    def busy(self) -> bool:
        return self.running > 0 or bool(self._queue)

    def slot_stats(self) -> list[SlotStats]:
        """Per slot: the running job's id and the KV cells held (a finished sequence's
        tokens stay cached for prefix reuse until the slot is reused)."""
        return [
            SlotStats(s.seq_id, None if s.job is None else s.job.id, s.kv_tokens)
            for s in self._slots
        ]

    def _idle_slots(self) -> int:
        return sum(s.job is None for s in self._slots)

    # ----- worker-thread side -----

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._queue and not self._active():
                    self._cond.wait()
                if self._closing and not self._active():
                    break
                calls, admitted = self._admit()
                self._calls_running = len(calls)
            for call in calls:
                self._execute(call)  # the parent's CallJob branch
            with self._cond:
                self._calls_running = 0
            for slot in admitted:
                self._start(slot)
            for slot in self._slots:
                if slot.job is not None and slot.job.cancel.is_set():
                    logger.debug("job %s cancelled in slot %d", slot.job.id, slot.seq_id)
                    self._release(slot, forget=True)
            if self._active():
                try:
                    self._step()
                except Exception:
                    logger.exception("batched decode failed in model %s", self.name)
                    for slot in self._slots:
                        if slot.job is not None:
                            slot.job.emit(Failed(APIError("generation failed; see the server log")))
                            self._release(slot, forget=True)
            with self._cond:
                for slot in self._slots:
                    slot.kv_tokens = self._kv_tokens(slot)
                self._cond.notify_all()
        # free the batch context here, before close() frees the model under it
        for slot in self._slots:
            self._release(slot)
        llama_cpp.llama_batch_free(self._batch)
        self._ctx.close()

    def _active(self) -> bool:
        return any(s.job is not None for s in self._slots)

    def _admit(self) -> tuple[list[CallJob], list[_Slot]]:
        """Under the lock: take calls and jobs off the front of the queue while slots are free."""
        calls: list[CallJob] = []
        admitted: list[_Slot] = []
        while self._queue:
            job = self._queue[0]
            if isinstance(job, CallJob):
                calls.append(job)
                self._queue.popleft()
                continue
            free = [s for s in self._slots if s.job is None]
            if not free:
                break
            self._queue.popleft()
            # longest shared prefix first, then the least recently used slot
            slot = max(free, key=lambda s: (_common_prefix(s.tokens, job.prompt), -s.last_used))
            slot.job = job
            admitted.append(slot)
        return calls, admitted

    def _start(self, slot: _Slot) -> None:
        job = slot.job
        assert job is not None
        if job.cancel.is_set():
            slot.job = None
            return
        prompt = list(job.prompt)
        # as Engine.generate: a seeded job evaluates its whole prompt, so its logits never
        # depend on how an earlier request split the prompt into batches
        shared = _common_prefix(slot.tokens, prompt) if job.params.seed is None else 0
        keep = min(shared, len(prompt) - 1)
        if keep < len(slot.tokens) and not llama_cpp.llama_memory_seq_rm(
            self._mem, slot.seq_id, keep, -1
        ):
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            keep = 0
        slot.tokens = prompt[:keep]
        slot.pending = prompt[keep:]
        slot.cached = keep
        slot.next_token = None
        slot.sampler = build_sampler(job.params, self._vocab)
        slot.out = TextStream(self._vocab, job.params)
        self._uses += 1
        slot.last_used = self._uses
        self.prompt_tokens_total += len(prompt)
        self.cached_tokens_total += keep
        job.emit(Started(time.monotonic() - job.enqueued_at))

    def _release(self, slot: _Slot, forget: bool = False) -> None:
        """End the slot's job; ``forget`` also drops its KV cells (a cancelled or failed job)."""
        if forget:
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            slot.tokens = []
        if slot.sampler is not None:
            slot.sampler.close()
        slot.sampler = slot.out = None
        slot.pending = []
        slot.next_token = None
        slot.logits_at = -1
        with self._cond:
            slot.job = None

    def _kv_tokens(self, slot: _Slot) -> int:
        return int(llama_cpp.llama_memory_seq_pos_max(self._mem, slot.seq_id)) + 1

    def _step(self) -> None:
        """One ``llama_decode`` over every active sequence, then one sample for each."""
        batch = self._batch
        n = 0

        def add(slot: _Slot, token: int, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = len(slot.tokens)
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot.seq_id
            batch.logits[n] = logits
            slot.tokens.append(token)
            if logits:
                slot.logits_at = n
            n += 1

        active = [s for s in self._slots if s.job is not None]
        for slot in active:
            if slot.next_token is not None:
                add(slot, slot.next_token, True)
                slot.next_token = None
        for slot in sorted(active, key=lambda s: s.last_used):
            room = self._n_batch - n
            if not slot.pending or room <= 0:
                continue
            chunk, slot.pending = slot.pending[:room], slot.pending[room:]
            for i, token in enumerate(chunk):
                add(slot, token, not slot.pending and i == len(chunk) - 1)
        if n == 0:
            return
        batch.n_tokens = n
        status = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        outbox: list[tuple[Job, JobEvent]] = []
        for slot in active:
            if slot.logits_at < 0:
                continue
            job, sampler, out = slot.job, slot.sampler, slot.out
            assert job is not None and sampler is not None and out is not None
            token = llama_cpp.llama_sampler_sample(sampler.sampler, self._ctx.ctx, slot.logits_at)
            slot.logits_at = -1
            step = out.push(token)
            if step is not None and step.text:
                outbox.append((job, Delta(step.text)))
            if step is not None and step.finish_reason is not None:
                n_prompt, n_out = len(job.prompt), step.completion_tokens
                outbox.append((job, Finished(step.finish_reason, n_prompt, n_out, slot.cached)))
                self._release(slot)
            else:
                slot.next_token = token
        _deliver(outbox)
