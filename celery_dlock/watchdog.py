"""One renewal watchdog per process for every auto-renewed lock (sync side).

A single daemon thread keeps the schedule: which lock is due for renewal and
when each lease stops being trustworthy. Renewals for locks that share a Redis
client go out as one pipeline (one round trip per interval, however many locks
are held). The pipeline runs on a small I/O pool so that a hung network never
stops the watchdog from declaring a lock lost on time: when a lease runs out on
the local monotonic clock before a renewal got through, the lock is marked lost
and its ``on_lost`` is called at once.

Locks that are not auto-renewed but have an ``on_lost`` callback are tracked
too (no I/O), so their holder is told when the lease runs out.

After ``fork`` the child gets a fresh, empty watchdog: it never renews the
parent's locks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery_dlock.scripts import EXTEND, Script

if TYPE_CHECKING:
    from celery_dlock.lock import DistributedLock

logger = logging.getLogger("celery_dlock")

# After a failed renewal, try again after this long (capped by the interval).
RETRY_AFTER_ERROR = 0.25
IO_THREADS = 4


def run_script_batch(client: Any, script: Script, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
    """Run ``script`` once per (keys, args) in one pipeline; errors come back as exception objects."""
    from redis.exceptions import NoScriptError

    for _ in range(2):
        pipe = client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        results: list[Any] = pipe.execute(raise_on_error=False)
        if not any(isinstance(r, NoScriptError) for r in results):
            return results
        client.script_load(script.source)  # the server lost its script cache (restart)
    return results


@dataclass
class _Entry:
    lock: DistributedLock
    renew: bool
    next_renewal: float


class RenewalWatchdog:
    """Renews every tracked lock of this process; see the module docstring."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._entries: dict[int, _Entry] = {}
        self._in_flight: set[int] = set()  # ids of locks inside a batch on the wire
        self._busy_clients: set[int] = set()
        self._thread: threading.Thread | None = None
        self._io: ThreadPoolExecutor | None = None

    # -- called by locks ---------------------------------------------------------

    def track(self, lock: DistributedLock) -> None:
        renew = lock.options.auto_renewal
        with self._cond:
            self._entries[id(lock)] = _Entry(lock, renew, time.monotonic() + lock.options.renewal_interval)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="celery-dlock-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def untrack(self, lock: DistributedLock, wait: float) -> None:
        """Stop renewing ``lock``; waits (up to ``wait`` s) for a renewal already on the wire.

        Called before a release, so no renewal of this lock reaches Redis after it.
        """
        deadline = time.monotonic() + wait
        with self._cond:
            self._entries.pop(id(lock), None)
            while id(lock) in self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)

    def tracked_count(self) -> int:
        with self._cond:
            return len(self._entries)

    # -- the watchdog thread -----------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                self._tick()
            except Exception:  # never let the watchdog die silently
                logger.exception("celery-dlock watchdog tick failed; continuing")
                time.sleep(RETRY_AFTER_ERROR)

    def _tick(self) -> None:
        lost: list[DistributedLock] = []
        batches: dict[int, tuple[Any, list[tuple[DistributedLock, str]]]] = {}
        with self._cond:
            now = time.monotonic()
            wake_at = now + 3600.0
            # Clients with at least one lock due: their other locks that are at least
            # half-way to due ride in the same pipeline, so renewals align into one
            # round trip per interval instead of one per acquisition moment.
            due_clients = {
                id(entry.lock.redis)
                for entry in self._entries.values()
                if entry.renew and entry.next_renewal <= now
            }
            for key, entry in list(self._entries.items()):
                lock = entry.lock
                if now >= lock.trusted_until:
                    reason = (
                        "no renewal reached Redis before the lease ran out"
                        if entry.renew
                        else "its lease ran out (auto_renewal is off)"
                    )
                    if lock._mark_lost(reason):
                        lost.append(lock)
                    del self._entries[key]
                    continue
                wake_at = min(wake_at, lock.trusted_until)
                if not entry.renew or key in self._in_flight:
                    continue
                client_id = id(lock.redis)
                early = entry.next_renewal - now <= lock.options.renewal_interval / 2
                if client_id in due_clients and early and client_id not in self._busy_clients:
                    token = lock.token
                    if token is not None:
                        batches.setdefault(client_id, (lock.redis, []))[1].append((lock, token))
                else:
                    wake_at = min(wake_at, entry.next_renewal)
            for client_id, (_, group) in batches.items():
                self._busy_clients.add(client_id)
                self._in_flight.update(id(lock) for lock, _ in group)
            if not lost and not batches:
                self._cond.wait(max(0.0, wake_at - now))
                return
        for lock in lost:
            lock._notify_lost()
        if batches and self._io is None:
            self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="celery-dlock-renew")
        for client_id, (client, group) in batches.items():
            assert self._io is not None
            self._io.submit(self._renew, client_id, client, group)

    def _renew(self, client_id: int, client: Any, group: list[tuple[DistributedLock, str]]) -> None:
        calls = [([lock.keys.lock], [token, lock.options.timeout_ms, "renew", 0]) for lock, token in group]
        sent_at = time.monotonic()
        error: Exception | None = None
        replies: list[Any] = []
        try:
            replies = run_script_batch(client, EXTEND, calls)
        except Exception as exc:
            error = exc
        lost: list[DistributedLock] = []
        with self._cond:
            self._busy_clients.discard(client_id)
            now = time.monotonic()
            for index, (lock, _token) in enumerate(group):
                self._in_flight.discard(id(lock))
                entry = self._entries.get(id(lock))
                if entry is None or entry.lock is not lock:
                    continue  # released while the renewal was on the wire
                reply = error if error is not None else replies[index]
                if isinstance(reply, Exception):
                    entry.next_renewal = now + min(RETRY_AFTER_ERROR, lock.options.renewal_interval)
                    continue
                lease_ms = int(reply)
                if lease_ms < 0:
                    if lock._mark_lost("renewal found the lock expired or owned by another token"):
                        lost.append(lock)
                    del self._entries[id(lock)]
                    continue
                lock._renewed(lease_ms, sent_at)
                entry.next_renewal = sent_at + lock.options.renewal_interval
            self._cond.notify_all()
        if error is not None:
            logger.warning("renewal of %d lock(s) failed, will retry: %r", len(group), error)
        for lock in lost:
            lock._notify_lost()


_watchdog = RenewalWatchdog()


def get_watchdog() -> RenewalWatchdog:
    """The watchdog of the current process."""
    return _watchdog


def _fresh_watchdog_in_child() -> None:
    global _watchdog
    _watchdog = RenewalWatchdog()


os.register_at_fork(after_in_child=_fresh_watchdog_in_child)
