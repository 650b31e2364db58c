"""The synchronous Redis lease lock.

One acquire and one release are each a single round trip (an EVALSHA of the
scripts in :mod:`celery_dlock.scripts`). Everything that is not I/O lives in
:class:`celery_dlock.lease.LockCore`, shared with the asyncio lock.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

from redis.exceptions import NoScriptError

from celery_dlock import protocol
from celery_dlock.channel import script_channel
from celery_dlock.connection import (
    reject_foreign_client,
    report_eviction_policy,
)
from celery_dlock.deadline import call_before
from celery_dlock.inbox import Inbox
from celery_dlock.keys import LockKeys
from celery_dlock.lease import (
    LockCore,
    process_generation,
)
from celery_dlock.notify import ReleaseNotifier, notifier_for
from celery_dlock.scripts import RELEASE, BoundScript, Script
from celery_dlock.watchdog import get_watchdog

logger = logging.getLogger("celery_dlock")

T = TypeVar("T")


def run_script(
    client: Any, script: Script, keys: Sequence[str], args: Sequence[Any], deadline: float | None = None
) -> Any:
    """EVALSHA ``script``; EVAL it (which also caches it) if the server does not know it yet.

    ``deadline`` (monotonic): no answer by then raises a redis-py TimeoutError
    (:class:`~celery_dlock.deadline.DeadlineExceeded`), whatever the client's settings.
    """
    execute = _executor(client, deadline)
    try:
        return execute("EVALSHA", script.sha, len(keys), *keys, *args)
    except NoScriptError:
        return execute("EVAL", script.source_bytes, len(keys), *keys, *args)


def run_bound(
    client: Any,
    script: BoundScript,
    *args: Any,
    deadline: float | None = None,
    on_late: Callable[[Any], object] | None = None,
) -> Any:
    """:func:`run_script` for a script bound to its KEYS (the hot path: nothing rebuilt per call).

    ``on_late``: gets the reply if it arrives after the deadline.
    """
    execute = _executor(client, deadline, on_late)
    try:
        return execute(*script.evalsha, *args)
    except NoScriptError:
        return execute(*script.eval, *args)


def run_command(client: Any, *command: Any, deadline: float | None = None) -> Any:
    """Any other command of the lock (ZREM, GET, EXISTS, CONFIG GET), ended on ``deadline``."""
    return _executor(client, deadline)(*command)


def _executor(
    client: Any, deadline: float | None = None, on_late: Callable[[Any], object] | None = None
) -> Callable[..., Any]:
    """How to send a command on ``client``: its channel (:mod:`celery_dlock.channel`) or
    execute_command, on a helper thread when a deadline must hold (see celery_dlock.deadline)."""
    channel = script_channel(client)
    if channel is not None:
        if deadline is None:
            return channel.execute
        bounded: Callable[..., Any] = functools.partial(channel.execute, deadline=deadline, on_late=on_late)
        return bounded
    if deadline is None:
        execute: Callable[..., Any] = client.execute_command
        return execute
    limit = deadline

    def execute_before_deadline(*command: Any) -> Any:
        return call_before(limit, lambda: client.execute_command(*command), on_late)

    return execute_before_deadline


def release_by_token_suffix(client: Any, keys: LockKeys, suffix: str) -> bool:
    """Release the lock named by ``keys`` if its token ends with ``suffix`` (handing it over as usual).

    For a supervisor that knows only the owner part of a token (see
    :meth:`DistributedLock.make_token`), e.g. a Celery worker's main process
    freeing the lock of a pool process that was killed. Queue entries of that
    owner (it died waiting) are removed too, whether or not it held the lock, so
    no later release hands the lock to it. The suffix is not a
    secret the way the random part is: only use it where it identifies exactly
    one acquisition.
    """
    if not isinstance(suffix, str) or not suffix:
        raise ValueError(f"suffix must be a non-empty str, got {suffix!r}")
    return bool(run_script(client, RELEASE, keys.release_keys, [suffix, "suffix"]))


def check_server(client: Any, deadline: float) -> None:
    """Warn if ``client``'s server may evict locks (once per client, at its first acquire:
    one round trip, on the caller's thread, so a small pool is never short of a connection
    for the lock itself). A refused ``CONFIG GET`` is no error."""
    try:
        reply = run_command(client, "CONFIG", "GET", "maxmemory-policy", deadline=deadline)
    except Exception as exc:
        report_eviction_policy(client, None, exc)
    else:
        report_eviction_policy(client, reply, None)


def check_sync_client(client: object) -> Any:
    if type(client) in _SYNC_CLIENT_TYPES:
        return client
    reject_foreign_client(client)
    import redis.asyncio

    if isinstance(client, (redis.asyncio.Redis, redis.asyncio.RedisCluster)):
        raise TypeError(
            "redis must be a synchronous redis.Redis client; for a redis.asyncio client use "
            f"celery_dlock.asyncio.DistributedLock (got {client!r})"
        )
    if not callable(getattr(client, "evalsha", None)):
        raise TypeError(f"redis must be a redis.Redis or RedisCluster client, got {client!r}")
    _SYNC_CLIENT_TYPES.add(type(client))
    return client


# Client classes that passed check_sync_client (a lock is made per Celery task run;
# isinstance against redis.asyncio's protocol classes is slow).
_SYNC_CLIENT_TYPES: set[type] = set()


class _Waiting:
    """A sync operation's listening for hand-overs to its token (protocol's Watch and Sleep)."""

    def __init__(self) -> None:
        self._watch: Any = None
        self._waiter: Any = None

    def watch(self, notifier: ReleaseNotifier, inbox: Inbox[threading.Event], token: str) -> None:
        self._watch = notifier.watch(inbox, token)
        self._waiter = self._watch.__enter__()

    def sleep(self, seconds: float) -> None:
        self._waiter.wake.wait(seconds)
        self._waiter.wake.clear()

    def close(self) -> None:
        if self._watch is not None:
            watch, self._watch = self._watch, None
            watch.__exit__(None, None, None)


class DistributedLock(LockCore):
    """A Redis lease lock with an owner token, fencing token and optional auto-renewal.

    >>> lock = DistributedLock(redis.Redis(), "reports:daily", timeout=30, auto_renewal=True)
    >>> with lock:
    ...     write_report(fence=lock.fence)
    """

    _check_client = staticmethod(check_sync_client)

    _performers: dict[str, Callable[..., Any]]

    # -- the operations: celery_dlock.protocol, performed here ---------------------

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; True on success.

        ``blocking=False`` makes exactly one attempt. Otherwise a failed attempt
        queues the caller, which then sleeps until the lock is handed to it (the
        release wakes it through its process's inbox), the holder's lease ends, or
        ``retry_delay`` passes, and tries again; see
        :class:`celery_dlock.lease.AttemptPlan` for how many attempts are made.
        """
        return self._run(protocol.acquire(self, blocking))

    def release(self, note: str | None = None) -> bool:
        """Release the lock if this object holds it; False (never a delete) otherwise.

        Renewal stops first. If Redis cannot be reached the token is kept (so a
        later release can still succeed) and :class:`LockBackendUnavailable` is
        raised; the lock then ends when its lease runs out.

        ``note`` (locks made with ``note_ttl``): left for the next holder, who
        reads it as :attr:`note`; written in the same atomic step as the release,
        and only if the lock was still ours. Without a note, the last one stays.
        """
        return self._run(protocol.release(self, note))

    def extend(self, additional_time: float, replace: bool = False) -> bool:
        """Add ``additional_time`` seconds to the remaining lease (``replace=True``: set it).

        Returns False, and marks the lock lost, if it is no longer ours. The result
        never exceeds ``max_lease`` when one was given.
        """
        return self._run(protocol.extend(self, additional_time, replace))

    def is_locked_by_anyone(self) -> bool:
        """Whether any owner holds this lock name right now (one round trip)."""
        return self._run(protocol.is_locked_by_anyone(self))

    def read_holder(self) -> str | None:
        """The token of whoever holds this lock name right now, or None (one round trip)."""
        return self._run(protocol.read_holder(self))

    def is_locked_by_me(self) -> bool:
        """Whether the lock in Redis holds this object's token (one round trip)."""
        return self._run(protocol.is_locked_by_me(self))

    def _run(self, operation: protocol.Operation[T]) -> T:
        """Perform ``operation``'s steps on this thread until it returns."""
        waiting = _Waiting()
        perform = self._performers
        try:
            done, item = protocol.advance(operation, None, None)
            while not done:
                try:
                    value = perform[item.kind](self, item, waiting)
                except BaseException as exc:  # thrown into the operation, which decides
                    done, item = protocol.advance(operation, None, exc)
                else:
                    done, item = protocol.advance(operation, value, None)
            result: T = item
            return result
        finally:
            waiting.close()

    # One method per kind of step (protocol.STEP_KINDS): how this driver performs it.

    def _now(self, step: Any, waiting: _Waiting) -> float:
        return time.monotonic()

    def _call(self, step: protocol.Call, waiting: _Waiting) -> Any:
        late = step.late
        on_late = None if late is None else (lambda reply: self._run(late(reply)))
        return run_bound(self.redis, step.script, *step.args, deadline=step.deadline, on_late=on_late)

    def _run_script(self, step: protocol.RunScript, waiting: _Waiting) -> Any:
        return run_script(self.redis, step.script, step.keys, step.args, step.deadline)

    def _command(self, step: protocol.Command, waiting: _Waiting) -> Any:
        return run_command(self.redis, *step.command, deadline=step.deadline)

    def _check_server(self, step: protocol.CheckServer, waiting: _Waiting) -> None:
        check_server(self.redis, step.deadline)

    def _listen(self, step: Any, waiting: _Waiting) -> Inbox[threading.Event]:
        return self._inbox()[1]

    def _watch(self, step: protocol.Watch, waiting: _Waiting) -> None:
        waiting.watch(self._inbox()[0], step.inbox, step.token)

    def _sleep(self, step: protocol.Sleep, waiting: _Waiting) -> None:
        waiting.sleep(step.seconds)

    def _track(self, step: Any, waiting: _Waiting) -> None:
        get_watchdog().track(self)

    def _untrack(self, step: protocol.Untrack, waiting: _Waiting) -> None:
        get_watchdog().untrack(self, wait=step.wait)

    def _retime(self, step: Any, waiting: _Waiting) -> None:
        get_watchdog().retime(self)

    def _detach(self, step: protocol.Detach, waiting: _Waiting) -> None:
        self._run(step.operation)  # a clean-up: here, before the caller goes on

    def _inbox(self) -> tuple[ReleaseNotifier, Inbox[threading.Event]]:
        """This process's notifier and inbox for this lock, cached (a forked child finds its own)."""
        generation = process_generation()
        cached = self._inbox_cache
        if cached is None or cached[0] != generation:
            notifier = notifier_for(self.redis)
            cached = self._inbox_cache = (generation, notifier, notifier.inbox(self.options.prefix))
        return cached[1], cached[2]

    # -- context manager -----------------------------------------------------------

    def __enter__(self) -> DistributedLock:
        lock: DistributedLock = self._run(protocol.enter(self))
        return lock

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._run(protocol.leave(self, exc))


#: How this driver performs each kind of step (its ``_<kind>`` method), by kind.
DistributedLock._performers = {kind: getattr(DistributedLock, "_" + kind) for kind in protocol.STEP_KINDS}
