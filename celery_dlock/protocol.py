"""The lock's protocol: every decision of acquire, wait, release, extend and the queries.

Each operation is a generator over one lock's state (:class:`~celery_dlock.lease.LockCore`):
it yields the I/O steps below and is sent each step's result (or thrown the step's
exception); its return value is the operation's. It never performs I/O and never reads
a clock (the time is a step, :data:`NOW`). A driver is a loop that performs the steps:
:class:`celery_dlock.DistributedLock` (sync) and
:class:`celery_dlock.asyncio.DistributedLock` run the same operations and differ only
in how they perform a step - a blocking call or an await, a thread's event or an
asyncio event, a clean-up run in place or as a task of its own.

What a driver must do for each step:

========================  ==================================================================
step                      perform, and send back
========================  ==================================================================
``NOW``                   the monotonic clock
``Call``                  the bound script (EVALSHA, EVAL if the server lost it) ended on
                          the step's deadline; its reply. A reply that comes after the
                          deadline goes to ``late`` (an operation to run detached)
``RunScript``             the same for a script given with its KEYS
``Command``               one plain command (ZREM, GET, EXISTS) ended on its deadline
``CheckServer``           (a client's first acquire) warn if its server evicts keys
``LISTEN``                this process's (or event loop's) inbox for the lock's prefix
``Watch``                 start listening for hand-overs to the token, until the
                          operation ends
``Sleep``                 wait until a hand-over to the watched token arrives or the
                          time passes
``TRACK`` / ``RETIME``    hand the lock to the watchdog / tell it the lease changed
``Untrack``               stop the watchdog renewing the lock, waiting up to ``wait``
                          seconds for a renewal on the wire (0: now)
``Detach``                run the clean-up operation: in place (sync), or as a task of
                          its own that a cancelled caller does not wait for (asyncio)
========================  ==================================================================

A step that fails is thrown into the operation: a Redis error, a deadline
(:class:`~celery_dlock.errors.DeadlineExceeded`), or an interruption (a signal
handler's exception, ``KeyboardInterrupt``, an asyncio cancellation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from redis.exceptions import RedisError

from celery_dlock.connection import backend_error, first_sight
from celery_dlock.errors import DeadlineExceeded, LockBackendUnavailable, LockError, LockNotAcquired
from celery_dlock.lease import (
    CLEANUP_GRACE,
    RENEWAL_DRAIN_WAIT,
    AcquireReply,
    AttemptPlan,
    LockCore,
    check_extension,
    is_acquisition,
)
from celery_dlock.options import check_bool
from celery_dlock.scripts import EXTEND, IS_OWNER, JOIN, TRY, WAIT, BoundScript, Script

logger = logging.getLogger("celery_dlock")

T = TypeVar("T")


class Step:
    """An I/O step an operation asks its driver to perform; ``kind`` names the driver's
    method that performs it (``_<kind>``)."""

    __slots__ = ()
    kind: ClassVar[str]


#: An operation: yields steps, is sent their results, returns its own result.
Operation = Generator[Step, Any, T]


class _Now(Step):
    __slots__ = ()
    kind = "now"


class _Listen(Step):
    __slots__ = ()
    kind = "listen"


class _Track(Step):
    __slots__ = ()
    kind = "track"


class _Retime(Step):
    __slots__ = ()
    kind = "retime"


NOW, LISTEN, TRACK, RETIME = _Now(), _Listen(), _Track(), _Retime()


@dataclass(slots=True)
class Call(Step):
    script: BoundScript
    args: tuple[Any, ...]
    deadline: float
    late: Callable[[Any], Operation[None]] | None = None
    kind: ClassVar[str] = "call"


@dataclass(slots=True)
class RunScript(Step):
    script: Script
    keys: list[str]
    args: list[Any]
    deadline: float
    kind: ClassVar[str] = "run_script"


@dataclass(slots=True)
class Command(Step):
    command: tuple[Any, ...]
    deadline: float
    kind: ClassVar[str] = "command"


@dataclass(slots=True)
class CheckServer(Step):
    deadline: float
    kind: ClassVar[str] = "check_server"


@dataclass(slots=True)
class Watch(Step):
    inbox: Any
    token: str
    kind: ClassVar[str] = "watch"


@dataclass(slots=True)
class Sleep(Step):
    seconds: float
    kind: ClassVar[str] = "sleep"


@dataclass(slots=True)
class Untrack(Step):
    wait: float
    kind: ClassVar[str] = "untrack"


@dataclass(slots=True)
class Detach(Step):
    operation: Operation[Any]
    kind: ClassVar[str] = "detach"


#: Every kind of step: a driver has a method ``_<kind>(step, waiting)`` for each.
STEP_KINDS = tuple(cls.kind for cls in (_Now, _Listen, _Track, _Retime, Call, RunScript, Command,
                                        CheckServer, Watch, Sleep, Untrack, Detach))  # fmt: skip


def advance(operation: Operation[Any], value: Any, error: BaseException | None) -> tuple[bool, Any]:
    """Send ``value`` (or throw ``error``) into ``operation``: (True, its result) once it
    has returned, else (False, the next step). What the operation raises propagates."""
    try:
        step = operation.send(value) if error is None else operation.throw(error)
    except StopIteration as done:
        return True, done.value
    return False, step


# -- acquire -----------------------------------------------------------------------


def acquire(lock: LockCore, blocking: bool) -> Operation[bool]:
    """Take the lock; True on success (see ``DistributedLock.acquire`` for the attempts).

    A failed blocking attempt queues the caller, which then sleeps until the lock is
    handed to it (a release wakes it through its inbox), the holder's lease ends, or
    ``retry_delay`` passes, and tries again; :class:`~celery_dlock.lease.AttemptPlan`
    decides how often. Interrupted while waiting, it leaves the queue (and frees the lock
    if it was just handed over).
    """
    check_bool("blocking", blocking)
    token = lock._start_attempt()
    now = yield NOW
    plan = AttemptPlan(lock.options, blocking, now)
    if first_sight(lock.redis):  # this client's first acquire (an in-memory test): check its server once
        yield CheckServer(plan.attempt_deadline(now))
        now = yield NOW
    if not blocking or lock._blocking_mode == TRY:
        reply = yield from attempt(lock, token, TRY, None, plan, now)
        return reply.acquired or reply.give_up()
    inbox = yield LISTEN
    live = inbox.live_generation  # was a hand-over to us sure to be delivered?
    member: bytes = inbox.member(token)
    reply = yield from attempt(lock, token, JOIN, member, plan)
    if reply.acquired:
        return True
    try:
        if not plan.may_retry((yield NOW)):
            return (yield from give_up(lock, token, member, reply))
        yield Watch(inbox, token)
        if live is None or inbox.live_generation != live:
            # Queued before the inbox was (still) subscribed: a hand-over may already
            # have happened unheard.
            reply = yield from attempt(lock, token, WAIT, member, plan)
        while not reply.acquired:
            wait = plan.next_wait(reply, (yield NOW))
            if wait is None:
                return (yield from give_up(lock, token, member, reply))
            # Woken by a release that handed the lock to us, by a lost inbox connection,
            # or by the timer: the next attempt finds out which. It confirms a hand-over
            # (whose lease is short) with the full lease.
            yield Sleep(wait)
            reply = yield from attempt(lock, token, WAIT, member, plan)
    except GeneratorExit:
        raise
    except BaseException:
        if lock._token != token:  # interrupted while waiting: leave the queue
            yield Detach(abandon(lock, token, member))
        raise
    return True


def attempt(
    lock: LockCore, token: str, mode: bytes, member: bytes | None, plan: AttemptPlan, now: float | None = None
) -> Operation[AcquireReply]:
    """One run of the acquire script; ``member``: how a blocking attempt queues (None for TRY);
    ``now``: the time, when the caller has just read it."""
    sent_at = now if now is not None else (yield NOW)
    queue = () if member is None else (member,)
    step = Call(
        lock._acquire_script,
        (token, lock._lease_arg, mode, *queue),
        plan.attempt_deadline(sent_at),
        late=lambda reply: undo_late_attempt(lock, token, member, reply),
    )
    lock._cleaned_up = None  # from now on the script may queue us (again): a clean-up is due
    try:
        raw = yield step
        reply = lock._take_reply(raw, token, sent_at)
        if reply.acquired and lock._watched:
            lock._tracked = True
            yield TRACK  # interrupted here too: the lock just taken is freed below
    except GeneratorExit:
        raise
    except RedisError as exc:
        # The script may have run though its reply was lost: never leave behind a lock
        # (or a queue entry) nobody owns.
        if isinstance(exc, DeadlineExceeded):
            # No reply in time: its late reply could still take the lock for this
            # token, so this acquire ends here (see AttemptPlan.attempt_deadline).
            yield Detach(abandon(lock, token, member))
            raise backend_error(lock.redis, "acquire", lock.name, exc) from exc
        yield from abandon(lock, token, member)  # before the next attempt with this token
        error = backend_error(lock.redis, "acquire", lock.name, exc)
        if not isinstance(error, LockBackendUnavailable):
            raise error from exc
        error.__cause__ = exc
        return AcquireReply(acquired=False, error=error)
    except BaseException:
        yield Detach(abandon(lock, token, member))
        raise
    return reply


def give_up(lock: LockCore, token: str, member: bytes, reply: AcquireReply) -> Operation[bool]:
    """Out of attempts: leave the queue, so no release hands the lock to us, and free the
    lock if one just did; then False, or the last attempt's error."""
    yield from abandon(lock, token, member)
    return reply.give_up()


def abandon(lock: LockCore, token: str, member: bytes | None) -> Operation[None]:
    """Best effort, within CLEANUP_GRACE: leave the queue, free the lock if ours (once per
    failed acquisition: its clean-up is not repeated when the acquire then ends)."""
    if lock._cleaned_up == token:
        return
    lock._cleaned_up = token
    try:
        deadline = (yield NOW) + CLEANUP_GRACE
        yield Untrack(0)
        if member is not None:
            try:
                yield Command(("ZREM", lock.keys.waiters, member), deadline)
            except RedisError as exc:
                logger.debug("leaving the waiters queue of %r failed: %r", lock.name, exc)
        try:
            yield Call(lock._release_script, (token,), deadline)
        except Exception as exc:
            logger.debug("cleanup of lock %r after a failed acquire failed: %r", lock.name, exc)
    except GeneratorExit:
        raise
    except BaseException:
        lock._cleaned_up = None  # interrupted: the clean-up the caller then detaches does it all
        raise
    if lock._token == token:
        lock._forget()


def undo_late_attempt(lock: LockCore, token: str, member: bytes | None, reply: Any) -> Operation[None]:
    """An attempt's reply came after the acquire stopped waiting for it (and cleaned up):
    free the lock if it took it, leave the queue if it queued us."""
    deadline = (yield NOW) + CLEANUP_GRACE
    if is_acquisition(reply):
        yield Call(lock._release_script, (token,), deadline)
    elif member is not None:
        yield Command(("ZREM", lock.keys.waiters, member), deadline)


# -- the context manager ---------------------------------------------------------------


def enter(lock: LockCore) -> Operation[Any]:
    """``with lock:`` / ``async with lock:``: acquire (blocking), or LockNotAcquired.

    An interruption that lands after the lock was taken (a signal handler's exception, a
    cancellation, as acquire returns) leaves the block unentered: the lock is freed.
    """
    held_before = lock._token
    try:
        acquired = yield from acquire(lock, True)
    except GeneratorExit:
        raise
    except BaseException:
        token = lock._token
        if token is not None and token != held_before:
            yield Detach(abandon(lock, token, None))
        raise
    if not acquired:
        raise LockNotAcquired(f"could not acquire lock {lock.name!r}: it is held by another owner")
    return lock


def leave(lock: LockCore, body_error: BaseException | None) -> Operation[None]:
    """The end of the block: release; a failed release never hides the body's own exception."""
    try:
        yield from release(lock, None)
    except LockError:
        if body_error is None:
            raise
        logger.exception("release of lock %r failed while handling %r", lock.name, body_error)


# -- release, extend ---------------------------------------------------------------


def release(lock: LockCore, note: str | None) -> Operation[bool]:
    """Release the lock if this object holds it; False (never a delete) otherwise.

    Renewal stops first, so no renewal reaches Redis after the release. If Redis cannot
    be reached the token is kept (a later release can still succeed); a reply that comes
    after the deadline still settles the object.
    """
    token = lock._held_token()
    if token is None:
        return False
    args = lock._release_args(token, note)
    sent = False
    try:
        started = now = yield NOW
        if lock._tracked:
            yield Untrack(min(lock.options.timeout, RENEWAL_DRAIN_WAIT))
            now = yield NOW
        deadline = max(lock.operation_deadline(started), now + CLEANUP_GRACE)
        settle = lambda reply: settle_late_release(lock, token, reply)  # noqa: E731
        step = Call(lock._release_script, args, deadline, late=settle)
        sent = True
        reply = yield step
    except GeneratorExit:
        raise
    except RedisError as exc:
        raise backend_error(lock.redis, "release", lock.name, exc) from exc
    except BaseException:
        # Interrupted before the release went out: the lock may still be renewed. The
        # release the caller asked for goes on detached (once sent, its late reply settles it).
        if not sent:
            yield Detach(release(lock, note))
        raise
    return lock._finish_release(token, reply)


def settle_late_release(lock: LockCore, token: str, reply: Any) -> Operation[None]:
    """A release's reply came after the caller stopped waiting: it settles the object."""
    try:
        lock._finish_release(token, reply)
    except Exception as exc:  # nobody awaits this release any more: say what it found
        logger.warning("%s", exc)
    return
    yield  # an operation (a generator) with no step


def extend(lock: LockCore, additional_time: float, replace: bool) -> Operation[bool]:
    """Add ``additional_time`` seconds to the remaining lease (``replace``: set it).

    False, and the lock marked lost, if it is no longer ours.
    """
    lease_ms = check_extension(additional_time, replace)
    token = lock._held_token()
    if token is None or lock._lost:
        return False
    sent_at = yield NOW
    args = lock._extend_args(token, lease_ms, replace)
    lock._extend_started(lease_ms if replace else None, sent_at)
    try:
        result = int((yield RunScript(EXTEND, [lock.keys.lock], args, lock.operation_deadline(sent_at))))
    except GeneratorExit:
        raise
    except BaseException as exc:
        # No answer (an error, the deadline, an interruption): it may have run all the same,
        # so a shortened lease stays trusted only as far as it set it.
        lock._extend_unanswered((yield NOW))
        if lock._tracked:
            yield RETIME
        if isinstance(exc, RedisError):
            raise backend_error(lock.redis, "extend", lock.name, exc) from exc
        raise
    if result < 0:
        if lock._mark_lost("extend found the lock expired or owned by another token"):
            yield Untrack(0)
            lock._notify_lost()
        return False
    lock._extended(result, sent_at, (yield NOW))
    if lock._tracked:
        yield RETIME  # a shorter lease: renew (or report it lost) sooner
    return True


# -- queries (one round trip each) ----------------------------------------------------


def is_locked_by_anyone(lock: LockCore) -> Operation[bool]:
    try:
        deadline = lock.operation_deadline((yield NOW))
        return bool((yield Command(("EXISTS", lock.keys.lock), deadline)))
    except RedisError as exc:
        raise backend_error(lock.redis, "inspect", lock.name, exc) from exc


def read_holder(lock: LockCore) -> Operation[str | None]:
    try:
        deadline = lock.operation_deadline((yield NOW))
        value = yield Command(("GET", lock.keys.lock), deadline)
    except RedisError as exc:
        raise backend_error(lock.redis, "inspect", lock.name, exc) from exc
    return value.decode() if isinstance(value, bytes) else value


def is_locked_by_me(lock: LockCore) -> Operation[bool]:
    token = lock._held_token()
    if token is None:
        return False
    try:
        deadline = lock.operation_deadline((yield NOW))
        return bool((yield RunScript(IS_OWNER, [lock.keys.lock], [token], deadline)))
    except RedisError as exc:
        raise backend_error(lock.redis, "inspect", lock.name, exc) from exc
