"""The schedulers' shared base (``llmis.engine.model_thread``), alone: no model, no thread."""

from __future__ import annotations

from llmis.engine.model_thread import ModelThread


class Loud:
    """A job that must never be compared or printed on the cancel path (a real job's repr
    holds its prompt and its result arrays: printing it cost milliseconds per request)."""

    def __repr__(self) -> str:
        raise AssertionError("repr of a job")

    def __eq__(self, other: object) -> bool:
        raise AssertionError("== on a job")

    __hash__ = object.__hash__


class Queue(ModelThread[Loud]):
    def _idle_locked(self) -> bool:
        return not self._queue


def test_unqueue_drops_by_identity_and_never_prints_the_job() -> None:
    thread = Queue("m", 4, "unused")  # never started
    first, second = Loud(), Loud()
    thread._queue.extend([first, second])
    thread._unqueue(second)
    assert len(thread._queue) == 1 and thread._queue[0] is first
    thread._unqueue(second)  # no longer queued (it started, or was dropped): nothing happens
    thread._unqueue(first)
    assert not thread._queue and thread._idle_locked()
