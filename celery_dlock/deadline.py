"""Ending a blocking call on the lock's own deadline, whatever the client's timeouts.

A redis-py call can block far longer than a lock operation may take: with redis-py's
defaults there is no socket timeout, and a retry policy sleeps between tries. Where
the call can be bounded on the caller's thread (the script channel reading a reply on
a connected connection), it is; where it may block first (connecting, a client we do
not drive ourselves), :func:`call_before` runs it on a helper thread and stops waiting
at the deadline. The call then finishes on its own, under the client's own settings,
and ``on_late`` sees its result (a late acquisition is released there).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery_dlock.errors import DeadlineExceeded

__all__ = ["DeadlineExceeded", "call_before"]

logger = logging.getLogger("celery_dlock")

T = TypeVar("T")


#: How long an idle helper thread waits for its next call before it ends.
HELPER_IDLE_SECONDS = 30.0


def call_before(deadline: float, call: Callable[[], T], on_late: Callable[[Any], object] | None = None) -> T:
    """``call()``'s result if it ends before ``deadline`` (monotonic), else DeadlineExceeded.

    The call runs on an idle helper thread (one is started when none is idle): a helper
    whose call outlives its deadline finishes it, hands a late result to ``on_late``,
    and only then serves another call.
    """
    job = _Job(call, on_late)
    _Helper.take().run(job)
    job.done.wait(max(0.0, deadline - time.monotonic()))
    with job.guard:
        if not job.done.is_set():
            job.abandoned = True
            raise DeadlineExceeded("no answer from Redis before the lock operation's deadline")
    if job.error is not None:
        raise job.error
    result: T = job.result
    return result


class _Job:
    """One bounded call: what to run, and what came of it."""

    def __init__(self, call: Callable[[], Any], on_late: Callable[[Any], object] | None) -> None:
        self.call = call
        self.on_late = on_late
        self.result: Any = None
        self.error: BaseException | None = None
        self.guard = threading.Lock()
        self.done = threading.Event()
        self.abandoned = False

    def perform(self) -> None:
        try:
            self.result = self.call()
        except BaseException as error:
            self.error = error
        with self.guard:
            self.done.set()
            late = self.abandoned
        if late and self.on_late is not None and self.error is None:
            try:
                self.on_late(self.result)
            except Exception:
                logger.exception("clean-up after a late reply failed")


class _Helper:
    """A daemon thread running one :class:`_Job` at a time; idle ones wait in ``_idle``."""

    _idle: list[_Helper] = []
    _idle_lock = threading.Lock()

    def __init__(self) -> None:
        self._job: _Job | None = None
        self._given = threading.Semaphore(0)
        threading.Thread(target=self._serve, name="celery-dlock-bounded-call", daemon=True).start()

    @classmethod
    def take(cls) -> _Helper:
        with cls._idle_lock:
            if cls._idle:
                return cls._idle.pop()
        return cls()

    def run(self, job: _Job) -> None:
        self._job = job
        self._given.release()

    def _serve(self) -> None:
        while True:
            if not self._given.acquire(timeout=HELPER_IDLE_SECONDS):
                if self._retire():
                    return
                self._given.acquire()  # a caller took it meanwhile: its job is on the way
            job, self._job = self._job, None
            assert job is not None
            job.perform()
            with self._idle_lock:
                self._idle.append(self)

    def _retire(self) -> bool:
        """End this idle helper, unless a caller took it meanwhile (its job is on the way)."""
        with self._idle_lock:
            if self in self._idle:
                self._idle.remove(self)
                return True
        return False


def _no_helpers_in_child() -> None:
    # Threads do not survive a fork: the child's list would name helpers that never run.
    _Helper._idle = []
    _Helper._idle_lock = threading.Lock()


os.register_at_fork(after_in_child=_no_helpers_in_child)
