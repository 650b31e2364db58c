"""One renewal watchdog task per event loop for every auto-renewed lock (asyncio side).

The asyncio twin of :mod:`celery_dlock.watchdog`, driving the same
:class:`~celery_dlock.schedule.RenewalSchedule`. Each batch's pipeline runs in
its own task, so a hung connection never delays declaring a lease lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from typing import Any

from celery_dlock.lease import LockCore
from celery_dlock.schedule import Batch, RenewalSchedule
from celery_dlock.scripts import EXTEND, Script

logger = logging.getLogger("celery_dlock")


async def run_script_batch(
    client: Any, script: Script, calls: list[tuple[list[str], list[Any]]]
) -> list[Any]:
    """Run ``script`` once per (keys, args) in one pipeline; errors come back as exception objects."""
    from redis.exceptions import NoScriptError

    for _ in range(2):
        pipe = client.pipeline(transaction=False)
        for keys, args in calls:
            # execute_command, not .evalsha(): cluster pipelines block the helper method
            # (the command itself routes fine: all keys of a call share one slot).
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        if not any(isinstance(r, NoScriptError) for r in results):
            return results
        await client.script_load(script.source_bytes)
    return results


class AsyncRenewalWatchdog:
    """Renews every tracked lock of one event loop."""

    def __init__(self) -> None:
        self._schedule = RenewalSchedule()
        self._changed = asyncio.Event()
        self._batch_done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._io_tasks: set[asyncio.Task[None]] = set()
        # While the task waits, the monotonic time it will wake by itself (else None).
        self._sleeping_until: float | None = None
        #: How many times the task woke up to plan (observability, and tests).
        self.wakeups = 0

    def track(self, lock: LockCore) -> None:
        due = self._schedule.track(lock, time.monotonic())
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="celery-dlock-watchdog")
        elif self._sleeping_until is not None and due < self._sleeping_until:
            self._changed.set()

    def retime(self, lock: LockCore) -> None:
        """``lock``'s lease changed: wake the task if it now needs it sooner."""
        due = self._schedule.retime(lock, time.monotonic())
        if due is not None and self._sleeping_until is not None and due < self._sleeping_until:
            self._changed.set()

    async def untrack(self, lock: LockCore, wait: float) -> None:
        """Stop renewing ``lock``; waits (up to ``wait`` s) for a renewal already on the wire."""
        self._schedule.untrack(lock)
        deadline = time.monotonic() + wait
        while self._schedule.in_flight(lock):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._batch_done.clear()
            try:
                await asyncio.wait_for(self._batch_done.wait(), left)
            except asyncio.TimeoutError:
                break

    def untrack_now(self, lock: LockCore) -> None:
        self._schedule.untrack(lock)

    def tracked_count(self) -> int:
        return len(self._schedule)

    async def _run(self) -> None:
        while True:
            try:
                self.wakeups += 1
                now = time.monotonic()
                plan = self._schedule.plan(now)
                _notify_lost_soon(plan.lost)
                for batch in plan.batches:
                    task = asyncio.get_running_loop().create_task(self._renew(batch))
                    self._io_tasks.add(task)
                    task.add_done_callback(self._io_tasks.discard)
                if plan.lost or plan.batches:
                    continue
                self._changed.clear()
                self._sleeping_until = plan.wake_at
                try:
                    await asyncio.wait_for(self._changed.wait(), max(0.0, plan.wake_at - now))
                except asyncio.TimeoutError:
                    pass
                finally:
                    self._sleeping_until = None
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the watchdog die silently
                logger.exception("celery-dlock asyncio watchdog tick failed; continuing")
                await asyncio.sleep(0.25)

    async def _renew(self, batch: Batch) -> None:
        sent_at = time.monotonic()
        error: Exception | None = None
        replies: list[Any] | None = None
        try:
            # Waiting past the batch's deadline is pointless: its shortest lease is
            # reported lost by then, and the client gets a new batch.
            replies = await asyncio.wait_for(
                run_script_batch(batch.client, EXTEND, batch.calls()), max(0.0, batch.deadline - sent_at)
            )
        except Exception as exc:
            error = exc
        lost = self._schedule.complete(batch, replies, error, sent_at, time.monotonic())
        self._batch_done.set()
        self._changed.set()
        if error is not None:
            logger.warning("renewal of %d lock(s) failed, will retry: %r", len(batch.locks), error)
        _notify_lost_soon(lost)


def _notify_lost_soon(locks: list[LockCore]) -> None:
    """Call the locks' on_lost callbacks from the event loop, after the watchdog has sent
    what is due (they run on the loop: a callback must not block it)."""
    loop = asyncio.get_running_loop()
    for lock in locks:
        loop.call_soon(lock._notify_lost)


_watchdogs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncRenewalWatchdog]
_watchdogs = weakref.WeakKeyDictionary()


def get_watchdog() -> AsyncRenewalWatchdog:
    """The watchdog of the running event loop."""
    loop = asyncio.get_running_loop()
    watchdog = _watchdogs.get(loop)
    if watchdog is None:
        watchdog = _watchdogs[loop] = AsyncRenewalWatchdog()
    return watchdog


def _forget_in_child() -> None:
    _watchdogs.clear()


os.register_at_fork(after_in_child=_forget_in_child)
