"""Watching over each generation: caps, timeouts, the content filter, metrics, shutdown.

:class:`Oversight` bundles the per-application objects (metrics, content filter, rate
limiter, shutdown state). :class:`Guard` applies them to one request's generation: it checks
the prompt and the token caps before anything is queued, and :meth:`Guard.events` wraps a
job's event stream, so that every transport that reads events through it gets:

- metrics: queue wait, time to first token, inter-token latency, end-to-end latency, tokens;
- the output content filter: text streams ``holdback_chars`` behind the model, and a match
  ends the job with ``Finished(finish_reason="content_filter")``;
- timeouts: ``request_timeout`` (from the request's arrival) and ``idle_timeout`` (silence
  after the worker started the job) end the job with a ``Failed`` 504 event;
- shutdown: past the grace period the job ends with a ``Failed`` 503 event.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from llmis.config import LimitSettings, Settings
from llmis.engine.jobs import Delta, Failed, Finished, Job, JobEvent, Started
from llmis.errors import APIError, BadRequestError
from llmis.ops.contentfilter import ContentFilter
from llmis.ops.metrics import Metrics
from llmis.ops.ratelimit import RateLimiter
from llmis.ops.request_context import RequestContext
from llmis.ops.shutdown import ServerShuttingDownError, Shutdown

__all__ = ["Guard", "Oversight", "RequestTimeoutError"]

logger = logging.getLogger(__name__)


class RequestTimeoutError(APIError):
    status = 504
    type = "timeout_error"


@dataclass
class Oversight:
    settings: Settings
    metrics: Metrics
    filter: ContentFilter
    limiter: RateLimiter
    shutdown: Shutdown


def _cap_error(message: str, param: str, code: str) -> BadRequestError:
    return BadRequestError(message, param=param, code=code)


@dataclass
class Guard:
    """Oversight of one request's generation (one or more jobs on one model): the
    :class:`~llmis.serving.policy.RequestPolicy` its handler passes to the serving layer."""

    model: str
    limits: LimitSettings
    oversight: Oversight | None = None
    ctx: RequestContext | None = None
    stopped: dict[int, str] = field(default_factory=dict)
    # When the request for this generation arrived (for a WebSocket: its message, not the
    # connection); TTFT, end-to-end latency and request_timeout count from here.
    arrived: float = field(default_factory=time.monotonic)

    @classmethod
    def for_request(
        cls,
        model: str,
        settings: Settings,
        oversight: Oversight | None,
        ctx: RequestContext | None,
    ) -> Guard:
        """The guard of one request's generation on ``model``: the app's ``oversight``, and
        ``ctx``, the request it serves (named in the access log and the request metrics)."""
        return cls(model, settings.limits, oversight, ctx)

    def admitted(self) -> None:
        """The model exists: name it in the access log and the request metrics."""
        if self.ctx is not None:
            self.ctx.model = self.model

    # ----- before queueing -----

    def check_prompt_text(self, texts: Iterable[str], param: str) -> None:
        if self.oversight is not None:
            self.oversight.filter.check_prompt(texts, param)

    def max_tokens(self, n_prompt: int, requested: int | None, param: str) -> int | None:
        """Apply the caps; return the ``max_tokens`` to ask the engine for."""
        caps = self.limits
        if caps.max_prompt_tokens is not None and n_prompt > caps.max_prompt_tokens:
            raise _cap_error(
                f"The prompt has {n_prompt} tokens; this server accepts at most "
                f"{caps.max_prompt_tokens}.",
                param,
                "prompt_too_long",
            )
        if caps.max_tokens is not None and requested is not None and requested > caps.max_tokens:
            raise _cap_error(
                f"max_tokens is {requested}; this server allows at most {caps.max_tokens}.",
                "max_tokens",
                "max_tokens_too_large",
            )
        return requested

    def clamp(self, effective: int, requested: int | None) -> int:
        """The engine's default ``max_tokens`` (the rest of the context), capped."""
        if requested is None and self.limits.max_tokens is not None:
            return min(effective, self.limits.max_tokens)
        return effective

    # ----- while generating -----

    def cancelled(self, job: Job) -> None:
        """The request ended before ``job`` did (client gone, or an error elsewhere)."""
        if self.oversight is None:
            return
        self.oversight.shutdown.unwatch(job)
        if job.id not in self.stopped:
            self.oversight.metrics.cancellations.labels(self.model, "client").inc()

    async def events(
        self, job: Job, cancel: Callable[[Job], None], keepalive: float | None = None
    ) -> AsyncIterator[JobEvent | None]:
        """``job``'s events as the transports read them; ``None`` = send a keepalive ping.

        ``cancel(job)`` stops the job in its worker when the guard ends it early.
        """
        watch = _Watch(self, job, cancel, keepalive)
        shutdown = self.oversight.shutdown if self.oversight is not None else None
        if shutdown is not None:
            shutdown.watch(job, watch.stop)
        try:
            async for event in watch.run():
                yield event
        finally:
            if shutdown is not None:
                shutdown.unwatch(job)


class _Watch:
    """The state of one job's stream inside :meth:`Guard.events`."""

    def __init__(
        self, guard: Guard, job: Job, cancel: Callable[[Job], None], keepalive: float | None
    ) -> None:
        self.guard, self.job, self.cancel, self.keepalive = guard, job, cancel, keepalive
        ov = guard.oversight
        self.metrics = ov.metrics if ov is not None else None
        # observed once per token: the labelled child is looked up once per stream
        self.inter_token = (
            self.metrics.inter_token.labels(guard.model) if self.metrics is not None else None
        )
        self.scanner = ov.filter.scanner() if ov is not None and ov.filter.enabled else None
        self.arrived = guard.arrived
        timeout = guard.limits.request_timeout
        self.total_deadline = self.arrived + timeout if timeout is not None else None
        self.idle_deadline: float | None = None
        self.started_at: float | None = None
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.pieces = 0

    def stop(self, error: APIError) -> None:
        """End the job now with ``error`` as its last event (used at shutdown)."""
        if not self.job.done:
            self._stop_job("shutdown")
            self.job.events.put_nowait(Failed(error))

    def _stop_job(self, reason: str) -> None:
        logger.info("stopping generation of job %s: %s", self.job.id, reason)
        self.guard.stopped[self.job.id] = reason
        self.cancel(self.job)
        if self.metrics is not None:
            self.metrics.cancellations.labels(self.guard.model, reason).inc()

    def _wait(self, now: float) -> float | None:
        deadlines = [d for d in (self.total_deadline, self.idle_deadline) if d is not None]
        if self.keepalive is not None:
            deadlines.append(now + self.keepalive)
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _timeout(self, now: float) -> Failed | None:
        if self.total_deadline is not None and now >= self.total_deadline:
            what = (
                f"The request took longer than the limit of {self.guard.limits.request_timeout:g}s"
            )
            code = "request_timeout"
        elif self.idle_deadline is not None and now >= self.idle_deadline:
            what = (
                f"The model produced nothing for {self.guard.limits.idle_timeout:g}s "
                "(the idle limit)"
            )
            code = "idle_timeout"
        else:
            return None
        self._stop_job("timeout")
        return Failed(RequestTimeoutError(f"{what}; the generation was stopped.", code=code))

    async def run(self) -> AsyncIterator[JobEvent | None]:
        ov = self.guard.oversight
        if ov is not None and ov.shutdown.expired:
            self._stop_job("shutdown")
            yield Failed(ServerShuttingDownError())
            return
        while True:
            event = await self.job.next_event(self._wait(time.monotonic()))
            if event is None:
                failed = self._timeout(time.monotonic())
                if failed is not None:
                    self.job.done = True
                    self._account(None)
                    yield failed
                    return
                yield None
                continue
            for out in self._handle(event, time.monotonic()):
                yield out
            if self.job.done:
                return

    def _handle(self, event: JobEvent, now: float) -> list[JobEvent]:
        limits = self.guard.limits
        model = self.guard.model
        if isinstance(event, Started):
            self.started_at = now
            if self.metrics is not None:
                self.metrics.queue_time.labels(model).observe(event.queue_wait)
            if limits.idle_timeout is not None:
                self.idle_deadline = now + limits.idle_timeout
            return [event]
        if isinstance(event, Delta):
            return self._delta(event, now)
        self.job.done = True
        if isinstance(event, Finished):
            out: list[JobEvent] = []
            if self.scanner is not None:
                tail = self.scanner.feed("", final=True)
                if tail:
                    out.append(Delta(tail))
                if self.scanner.tripped:
                    self._stop_job("content_filter")
                    event = dataclasses.replace(event, finish_reason="content_filter")
            self._account(event)
            return [*out, event]
        self._account(None)
        return [event]

    def _delta(self, event: Delta, now: float) -> list[JobEvent]:
        limits = self.guard.limits
        self.pieces += 1
        if self.first_at is None:
            self.first_at = now
            if self.guard.ctx is not None:
                self.guard.ctx.ttft = now - self.arrived
            if self.metrics is not None:
                self.metrics.ttft.labels(self.guard.model).observe(now - self.arrived)
        elif self.inter_token is not None and self.last_at is not None:
            self.inter_token.observe(now - self.last_at)
        self.last_at = now
        if limits.idle_timeout is not None:
            self.idle_deadline = now + limits.idle_timeout
        if self.scanner is None:
            return [event]
        text = self.scanner.feed(event.text)
        out: list[JobEvent] = (
            [Delta(text, event.logprobs, event.completion_tokens)] if text or event.logprobs else []
        )
        if self.scanner.tripped:
            self._stop_job("content_filter")
            self.job.done = True
            finished = Finished("content_filter", len(self.job.prompt), self.pieces)
            self._account(finished)
            out.append(finished)
        return out

    def _account(self, finished: Finished | None) -> None:
        """Record what the job generated (estimated from the pieces when it was stopped)."""
        now = time.monotonic()
        started = self.started_at is not None
        prompt_tokens = finished.prompt_tokens if finished else len(self.job.prompt) * started
        completion = finished.completion_tokens if finished else self.pieces
        ctx = self.guard.ctx
        if ctx is not None:
            ctx.prompt_tokens += prompt_tokens
            ctx.completion_tokens += completion
            if finished is not None:
                ctx.finish_reason = finished.finish_reason
            else:
                ctx.finish_reason = self.guard.stopped.get(self.job.id)
        ov = self.guard.oversight
        if ov is None:
            return
        if ctx is not None and ctx.rate_key:
            ov.limiter.spend_tokens(ctx.rate_key, completion)
        m, model = ov.metrics, self.guard.model
        m.prompt_tokens.labels(model).inc(prompt_tokens)
        m.llamacpp_prompt_tokens.labels(model).inc(prompt_tokens)
        m.generation_tokens.labels(model).inc(completion)
        m.llamacpp_predicted_tokens.labels(model).inc(completion)
        if self.started_at is not None and self.first_at is not None:
            m.llamacpp_prompt_seconds.labels(model).inc(self.first_at - self.started_at)
            m.llamacpp_predicted_seconds.labels(model).inc(now - self.first_at)
        m.e2e.labels(model).observe(now - self.arrived)
        if finished is not None:
            m.request_success.labels(model, finished.finish_reason).inc()
