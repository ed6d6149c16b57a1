"""Turning validated OpenAI requests into worker jobs, and jobs back into results.

Shared by every transport (HTTP + SSE, WebSocket): prompt rendering and tokenization run in
a thread (they are llama.cpp calls), the context arithmetic is checked before anything is
queued, and a batch of prompts is queued all at once or not at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from llmis.engine import FinishReason
from llmis.errors import APIError, BadRequestError
from llmis.models import ModelManager
from llmis.protocol import ChatCompletionRequest, CompletionRequest
from llmis.worker import Delta, Failed, Finished, Job, ModelWorker

__all__ = ["Generation", "Result", "collect", "start_chat", "start_completion"]


@dataclass(frozen=True)
class Generation:
    """Jobs queued on one worker for one request; ``cancel()`` is safe to call any time."""

    model: str
    worker: ModelWorker
    jobs: Sequence[Job]

    def cancel(self) -> None:
        for job in self.jobs:
            if not job.done:
                self.worker.cancel(job)


@dataclass(frozen=True)
class Result:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


async def start_chat(manager: ModelManager, request: ChatCompletionRequest) -> Generation:
    worker = await manager.acquire(request.model)
    engine = worker.engine
    messages = [m.as_template_message() for m in request.messages]
    loop = asyncio.get_running_loop()
    prompt = await loop.run_in_executor(None, engine.chat_prompt, messages)
    max_tokens = engine.check_context(len(prompt), request.token_limit, "messages")
    job = Job(prompt, request.sampling(max_tokens), loop)
    worker.submit([job])
    return Generation(request.model, worker, [job])


async def start_completion(manager: ModelManager, request: CompletionRequest) -> Generation:
    worker = await manager.acquire(request.model)
    engine = worker.engine
    loop = asyncio.get_running_loop()
    n_vocab = engine.llm.n_vocab()

    def tokenize_all() -> list[list[int]]:
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

    prompts = await loop.run_in_executor(None, tokenize_all)
    jobs = [
        Job(p, request.sampling(engine.check_context(len(p), request.max_tokens, "prompt")), loop)
        for p in prompts
    ]
    worker.submit(jobs)
    return Generation(request.model, worker, jobs)


async def collect(job: Job) -> Result:
    """Wait for ``job`` to finish and return its whole text."""
    parts: list[str] = []
    async for event in job.stream():
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Finished):
            return Result(
                "".join(parts), event.finish_reason, event.prompt_tokens, event.completion_tokens
            )
        elif isinstance(event, Failed):
            raise event.error
    raise APIError("generation ended without a result")
