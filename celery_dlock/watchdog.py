"""One renewal watchdog thread per process for every auto-renewed lock (sync side).

The daemon thread keeps the :class:`~celery_dlock.schedule.RenewalSchedule`:
it wakes when a renewal is due or a lease is about to run out. Renewals for
locks that share a Redis client go out as one pipeline (one round trip per
interval, however many locks are held). Pipelines run on a small I/O pool so
that a hung network never stops the watchdog from declaring a lock lost on
time: when a lease runs out on the local monotonic clock before a renewal got
through, the lock is marked lost and its ``on_lost`` is called at once.

Locks that are not auto-renewed but have an ``on_lost`` callback are tracked
too (no I/O), so their holder is told when the lease runs out.

After ``fork`` the child gets a fresh, empty watchdog: it never renews the
parent's locks.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery_dlock.channel import script_channel
from celery_dlock.deadline import call_before
from celery_dlock.lease import LockCore
from celery_dlock.schedule import Batch, RenewalSchedule
from celery_dlock.scripts import EXTEND, Script

logger = logging.getLogger("celery_dlock")

# Batches on the wire at once (one per client at most). A batch that hangs holds its
# thread until its deadline; the others keep theirs.
IO_THREADS = 16


def run_script_batch(
    client: Any, script: Script, calls: list[tuple[list[str], list[Any]]], deadline: float | None = None
) -> list[Any]:
    """Run ``script`` once per (keys, args) in one pipeline; errors come back as exception objects.

    ``deadline``: no answer by then raises DeadlineExceeded (see celery_dlock.deadline).
    """
    from redis.exceptions import NoScriptError

    channel = script_channel(client)
    for _ in range(2):
        if channel is not None:
            commands = [("EVALSHA", script.sha, len(keys), *keys, *args) for keys, args in calls]
            results = channel.execute_batch(commands, deadline=deadline)
        else:
            pipe = client.pipeline(transaction=False)
            for keys, args in calls:
                # execute_command, not .evalsha(): cluster pipelines block the helper method
                # (the command itself routes fine: all keys of a call share one slot).
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            if deadline is None:
                results = pipe.execute(raise_on_error=False)
            else:
                results = call_before(deadline, functools.partial(pipe.execute, raise_on_error=False))
        if not any(isinstance(r, NoScriptError) for r in results):
            return results
        # The server lost its script cache (a restart): load it, the way the batch went.
        if channel is not None:
            channel.execute("SCRIPT", "LOAD", script.source_bytes, deadline=deadline)
        elif deadline is None:
            client.script_load(script.source_bytes)
        else:
            call_before(deadline, lambda: client.script_load(script.source_bytes))
    return results


class RenewalWatchdog:
    """Renews every tracked lock of this process; see the module docstring."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._schedule = RenewalSchedule()
        self._thread: threading.Thread | None = None
        self._io: ThreadPoolExecutor | None = None
        # on_lost callbacks run here, one at a time, never on the watchdog's or a
        # renewal's thread: a slow callback must not delay other locks' renewals.
        self._callbacks: ThreadPoolExecutor | None = None
        # When the thread waits, the monotonic time it will wake by itself; None
        # while it is planning or renewing (it plans again before it next waits).
        self._sleeping_until: float | None = None
        #: How many times the thread woke up to plan (observability, and tests).
        self.wakeups = 0

    def track(self, lock: LockCore) -> None:
        with self._cond:
            due = self._schedule.track(lock, time.monotonic())
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="celery-dlock-watchdog", daemon=True)
                self._thread.start()
            elif self._sleeping_until is not None and due < self._sleeping_until:
                self._cond.notify_all()

    def retime(self, lock: LockCore) -> None:
        """``lock``'s lease changed: wake the thread if it now needs it sooner."""
        with self._cond:
            due = self._schedule.retime(lock, time.monotonic())
            if due is not None and self._sleeping_until is not None and due < self._sleeping_until:
                self._cond.notify_all()

    def untrack(self, lock: LockCore, wait: float) -> None:
        """Stop renewing ``lock``; waits (up to ``wait`` s) for a renewal already on the wire.

        Called before a release, so no renewal of this lock reaches Redis after it.
        """
        deadline = time.monotonic() + wait
        with self._cond:
            self._schedule.untrack(lock)
            while self._schedule.in_flight(lock):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)

    def tracked_count(self) -> int:
        with self._cond:
            return len(self._schedule)

    def _run(self) -> None:
        while True:
            try:
                self._tick()
            except Exception:  # never let the watchdog die silently
                logger.exception("celery-dlock watchdog tick failed; continuing")
                time.sleep(0.25)

    def _tick(self) -> None:
        with self._cond:
            self.wakeups += 1
            now = time.monotonic()
            plan = self._schedule.plan(now)
            if not plan.lost and not plan.batches:
                self._sleeping_until = plan.wake_at
                try:
                    self._cond.wait(max(0.0, plan.wake_at - now))
                finally:
                    self._sleeping_until = None
                return
        self._notify_lost(plan.lost)
        if plan.batches and self._io is None:
            self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="celery-dlock-renew")
        for batch in plan.batches:
            assert self._io is not None
            self._io.submit(self._renew, batch)

    def _renew(self, batch: Batch) -> None:
        sent_at = time.monotonic()
        error: Exception | None = None
        replies: list[Any] | None = None
        try:
            # Never waiting past the batch's deadline: its shortest lease is reported
            # lost by then, and the client gets a new batch.
            replies = run_script_batch(batch.client, EXTEND, batch.calls(), batch.deadline)
        except Exception as exc:
            error = exc
        with self._cond:
            lost = self._schedule.complete(batch, replies, error, sent_at, time.monotonic())
            self._cond.notify_all()
        if error is not None:
            logger.warning("renewal of %d lock(s) failed, will retry: %r", len(batch.locks), error)
        self._notify_lost(lost)

    def _notify_lost(self, locks: list[LockCore]) -> None:
        if not locks:
            return
        with self._cond:
            if self._callbacks is None:
                self._callbacks = ThreadPoolExecutor(1, thread_name_prefix="celery-dlock-on-lost")
            callbacks = self._callbacks
        for lock in locks:
            callbacks.submit(lock._notify_lost)


_watchdog = RenewalWatchdog()


def get_watchdog() -> RenewalWatchdog:
    """The watchdog of the current process."""
    return _watchdog


def _fresh_watchdog_in_child() -> None:
    global _watchdog
    _watchdog = RenewalWatchdog()


os.register_at_fork(after_in_child=_fresh_watchdog_in_child)
