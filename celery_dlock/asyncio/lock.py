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
from celery_dlock.connection import reject_foreign_client, report_eviction_policy
from celery_dlock.errors import DeadlineExceeded
from celery_dlock.inbox import Inbox
from celery_dlock.lease import (
    LockCore,
    process_generation,
)
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

    _check_client = staticmethod(check_async_client)

    _performers: dict[str, Callable[..., Any]]

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
        perform = self._performers
        try:
            done, item = protocol.advance(operation, None, None)
            while not done:
                try:
                    value = await perform[item.kind](self, item, waiting)
                except BaseException as exc:  # thrown into the operation, which decides
                    done, item = protocol.advance(operation, None, exc)
                else:
                    done, item = protocol.advance(operation, value, None)
            result: T = item
            return result
        finally:
            await waiting.close()

    # One method per kind of step (protocol.STEP_KINDS): how this driver performs it.

    async def _now(self, step: Any, waiting: _Waiting) -> float:
        return time.monotonic()

    async def _call(self, step: protocol.Call, waiting: _Waiting) -> Any:
        # In a task of its own, which neither the deadline nor a cancelled caller stops:
        # a reply on its way is still read, and a late one goes to step.late.
        call = _spawn(run_bound(self.redis, step.script, *step.args))
        try:
            return await within(step.deadline, call)
        except (asyncio.CancelledError, DeadlineExceeded):
            if step.late is not None:
                call.add_done_callback(functools.partial(self._late_reply, step.late))
            raise

    async def _run_script(self, step: protocol.RunScript, waiting: _Waiting) -> Any:
        return await within(step.deadline, run_script(self.redis, step.script, step.keys, step.args))

    async def _command(self, step: protocol.Command, waiting: _Waiting) -> Any:
        return await within(step.deadline, self.redis.execute_command(*step.command))

    async def _check_server(self, step: protocol.CheckServer, waiting: _Waiting) -> None:
        await check_server(self.redis, step.deadline)

    async def _listen(self, step: Any, waiting: _Waiting) -> Inbox[asyncio.Event]:
        return self._inbox()[1]

    async def _watch(self, step: protocol.Watch, waiting: _Waiting) -> None:
        await waiting.watch(self._inbox()[0], step.inbox, step.token)

    async def _sleep(self, step: protocol.Sleep, waiting: _Waiting) -> None:
        await waiting.sleep(step.seconds)

    async def _track(self, step: Any, waiting: _Waiting) -> None:
        get_watchdog().track(self)

    async def _untrack(self, step: protocol.Untrack, waiting: _Waiting) -> None:
        await get_watchdog().untrack(self, wait=step.wait)

    async def _retime(self, step: Any, waiting: _Waiting) -> None:
        get_watchdog().retime(self)

    async def _detach(self, step: protocol.Detach, waiting: _Waiting) -> None:
        _spawn(self._run(step.operation))  # a clean-up a cancelled caller does not wait for

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
        lock: DistributedLock = await self._run(protocol.enter(self))
        return lock

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._run(protocol.leave(self, exc))


#: How this driver performs each kind of step (its ``_<kind>`` method), by kind.
DistributedLock._performers = {kind: getattr(DistributedLock, "_" + kind) for kind in protocol.STEP_KINDS}
