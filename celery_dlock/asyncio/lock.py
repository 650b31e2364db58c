"""The asyncio Redis lease lock: :class:`celery_dlock.DistributedLock`, name for name, awaitable.

Shares its state and every decision with the sync lock
(:class:`celery_dlock.lease.LockCore`); only the round trips differ.

Cancellation: the script calls run in their own tasks, shielded from the
caller's cancellation. A cancelled ``acquire`` schedules a token-checked
release of whatever it may have taken; a cancelled ``release`` keeps the token
until the call resolves, so a lock whose key still exists is never forgotten.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from celery_dlock.connection import backend_error, first_sight, reject_foreign_client, report_eviction_policy
from celery_dlock.errors import DeadlineExceeded, LockBackendUnavailable, LockError, LockNotAcquired
from celery_dlock.inbox import Inbox
from celery_dlock.keys import DEFAULT_PREFIX
from celery_dlock.lease import (
    CLEANUP_GRACE,
    RENEWAL_DRAIN_WAIT,
    AcquireReply,
    AttemptPlan,
    LockCore,
    check_extension,
    process_generation,
)
from celery_dlock.options import LockOptions, check_bool
from celery_dlock.scripts import EXTEND, IS_OWNER, JOIN, TRY, WAIT, BoundScript, Script

from .notify import AsyncReleaseNotifier, notifier_for
from .watchdog import get_watchdog

logger = logging.getLogger("celery_dlock")

# Tasks that must outlive a cancelled caller (cleanup releases), kept referenced.
_background: set[asyncio.Task[Any]] = set()


def _spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


async def within(deadline: float, call: Awaitable[Any]) -> Any:
    """``call``'s result if it ends before ``deadline`` (monotonic), else DeadlineExceeded.

    ``call`` runs as a task of its own that a deadline does not cancel (a reply on its
    way is still read; see the callers for what a late one does)."""
    task = call if isinstance(call, asyncio.Task) else _spawn(call)  # type: ignore[arg-type]
    try:
        if _timeout_at is None:  # Python 3.10
            return await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - time.monotonic()))
        # (asyncio.timeout_at costs a timer handle; wait_for, before 3.12, a task more.)
        loop_deadline = asyncio.get_running_loop().time() + (deadline - time.monotonic())
        async with _timeout_at(loop_deadline):
            return await asyncio.shield(task)
    except asyncio.TimeoutError:
        raise DeadlineExceeded("no answer from Redis before the lock operation's deadline") from None


_timeout_at: Any = getattr(asyncio, "timeout_at", None)


async def check_server(client: Any, deadline: float) -> None:
    """The asyncio twin of :func:`celery_dlock.lock.check_server`."""
    try:
        reply = await within(deadline, client.config_get("maxmemory-policy"))
    except Exception as exc:
        report_eviction_policy(client, None, exc)
    else:
        report_eviction_policy(client, reply, None)


async def run_script(client: Any, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
    """EVALSHA ``script``; EVAL it (which also caches it) if the server does not know it yet."""
    try:
        return await client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
    except NoScriptError:
        return await client.execute_command("EVAL", script.source_bytes, len(keys), *keys, *args)


async def run_bound(client: Any, script: BoundScript, *args: Any) -> Any:
    """:func:`run_script` for a script bound to its KEYS (the hot path: nothing rebuilt per call)."""
    try:
        return await client.execute_command(*script.evalsha, *args)
    except NoScriptError:
        return await client.execute_command(*script.eval, *args)


def check_async_client(client: object) -> Any:
    import redis.asyncio

    reject_foreign_client(client)
    if not isinstance(client, (redis.asyncio.Redis, redis.asyncio.RedisCluster)):
        if callable(getattr(client, "evalsha", None)):
            raise TypeError(
                "redis must be a redis.asyncio client; for a synchronous redis.Redis client use "
                f"celery_dlock.DistributedLock (got {client!r})"
            )
        raise TypeError(f"redis must be a redis.asyncio.Redis or RedisCluster client, got {client!r}")
    return client


class DistributedLock(LockCore):
    """The asyncio lock; see :class:`celery_dlock.DistributedLock` for the parameters.

    >>> async with DistributedLock(redis.asyncio.Redis(), "reports:daily", auto_renewal=True) as lock:
    ...     await write_report(fence=lock.fence)
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
        self.redis = check_async_client(redis)
        self._bind_scripts(self.redis)
        self._cleaned_up: str | None = None  # the token _abandon last cleaned up after
        self._inbox_cache: (
            tuple[asyncio.AbstractEventLoop, int, AsyncReleaseNotifier, Inbox[asyncio.Event]] | None
        ) = None

    # -- acquire -------------------------------------------------------------------

    async def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; True on success. Same attempts and waiting as the sync lock."""
        check_bool("blocking", blocking)
        token = self._start_attempt()
        plan = AttemptPlan(self.options, blocking, time.monotonic())
        if first_sight(self.redis):
            await check_server(self.redis, plan.attempt_deadline(time.monotonic()))
        if not blocking or self._blocking_mode == TRY:
            reply = await self._attempt(token, TRY, None, plan)
            return reply.acquired or reply.give_up()
        notifier, inbox = self._inbox()
        live = inbox.live_generation  # was a handover to us sure to be delivered?
        member = inbox.member(token)
        reply = await self._attempt(token, JOIN, member, plan)
        if reply.acquired:
            return True
        try:
            if not plan.may_retry(time.monotonic()):
                return await self._give_up(token, member, reply)
            async with notifier.watch(inbox, token) as waiter:
                if live is None or inbox.live_generation != live:
                    # Queued before this loop's inbox was (still) subscribed: a
                    # handover may already have happened unheard.
                    reply = await self._attempt(token, WAIT, member, plan)
                while not reply.acquired:
                    wait = plan.next_wait(reply, time.monotonic())
                    if wait is None:
                        return await self._give_up(token, member, reply)
                    # Woken by a release that handed the lock to us, by a lost inbox
                    # connection, or by the timer: the next attempt finds out which. It
                    # confirms a hand-over (whose lease is short) with the full lease.
                    try:
                        await asyncio.wait_for(waiter.wake.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
                    waiter.wake.clear()
                    reply = await self._attempt(token, WAIT, member, plan)
        except BaseException:
            if self._token != token:  # cancelled or interrupted while waiting: leave the queue
                _spawn(self._abandon(token, member))  # (and free the lock if it was just handed to us)
            raise
        return True

    def _inbox(self) -> tuple[AsyncReleaseNotifier, Inbox[asyncio.Event]]:
        """The running loop's notifier and inbox for this lock, cached per loop (and process)."""
        loop = asyncio.get_running_loop()
        generation = process_generation()
        cached = self._inbox_cache
        if cached is None or cached[0] is not loop or cached[1] != generation:
            notifier = notifier_for(self.redis)
            cached = self._inbox_cache = (loop, generation, notifier, notifier.inbox(self.options.prefix))
        return cached[2], cached[3]

    async def _give_up(self, token: str, member: bytes, reply: AcquireReply) -> bool:
        # Leave the queue, so no release hands the lock to us, and free the lock if
        # one just did.
        await self._abandon(token, member)
        return reply.give_up()

    async def _leave_queue(self, member: bytes, deadline: float) -> None:
        try:
            await within(deadline, self.redis.zrem(self.keys.waiters, member))
        except RedisError as exc:
            logger.debug("leaving the waiters queue of %r failed: %r", self.name, exc)

    async def _attempt(
        self, token: str, mode: bytes, member: bytes | None, plan: AttemptPlan
    ) -> AcquireReply:
        """One run of the acquire script; ``member``: how a blocking attempt queues (None for TRY)."""
        sent_at = time.monotonic()
        queue = () if member is None else (member,)
        call = _spawn(run_bound(self.redis, self._acquire_script, token, self._lease_arg, mode, *queue))
        try:
            raw = await within(plan.attempt_deadline(sent_at), call)
        except (asyncio.CancelledError, DeadlineExceeded) as exc:
            # The script may still run (or have run): release whatever it takes, once its
            # reply is in. No reply in time ends the acquire (see AttemptPlan.attempt_deadline).
            _spawn(self._abandon(token, member, call))
            if isinstance(exc, DeadlineExceeded):
                raise backend_error(self.redis, "acquire", self.name, exc) from exc
            raise
        except RedisError as exc:
            # Awaited, not spawned: this acquire goes on with the same token, so the
            # clean-up must be over before its next attempt.
            await self._abandon(token, member, call)
            error = backend_error(self.redis, "acquire", self.name, exc)
            if not isinstance(error, LockBackendUnavailable):
                raise error from exc
            error.__cause__ = exc
            return AcquireReply(acquired=False, error=error)
        self._cleaned_up = None  # it may have queued us (again)
        reply = self._take_reply(raw, token, sent_at)
        if reply.acquired and self._watched:
            self._tracked = True
            get_watchdog().track(self)
        return reply

    async def _abandon(self, token: str, member: bytes | None, call: Awaitable[Any] | None = None) -> None:
        """Best effort, within CLEANUP_GRACE of ``call``'s end (if given: an attempt whose
        reply is awaited first): leave the queue, free the lock if ours; once per failure."""
        if self._cleaned_up == token:
            return
        self._cleaned_up = token
        if call is not None:
            try:
                await call
            except BaseException:
                pass
        deadline = time.monotonic() + CLEANUP_GRACE
        get_watchdog().untrack_now(self)
        if member is not None:
            await self._leave_queue(member, deadline)
        try:
            await within(deadline, run_bound(self.redis, self._release_script, token))
        except Exception as exc:
            logger.debug("cleanup of lock %r after a failed acquire failed: %r", self.name, exc)
        if self._token == token:
            self._forget()

    # -- release -------------------------------------------------------------------

    async def release(self, note: str | None = None) -> bool:
        """Release the lock if this object holds it; False (never a delete) otherwise.

        ``note``: as :meth:`celery_dlock.DistributedLock.release`.
        """
        token = self._held_token()
        if token is None:
            return False
        started = time.monotonic()
        args = self._release_args(token, note)
        if self._tracked:
            await get_watchdog().untrack(self, wait=min(self.options.timeout, RENEWAL_DRAIN_WAIT))
        deadline = max(self.operation_deadline(started), time.monotonic() + CLEANUP_GRACE)
        call = _spawn(run_bound(self.redis, self._release_script, *args))
        try:
            reply = await within(deadline, call)
        except (asyncio.CancelledError, DeadlineExceeded) as exc:
            # Its reply, if one comes, still settles this object.
            call.add_done_callback(lambda done: self._released_in_background(token, done))
            if isinstance(exc, DeadlineExceeded):
                raise backend_error(self.redis, "release", self.name, exc) from exc
            raise
        except RedisError as exc:
            raise backend_error(self.redis, "release", self.name, exc) from exc
        return self._finish_release(token, reply)

    def _released_in_background(self, token: str, call: asyncio.Task[Any]) -> None:
        if call.cancelled() or call.exception() is not None:
            return  # outcome unknown: keep the token so a later release can still work
        try:
            self._finish_release(token, call.result())
        except LockError as exc:  # nobody awaits this release any more: log what it found
            logger.warning("%s", exc)

    # -- extend and queries ------------------------------------------------------

    async def extend(self, additional_time: float, replace: bool = False) -> bool:
        """Add ``additional_time`` seconds to the remaining lease (``replace=True``: set it)."""
        lease_ms = check_extension(additional_time, replace)
        token = self._held_token()
        if token is None or self._lost:
            return False
        sent_at = time.monotonic()
        try:
            args = self._extend_args(token, lease_ms, replace)
            deadline = self.operation_deadline(sent_at)
            result = int(await within(deadline, run_script(self.redis, EXTEND, [self.keys.lock], args)))
        except RedisError as exc:
            raise backend_error(self.redis, "extend", self.name, exc) from exc
        if result < 0:
            if self._mark_lost("extend found the lock expired or owned by another token"):
                get_watchdog().untrack_now(self)
                self._notify_lost()
            return False
        self._extended(result, sent_at, time.monotonic())
        if self._tracked:
            get_watchdog().retime(self)  # a shorter lease: renew (or report it lost) sooner
        return True

    async def is_locked_by_anyone(self) -> bool:
        """Whether any owner holds this lock name right now (one round trip)."""
        try:
            deadline = self.operation_deadline(time.monotonic())
            return bool(await within(deadline, self.redis.exists(self.keys.lock)))
        except RedisError as exc:
            raise backend_error(self.redis, "inspect", self.name, exc) from exc

    async def read_holder(self) -> str | None:
        """The token of whoever holds this lock name right now, or None (one round trip)."""
        try:
            value = await within(self.operation_deadline(time.monotonic()), self.redis.get(self.keys.lock))
        except RedisError as exc:
            raise backend_error(self.redis, "inspect", self.name, exc) from exc
        return value.decode() if isinstance(value, bytes) else value

    async def is_locked_by_me(self) -> bool:
        """Whether the lock in Redis holds this object's token (one round trip)."""
        token = self._held_token()
        if token is None:
            return False
        try:
            deadline = self.operation_deadline(time.monotonic())
            return bool(await within(deadline, run_script(self.redis, IS_OWNER, [self.keys.lock], [token])))
        except RedisError as exc:
            raise backend_error(self.redis, "inspect", self.name, exc) from exc

    # -- context manager -----------------------------------------------------------

    async def __aenter__(self) -> DistributedLock:
        held_before = self._token
        try:
            acquired = await self.acquire()
        except BaseException:
            # Raised after the lock was taken (see the sync lock's __enter__): free it.
            token = self._token
            if token is not None and token != held_before:
                _spawn(self._abandon(token, None))
            raise
        if not acquired:
            raise LockNotAcquired(f"could not acquire lock {self.name!r}: it is held by another owner")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.release()
        except LockError:
            if exc is None:
                raise
            logger.exception("release of lock %r failed while handling %r", self.name, exc)
