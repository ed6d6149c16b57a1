"""Turning validated OpenAI requests into worker jobs, and jobs back into results.

Shared by every transport (HTTP + SSE, WebSocket): prompt rendering and tokenization run in
a thread (they are llama.cpp calls), the context arithmetic is checked before anything is
queued, and a batch of prompts is queued all at once or not at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from llmis.engine.jobs import Delta, Failed, Finished, Job, JobEvent
from llmis.engine.logprobs import TokenLogprob
from llmis.engine.sampling import FinishReason
from llmis.engine.scheduler import Scheduler
from llmis.errors import APIError, BadRequestError
from llmis.models.manager import ModelManager
from llmis.serving.formats import request_grammar, sampling_params
from llmis.serving.policy import RequestPolicy
from llmis.serving.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from llmis.serving.toolcalls import OutputParser
from llmis.serving.tools import ToolPlan, plan_tools

__all__ = ["Generation", "Result", "count_chat_tokens", "start_chat", "start_completion"]

T = TypeVar("T")


@dataclass(frozen=True)
class Generation:
    """Jobs queued on one worker for one request; ``cancel()`` is safe to call any time.

    Read a job's events through :meth:`events` (or :meth:`collect`): the guard applies
    the timeouts, the output content filter and the metrics there.
    """

    model: str
    worker: Scheduler
    jobs: Sequence[Job]
    guard: RequestPolicy
    tools: ToolPlan | None = None  # how to read tool calls out of the text (chat)

    def parser(self) -> OutputParser:
        """A parser of this generation's text into content and tool calls."""
        return OutputParser(self.tools)

    def cancel(self) -> None:
        for job in self.jobs:
            if not job.done:
                self.worker.cancel(job)
                self.guard.cancelled(job)

    def events(self, job: Job, keepalive: float | None = None) -> AsyncIterator[JobEvent | None]:
        """``job``'s events; ``None`` after ``keepalive`` s of silence (send a ping)."""
        return self.guard.events(job, self.worker.cancel, keepalive)

    async def collect(self, job: Job) -> Result:
        """Wait for ``job`` to finish and return its whole text."""
        return await _collect(self.events(job))


@dataclass(frozen=True)
class Result:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    stop_sequence: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


async def _blocking(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread; if the caller is cancelled (the client went away), wait for
    the thread before letting the cancellation through, so the caller's model lease is held
    for as long as a thread reads the model."""
    future = asyncio.get_running_loop().run_in_executor(None, fn)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


async def start_chat(
    manager: ModelManager, request: ChatCompletionRequest, guard: RequestPolicy
) -> Generation:
    """Queue ``request`` on its model under the caller's ``guard`` (caps, timeouts, metrics)."""
    messages = [m.as_template_message() for m in request.messages]
    guard.check_prompt_text((m["content"] for m in messages), "messages")
    # The lease keeps the model from being evicted or unloaded until the job is queued.
    async with manager.lease(request.model) as worker:
        guard.admitted()
        engine = worker.engine
        engine.check_generates(request.model)
        loop = asyncio.get_running_loop()
        grammar = request_grammar(request)

        def prepare() -> tuple[list[int], ToolPlan | None]:  # one trip to a thread
            plan = plan_tools(request, engine.chat_template)
            if plan is not None:
                engine.check_grammar(plan.grammar, "tools")
                return engine.chat_prompt(plan.prepare(messages), plan.template_tools()), plan
            engine.check_grammar(grammar)
            return engine.chat_prompt(messages), None

        prompt, plan = await _blocking(prepare)
        limit = guard.max_tokens(len(prompt), request.token_limit, "messages")
        max_tokens = guard.clamp(engine.check_context(len(prompt), limit, "messages"), limit)
        params = sampling_params(request, max_tokens)
        if engine.chat_stops:
            params = replace(params, stop=params.stop + engine.chat_stops)
        if plan is not None and plan.grammar is not None:
            params = replace(params, grammar=plan.grammar)
        job = Job(prompt, params, loop, logprobs=request.n_logprobs)
        worker.submit([job])
    # worker.name is the model actually serving: an alias reports its current version.
    return Generation(worker.name, worker, [job], guard, plan)


async def count_chat_tokens(manager: ModelManager, model: str, messages: list[ChatMessage]) -> int:
    """The tokens ``messages`` take once rendered with ``model``'s chat template."""
    rendered = [m.as_template_message() for m in messages]
    async with manager.lease(model) as worker:
        engine = worker.engine
        engine.check_generates(model)
        return len(await _blocking(lambda: engine.chat_prompt(rendered)))


async def start_completion(
    manager: ModelManager, request: CompletionRequest, guard: RequestPolicy
) -> Generation:
    """Queue ``request``'s prompts on its model under the caller's ``guard``."""
    guard.check_prompt_text((p for p in request.prompts() if isinstance(p, str)), "prompt")
    async with manager.lease(request.model) as worker:
        guard.admitted()
        return await _submit_completion(worker, request, guard)


async def _submit_completion(
    worker: Scheduler, request: CompletionRequest, guard: RequestPolicy
) -> Generation:
    engine = worker.engine
    engine.check_generates(request.model)
    loop = asyncio.get_running_loop()
    n_vocab = engine.n_vocab
    grammar = request_grammar(request)

    def tokenize_all() -> list[list[int]]:
        engine.check_grammar(grammar)
        out = []
        for prompt in request.prompts():
            if isinstance(prompt, str):
                out.append(engine.text_prompt(prompt))
            else:
                if any(not 0 <= t < n_vocab for t in prompt):
                    raise BadRequestError(
                        f"prompt token ids must be in [0, {n_vocab})", param="prompt"
                    )
                out.append(list(prompt))
        return out

    prompts = await _blocking(tokenize_all)
    jobs = []
    for p in prompts:
        limit = guard.max_tokens(len(p), request.max_tokens, "prompt")
        max_tokens = guard.clamp(engine.check_context(len(p), limit, "prompt"), limit)
        jobs.append(Job(p, sampling_params(request, max_tokens), loop, logprobs=request.logprobs))
    worker.submit(jobs)
    return Generation(worker.name, worker, jobs, guard)


async def _collect(events: AsyncIterator[JobEvent | None]) -> Result:
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    async for event in events:
        if isinstance(event, Delta):
            parts.append(event.text)
            logprobs.extend(event.logprobs)
        elif isinstance(event, Finished):
            return Result(
                "".join(parts),
                event.finish_reason,
                event.prompt_tokens,
                event.completion_tokens,
                event.cached_tokens,
                event.stop_sequence,
                tuple(logprobs),
            )
        elif isinstance(event, Failed):
            raise event.error
    raise APIError("generation ended without a result")
