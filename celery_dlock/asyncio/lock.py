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
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, TypeVar

from redis.exceptions import NoScriptError

from celery_dlock import protocol
from celery_dlock.connection import first_sight, reject_foreign_client, report_eviction_policy
from celery_dlock.errors import DeadlineExceeded, LockError, LockNotAcquired
from celery_dlock.inbox import Inbox
from celery_dlock.keys import DEFAULT_PREFIX
from celery_dlock.lease import (
    LockCore,
    process_generation,
)
from celery_dlock.options import LockOptions
from celery_dlock.scripts import BoundScript, Script

from .notify import AsyncReleaseNotifier, notifier_for
from .watchdog import get_watchdog

logger = logging.getLogger("celery_dlock")

T = TypeVar("T")

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


class _Waiting:
    """An asyncio operation's listening for hand-overs to its token (protocol's Watch and Sleep)."""

    def __init__(self) -> None:
        self._watch: Any = None
        self._waiter: Any = None

    async def watch(self, notifier: AsyncReleaseNotifier, inbox: Inbox[asyncio.Event], token: str) -> None:
        self._watch = notifier.watch(inbox, token)
        self._waiter = await self._watch.__aenter__()

    async def sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._waiter.wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        self._waiter.wake.clear()

    async def close(self) -> None:
        if self._watch is not None:
            watch, self._watch = self._watch, None
            await watch.__aexit__(None, None, None)


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
        self._inbox_cache: (
            tuple[asyncio.AbstractEventLoop, int, AsyncReleaseNotifier, Inbox[asyncio.Event]] | None
        ) = None

    # -- the operations: celery_dlock.protocol, performed here ---------------------

    async def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; True on success. Same attempts and waiting as the sync lock."""
        return await self._run(protocol.acquire(self, blocking))

    async def release(self, note: str | None = None) -> bool:
        """Release the lock if this object holds it; False (never a delete) otherwise.

        ``note``: as :meth:`celery_dlock.DistributedLock.release`.
        """
        return await self._run(protocol.release(self, note))

    async def extend(self, additional_time: float, replace: bool = False) -> bool:
        """Add ``additional_time`` seconds to the remaining lease (``replace=True``: set it)."""
        return await self._run(protocol.extend(self, additional_time, replace))

    async def is_locked_by_anyone(self) -> bool:
        """Whether any owner holds this lock name right now (one round trip)."""
        return await self._run(protocol.is_locked_by_anyone(self))

    async def read_holder(self) -> str | None:
        """The token of whoever holds this lock name right now, or None (one round trip)."""
        return await self._run(protocol.read_holder(self))

    async def is_locked_by_me(self) -> bool:
        """Whether the lock in Redis holds this object's token (one round trip)."""
        return await self._run(protocol.is_locked_by_me(self))

    async def _run(self, operation: protocol.Operation[T]) -> T:
        """Perform ``operation``'s steps in this task until it returns."""
        waiting = _Waiting()
        try:
            value: Any = None
            error: BaseException | None = None
            while True:
                try:
                    step = operation.send(value) if error is None else operation.throw(error)
                except StopIteration as done:
                    result: T = done.value
                    return result
                value, error = None, None
                try:
                    value = await self._perform(step, waiting)
                except BaseException as exc:
                    error = exc
        finally:
            await waiting.close()

    async def _perform(self, step: protocol.Step, waiting: _Waiting) -> Any:
        kind = type(step)
        if step is protocol.NOW:
            return time.monotonic()
        if kind is protocol.Call:
            assert isinstance(step, protocol.Call)
            # In a task of its own, which neither the deadline nor a cancelled caller stops:
            # a reply on its way is still read, and a late one goes to step.late.
            call = _spawn(run_bound(self.redis, step.script, *step.args))
            try:
                return await within(step.deadline, call)
            except (asyncio.CancelledError, DeadlineExceeded):
                if step.late is not None:
                    call.add_done_callback(functools.partial(self._late_reply, step.late))
                raise
        if kind is protocol.RunScript:
            assert isinstance(step, protocol.RunScript)
            return await within(step.deadline, run_script(self.redis, step.script, step.keys, step.args))
        if kind is protocol.Command:
            assert isinstance(step, protocol.Command)
            return await within(step.deadline, self.redis.execute_command(*step.command))
        if kind is protocol.CheckServer:
            assert isinstance(step, protocol.CheckServer)
            if first_sight(self.redis):
                await check_server(self.redis, step.deadline)
            return None
        if step is protocol.LISTEN:
            return self._inbox()[1]
        if kind is protocol.Watch:
            assert isinstance(step, protocol.Watch)
            await waiting.watch(self._inbox()[0], step.inbox, step.token)
            return None
        if kind is protocol.Sleep:
            assert isinstance(step, protocol.Sleep)
            await waiting.sleep(step.seconds)
            return None
        if step is protocol.TRACK:
            get_watchdog().track(self)
            return None
        if kind is protocol.Untrack:
            assert isinstance(step, protocol.Untrack)
            if step.wait:
                await get_watchdog().untrack(self, wait=step.wait)
            else:
                get_watchdog().untrack_now(self)
            return None
        if step is protocol.RETIME:
            get_watchdog().retime(self)
            return None
        if kind is protocol.Detach:
            assert isinstance(step, protocol.Detach)
            _spawn(self._run(step.operation))  # a clean-up a cancelled caller does not wait for
            return None
        raise TypeError(f"unknown step {step!r}")

    def _late_reply(self, late: Callable[[Any], protocol.Operation[None]], call: asyncio.Task[Any]) -> None:
        if not call.cancelled() and call.exception() is None:
            _spawn(self._run(late(call.result())))

    def _inbox(self) -> tuple[AsyncReleaseNotifier, Inbox[asyncio.Event]]:
        """The running loop's notifier and inbox for this lock, cached per loop (and process)."""
        loop = asyncio.get_running_loop()
        generation = process_generation()
        cached = self._inbox_cache
        if cached is None or cached[0] is not loop or cached[1] != generation:
            notifier = notifier_for(self.redis)
            cached = self._inbox_cache = (loop, generation, notifier, notifier.inbox(self.options.prefix))
        return cached[2], cached[3]

    # -- context manager -----------------------------------------------------------

    async def __aenter__(self) -> DistributedLock:
        held_before = self._token
        try:
            acquired = await self.acquire()
        except BaseException:
            # Raised after the lock was taken (see the sync lock's __enter__): free it.
            token = self._token
            if token is not None and token != held_before:
                _spawn(self._run(protocol.abandon(self, token, None)))
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
