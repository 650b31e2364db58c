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
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from celery_dlock.channel import script_channel
from celery_dlock.connection import (
    backend_error,
    first_sight,
    reject_foreign_client,
    report_eviction_policy,
)
from celery_dlock.deadline import call_before
from celery_dlock.errors import DeadlineExceeded, LockBackendUnavailable, LockError, LockNotAcquired
from celery_dlock.inbox import Inbox
from celery_dlock.keys import DEFAULT_PREFIX, LockKeys
from celery_dlock.lease import (
    CLEANUP_GRACE,
    RENEWAL_DRAIN_WAIT,
    AcquireReply,
    AttemptPlan,
    LockCore,
    check_extension,
    is_acquisition,
    process_generation,
)
from celery_dlock.notify import ReleaseNotifier, notifier_for
from celery_dlock.options import LockOptions, check_bool
from celery_dlock.scripts import EXTEND, IS_OWNER, JOIN, RELEASE, TRY, WAIT, BoundScript, Script
from celery_dlock.watchdog import get_watchdog

logger = logging.getLogger("celery_dlock")


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


class DistributedLock(LockCore):
    """A Redis lease lock with an owner token, fencing token and optional auto-renewal.

    >>> lock = DistributedLock(redis.Redis(), "reports:daily", timeout=30, auto_renewal=True)
    >>> with lock:
    ...     write_report(fence=lock.fence)
    """

    def __init__(
        self,
        redis: Any,
        lock_name: str,
        timeout: float = 30,
        retry_times: int = 0,
        retry_delay: float = 0.1,
        auto_renewal: bool = False,
        renewal_interval: float | None = None,
        blocking_timeout: float | None = None,
        on_lost: Callable[[DistributedLock], object] | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        max_lease: float | None = None,
        note_ttl: float | None = None,
    ) -> None:
        options = LockOptions.build(
            lock_name,
            timeout=timeout,
            retry_times=retry_times,
            retry_delay=retry_delay,
            auto_renewal=auto_renewal,
            renewal_interval=renewal_interval,
            blocking_timeout=blocking_timeout,
            on_lost=on_lost,
            prefix=prefix,
            max_lease=max_lease,
            note_ttl=note_ttl,
        )
        super().__init__(options)
        self.redis = check_sync_client(redis)
        self._bind_scripts(self.redis)
        self._inbox_cache: tuple[int, ReleaseNotifier, Inbox[threading.Event]] | None = None
        self._cleaned_up: str | None = None  # the token _abandon last cleaned up after

    # -- acquire -------------------------------------------------------------------

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; True on success.

        ``blocking=False`` makes exactly one attempt. Otherwise a failed attempt
        queues the caller, which then sleeps until the lock is handed to it (the
        release wakes it through its process's inbox), the holder's lease ends, or
        ``retry_delay`` passes, and tries again; see
        :class:`celery_dlock.lease.AttemptPlan` for how many attempts are made.
        """
        check_bool("blocking", blocking)
        token = self._start_attempt()
        plan = AttemptPlan(self.options, blocking, time.monotonic())
        if first_sight(self.redis):
            check_server(self.redis, plan.attempt_deadline(time.monotonic()))
        if not blocking or self._blocking_mode == TRY:
            reply = self._attempt(token, TRY, None, plan)
            return reply.acquired or reply.give_up()
        notifier, inbox = self._inbox()
        live = inbox.live_generation  # was a handover to us sure to be delivered?
        member = inbox.member(token)
        reply = self._attempt(token, JOIN, member, plan)
        if reply.acquired:
            return True
        try:
            if not plan.may_retry(time.monotonic()):
                return self._give_up(token, member, reply)
            with notifier.watch(inbox, token) as waiter:
                if live is None or inbox.live_generation != live:
                    # Queued before this process's inbox was (still) subscribed: a
                    # handover may already have happened unheard.
                    reply = self._attempt(token, WAIT, member, plan)
                while not reply.acquired:
                    wait = plan.next_wait(reply, time.monotonic())
                    if wait is None:
                        return self._give_up(token, member, reply)
                    # Woken by a release that handed the lock to us, by a lost inbox
                    # connection, or by the timer: the next attempt finds out which. It
                    # confirms a hand-over (whose lease is short) with the full lease.
                    waiter.wake.wait(wait)
                    waiter.wake.clear()
                    reply = self._attempt(token, WAIT, member, plan)
        except BaseException:
            if self._token != token:  # interrupted while waiting: leave the queue
                self._abandon(token, member)  # (and free the lock if it was just handed to us)
            raise
        return True

    def _inbox(self) -> tuple[ReleaseNotifier, Inbox[threading.Event]]:
        """This process's notifier and inbox for this lock, cached (a forked child finds its own)."""
        generation = process_generation()
        cached = self._inbox_cache
        if cached is None or cached[0] != generation:
            notifier = notifier_for(self.redis)
            cached = self._inbox_cache = (generation, notifier, notifier.inbox(self.options.prefix))
        return cached[1], cached[2]

    def _give_up(self, token: str, member: bytes, reply: AcquireReply) -> bool:
        # Leave the queue, so no release hands the lock to us, and free the lock if
        # one just did.
        self._abandon(token, member)
        return reply.give_up()

    def _leave_queue(self, member: bytes, deadline: float) -> None:
        try:
            run_command(self.redis, "ZREM", self.keys.waiters, member, deadline=deadline)
        except RedisError as exc:
            logger.debug("leaving the waiters queue of %r failed: %r", self.name, exc)

    def _attempt(self, token: str, mode: bytes, member: bytes | None, plan: AttemptPlan) -> AcquireReply:
        """One run of the acquire script; ``member``: how a blocking attempt queues (None for TRY)."""
        sent_at = time.monotonic()
        deadline = plan.attempt_deadline(sent_at)
        late = self._free_if_acquired(token)
        try:
            queue = () if member is None else (member,)
            raw = run_bound(
                self.redis,
                self._acquire_script,
                *(token, self._lease_arg, mode, *queue),
                deadline=deadline,
                on_late=late,
            )
            self._cleaned_up = None  # it may have queued us (again)
            reply = self._take_reply(raw, token, sent_at)
            if reply.acquired and self._watched:
                self._tracked = True
                get_watchdog().track(self)
            return reply
        except BaseException as exc:
            # The script may have run even though we never saw its reply (timeout,
            # interrupt): never leave a lock behind that nobody owns.
            self._abandon(token, member)
            if not isinstance(exc, RedisError):
                raise
            error = backend_error(self.redis, "acquire", self.name, exc)
            if isinstance(exc, DeadlineExceeded) or not isinstance(error, LockBackendUnavailable):
                # (No reply in time: its late reply could still take the lock for this
                # token, so this acquire ends here; see AttemptPlan.attempt_deadline.)
                raise error from exc
            error.__cause__ = exc
            return AcquireReply(acquired=False, error=error)

    def _free_if_acquired(self, token: str) -> Callable[[Any], object]:
        """What to do with an attempt's reply that came after its deadline: free the lock it took."""

        def free(reply: Any) -> None:
            if is_acquisition(reply):
                run_bound(self.redis, self._release_script, token)

        return free

    def _abandon(self, token: str, member: bytes | None) -> None:
        """Best effort, within CLEANUP_GRACE: leave the queue, free the lock if ours
        (once: a failed attempt's clean-up is not repeated when the acquire then ends)."""
        if self._cleaned_up == token:
            return
        self._cleaned_up = token
        deadline = time.monotonic() + CLEANUP_GRACE
        get_watchdog().untrack(self, wait=0)
        if member is not None:
            self._leave_queue(member, deadline)
        try:
            run_bound(self.redis, self._release_script, token, deadline=deadline)
        except Exception as exc:
            logger.debug("cleanup of lock %r after a failed acquire failed: %r", self.name, exc)
        if self._token == token:
            self._forget()

    # -- release -------------------------------------------------------------------

    def release(self, note: str | None = None) -> bool:
        """Release the lock if this object holds it; False (never a delete) otherwise.

        Renewal stops first. If Redis cannot be reached the token is kept (so a
        later release can still succeed) and :class:`LockBackendUnavailable` is
        raised; the lock then ends when its lease runs out.

        ``note`` (locks made with ``note_ttl``): left for the next holder, who
        reads it as :attr:`note`; written in the same atomic step as the release,
        and only if the lock was still ours. Without a note, the last one stays.
        """
        token = self._held_token()
        if token is None:
            return False
        started = time.monotonic()
        args = self._release_args(token, note)
        if self._tracked:
            get_watchdog().untrack(self, wait=min(self.options.timeout, RENEWAL_DRAIN_WAIT))
        deadline = max(self.operation_deadline(started), time.monotonic() + CLEANUP_GRACE)
        try:
            reply = run_bound(self.redis, self._release_script, *args, deadline=deadline)
        except RedisError as exc:
            raise backend_error(self.redis, "release", self.name, exc) from exc
        return self._finish_release(token, reply)

    # -- extend and queries ------------------------------------------------------

    def extend(self, additional_time: float, replace: bool = False) -> bool:
        """Add ``additional_time`` seconds to the remaining lease (``replace=True``: set it).

        Returns False, and marks the lock lost, if it is no longer ours. The result
        never exceeds ``max_lease`` when one was given.
        """
        lease_ms = check_extension(additional_time, replace)
        token = self._held_token()
        if token is None or self._lost:
            return False
        sent_at = time.monotonic()
        try:
            args = self._extend_args(token, lease_ms, replace)
            result = int(
                run_script(self.redis, EXTEND, [self.keys.lock], args, self.operation_deadline(sent_at))
            )
        except RedisError as exc:
            raise backend_error(self.redis, "extend", self.name, exc) from exc
        if result < 0:
            if self._mark_lost("extend found the lock expired or owned by another token"):
                get_watchdog().untrack(self, wait=0)
                self._notify_lost()
            return False
        self._extended(result, sent_at, time.monotonic())
        if self._tracked:
            get_watchdog().retime(self)  # a shorter lease: renew (or report it lost) sooner
        return True

    def is_locked_by_anyone(self) -> bool:
        """Whether any owner holds this lock name right now (one round trip)."""
        try:
            deadline = self.operation_deadline(time.monotonic())
            return bool(run_command(self.redis, "EXISTS", self.keys.lock, deadline=deadline))
        except RedisError as exc:
            raise backend_error(self.redis, "inspect", self.name, exc) from exc

    def read_holder(self) -> str | None:
        """The token of whoever holds this lock name right now, or None (one round trip)."""
        try:
            deadline = self.operation_deadline(time.monotonic())
            value = run_command(self.redis, "GET", self.keys.lock, deadline=deadline)
        except RedisError as exc:
            raise backend_error(self.redis, "inspect", self.name, exc) from exc
        return value.decode() if isinstance(value, bytes) else value

    def is_locked_by_me(self) -> bool:
        """Whether the lock in Redis holds this object's token (one round trip)."""
        token = self._held_token()
        if token is None:
            return False
        try:
            deadline = self.operation_deadline(time.monotonic())
            return bool(run_script(self.redis, IS_OWNER, [self.keys.lock], [token], deadline))
        except RedisError as exc:
            raise backend_error(self.redis, "inspect", self.name, exc) from exc

    # -- context manager -----------------------------------------------------------

    def __enter__(self) -> DistributedLock:
        held_before = self._token
        try:
            acquired = self.acquire()
        except BaseException:
            # Raised after the lock was taken (a signal handler, KeyboardInterrupt landing
            # as acquire returned): the with statement never gets the lock, so free it.
            token = self._token
            if token is not None and token != held_before:
                self._abandon(token, None)
            raise
        if not acquired:
            raise LockNotAcquired(f"could not acquire lock {self.name!r}: it is held by another owner")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.release()
        except LockError:
            if exc is None:
                raise
            # Do not hide the body's own exception behind a release failure.
            logger.exception("release of lock %r failed while handling %r", self.name, exc)
