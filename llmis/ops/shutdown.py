"""Graceful shutdown: stop taking requests, let those in flight finish, then end them cleanly.

aiohttp turns SIGTERM into an orderly stop: it closes the listening sockets (new connections
are refused), then runs ``on_shutdown``. There :meth:`Shutdown.drain` refuses requests that
still arrive on open connections (503 ``server_shutting_down``) and waits up to
``shutdown_grace_seconds`` for requests in flight. Generations still running after the
grace get a final error event saying the server is shutting down, and their jobs are
cancelled, so every client learns why its answer stopped; then the server exits 0.

A second SIGINT or SIGTERM while draining forces the exit: it says so on stderr, cuts the
grace short and stops every running generation at once, still with its final error event;
the server then exits with 128 + the signal number (130 for Ctrl-C).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from llmis.engine.jobs import Job
from llmis.errors import APIError

__all__ = ["ServerShuttingDownError", "Shutdown"]

logger = logging.getLogger(__name__)

# After the grace, how long generations that were told to stop get to send their final event.
_FINAL_EVENT_SECONDS = 5.0


class ServerShuttingDownError(APIError):
    status = 503
    type = "server_error"
    code = "server_shutting_down"

    def __init__(self, message: str = "The server is shutting down; retry shortly.") -> None:
        super().__init__(message, headers={"Retry-After": "5", "Connection": "close"})


Stopper = Callable[[APIError], None]


class Shutdown:
    """Counts requests in flight and the generations to stop when the grace runs out."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.draining = False
        self.expired = False
        self.forced_by: int | None = None  # the signal that forced the exit
        self.inflight = 0
        self._generations: dict[Job, Stopper] = {}
        # Set whenever a request or a watched generation ends, or the exit is forced:
        # the drain waits on it instead of polling.
        self._changed = asyncio.Event()

    def force(self, signum: int = signal.SIGINT) -> None:
        """A second interrupt while draining: stop waiting and end every generation now."""
        if self.forced_by is not None:
            return
        self.forced_by = signum
        print(
            f"llmis: {signal.Signals(signum).name} again: forcing the exit; "
            "open streams end with an error event",
            file=sys.stderr,
            flush=True,
        )
        logger.warning("second %s: forcing the exit", signal.Signals(signum).name)
        self._changed.set()

    @property
    def exit_code(self) -> int:
        """0 after a graceful stop; 128 + the signal number after a forced one."""
        return 0 if self.forced_by is None else 128 + self.forced_by

    def _catch_second_signal(self) -> None:
        """While draining, SIGINT / SIGTERM force the exit (aiohttp's handlers would raise
        out of the shutdown and cut streams without a final event)."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, self.force, signum)

    def watch(self, job: Job, stop: Stopper) -> None:
        """Register a running generation; ``stop(error)`` ends it when the grace runs out."""
        self._generations[job] = stop

    def unwatch(self, job: Job) -> None:
        if self._generations.pop(job, None) is not None:
            self._changed.set()

    def _running(self) -> list[Stopper]:
        return [stop for job, stop in self._generations.items() if not job.done]

    @property
    def busy(self) -> bool:
        return self.inflight > 0 or bool(self._running())

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.draining:
            raise ServerShuttingDownError()
        # A WebSocket is a connection, not a request: its generations are watched instead.
        counted = request.headers.get("Upgrade", "").lower() != "websocket"
        self.inflight += counted
        try:
            return await handler(request)
        finally:
            self.inflight -= counted
            if counted:
                self._changed.set()

    async def _wait_idle(self, seconds: float, *, forceable: bool = True) -> None:
        """Until nothing is in flight, ``seconds`` pass, or (``forceable``) the exit is forced;
        woken by each request or generation that ends."""
        deadline = time.monotonic() + seconds
        while self.busy:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (forceable and self.forced_by is not None):
                return
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def drain(self, app: web.Application) -> None:
        """``on_shutdown``: wait out the grace, then stop what still runs."""
        self.draining = True
        self._catch_second_signal()
        logger.info(
            "shutting down: %d requests and %d generations in flight, grace %.1fs",
            self.inflight,
            len(self._running()),
            self.grace,
        )
        await self._wait_idle(self.grace)
        self.expired = True
        running = self._running()
        if running:
            if self.forced_by is not None:
                logger.warning("forced exit: stopping %d generations", len(running))
                message = (
                    "The server was told to stop at once (a second interrupt) while shutting "
                    "down; the generation was stopped."
                )
            else:
                logger.warning(
                    "grace of %.1fs over: stopping %d generations", self.grace, len(running)
                )
                message = (
                    f"The server is shutting down and the grace period of {self.grace:g}s "
                    "for requests in flight has ended; the generation was stopped."
                )
            error = ServerShuttingDownError(message)
            for stop in running:
                stop(error)
            await self._wait_idle(_FINAL_EVENT_SECONDS, forceable=False)
        logger.info("shutdown: requests drained")
