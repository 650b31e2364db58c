"""Running a task body under its lock: the heart of both :class:`LockedTask` and signal mode.

Order of events for one run in a worker:

1. Just before the body, in the process that runs it, the lock is taken
   (:meth:`Acquisition.acquire`). If another run holds it, the contention
   policy decides: skip, re-queue (retry), wait, or fail. Every such decision is
   made by the table in :mod:`celery_dlock.celery.contention`; this module carries
   it out.
2. The body runs; the core watchdog renews the lease every ``lock_timeout/3``.
3. After the body, in *every* outcome (success, exception, ``self.retry()``,
   ``Ignore``, ``Reject``), the lock is released from Celery's ``task_postrun``
   signal, which ``celery.app.trace`` sends in a ``finally`` after the result is
   stored (``after_return`` is skipped for RETRY/IGNORED/REJECTED; postrun is not).
   Releasing after the result is stored matters: a redelivered copy of the same
   message that waited for this run sees its final state and does not run again.

Two special cases:

* **A redelivered message** (the broker says so, or the message is one this
  module re-queued for that reason) never runs a body that already ended: once
  it holds the lock, it reads the task's stored state, and if the earlier
  delivery ended (SUCCESS/FAILURE/REVOKED) it is dropped, whatever the policy.
* **The holder has our own task id.** That is an earlier delivery of this very
  message (broker redelivery while it still runs, or a pool process that died
  and whose lease has not run out yet), or the earlier run of ``self.retry()``
  that has not released yet. Skipping or failing would overwrite the real run's
  result, so whatever the policy the run waits for that holder, at most
  ``lock_redelivery_wait`` seconds; if it still runs then, the message is
  re-queued with a countdown (the lock retry schedule) and this delivery ends
  without storing anything, so a long earlier run never parks a pool process
  or holds up a warm shutdown.
* **Called in-process** (``task(...)``, ``task.apply()``, ``task_always_eager``):
  there is no queue to re-publish to, so policies act in the caller: ``skip``
  raises :class:`TaskSkipped`, ``fail`` raises :class:`LockNotAcquired`,
  ``retry`` waits in the caller for the same backoff schedule (woken early by a
  release), ``wait`` waits. The lock is held for the duration of the call.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NoReturn, TypeVar

from celery import states
from celery.exceptions import Ignore
from celery.exceptions import Retry as CeleryRetry
from celery.signals import task_postrun
from celery.utils.saferepr import saferepr as safe_repr
from redis.exceptions import RedisError

from celery_dlock.celery import dedup
from celery_dlock.celery.coalesce import RunNote, call_identity, name_digest, requested_at
from celery_dlock.celery.config import redis_client_for_app
from celery_dlock.celery.contention import Decision, Outcome, Situation, decide
from celery_dlock.celery.errors import RunSkipped, TaskSkipped
from celery_dlock.celery.keyrequest import NAME_HEADER, message_header, name_for_run
from celery_dlock.celery.policies import Retry, Skip
from celery_dlock.celery.settings import TaskLockConfig
from celery_dlock.celery.signals import lock_acquired, lock_contended, lock_lost, lock_released
from celery_dlock.celery.tasklock import Owner, TaskLock
from celery_dlock.connection import backend_error
from celery_dlock.errors import LockError, LockNotAcquired
from celery_dlock.keys import LockKeys
from celery_dlock.lock import DistributedLock

logger = logging.getLogger("celery_dlock.celery")

T = TypeVar("T")

#: The runs whose lock ``task_postrun`` releases, by (task id, thread). Not kept on the
#: request: Celery may run the body on a copy of it (``Task.__call__`` pushes one, e.g.
#: when a base class's ``__call__`` calls ``super().__call__()``, and in eager mode), and
#: pops that copy before ``task_postrun``.
_active_runs: dict[tuple[str, int], ActiveRun] = {}


def _run_key(task_id: str | None) -> tuple[str, int] | None:
    return None if task_id is None else (task_id, threading.get_ident())


#: Message header counting lock retries (separate from Celery's ``retries``).
LOCK_RETRIES_HEADER = "dlock_lock_retries"
#: Message header counting how often a redelivered message was re-queued because the
#: earlier delivery of its task id still ran (also marks the copy as a redelivery).
REDELIVERIES_HEADER = "dlock_redeliveries"
#: Contention outcomes logged at INFO (the others, such as "fail", at WARNING).
ROUTINE_ACTIONS = frozenset({"skip", "retry", "wait", "wait-own", "requeue-own"})
#: Longest sleep between two attempts of a waiter that hears no release
#: notification (a notification ends the sleep at once; an expiring holder is
#: looked at again when its lease ends, whatever this says).
WAIT_POLL = 1.0

_current_lock: contextvars.ContextVar[TaskLock | None] = contextvars.ContextVar("dlock_current", default=None)


def current_lock() -> TaskLock | None:
    """The lock of the locked task body running in this thread (None outside one, or when run unlocked)."""
    return _current_lock.get()


@dataclass
class ActiveRun:
    task: Any
    config: TaskLockConfig
    lock: TaskLock
    client: Any
    acquired_at: float
    #: The call a successful run notes beside its lock (skip policy; see coalesce.py), else None.
    note_call: str | None = None
    #: Wall-clock time the body returned: the run's end for covered calls. Its result is
    #: stored (and the lock released) later, so a caller that saw the result and sends
    #: the call again is never covered by this run.
    body_ended_at: float | None = None


class _BackendDown(Exception):
    """Internal: Redis could not be reached while deciding about the lock."""

    def __init__(self, error: LockError) -> None:
        super().__init__(str(error))
        self.error = error


def run_locked(
    task: Any,
    config: TaskLockConfig,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    body: Callable[[], T],
) -> T:
    """Run ``body`` (the task body for this call) under the call's lock; see the module docstring."""
    request = task.request
    client = redis_client_for_app(task.app)
    # A body that calls its own task in-process shares the running request: that
    # inner call must behave like a direct call (never re-queue the outer message).
    run_key = _run_key(request.id)
    nested = not request.called_directly and run_key in _active_runs
    acquisition = Acquisition(task, config, client, args, kwargs, request, nested)
    held = _current_lock.get()
    if held is not None and held.keys.lock == acquisition.keys.lock:
        return body()  # a locked body calling itself with the same key: it holds the lock already
    lock = acquisition.acquire()
    if lock is None:  # Redis unreachable and lock_on_redis_error="run"
        return body()
    active = ActiveRun(task, config, lock, client, time.monotonic(), acquisition.call)
    token = _current_lock.set(lock)
    if request.called_directly or nested:
        # A plain call, or a call nested in a running body: task_postrun will not
        # release this lock (it belongs to the outer run), so release it here.
        try:
            result = body()
        except BaseException:
            _current_lock.reset(token)
            finish_run(active)
            raise
        active.body_ended_at = time.time()
        _current_lock.reset(token)
        finish_run(active, state=states.SUCCESS)
        return result
    assert run_key is not None  # a run that is not called directly has a task id
    _active_runs[run_key] = active
    try:
        return body()
    finally:
        active.body_ended_at = time.time()
        _current_lock.reset(token)


def locked_run(task_class: type, config: TaskLockConfig, signature: inspect.Signature) -> Callable[..., Any]:
    """``task_class.run``, wrapped to run under the call's lock (:func:`run_locked`).

    The lock goes around ``run``, not ``__call__``: Celery's tracer calls ``run``
    directly when a task class has no ``__call__`` of its own (a request push and pop
    less per task), and ``Task.__call__`` (a direct call) ends in ``run`` too. A
    ``run`` that is already locked (inherited from a locked parent class, or bound
    again) is unwrapped first, so a run is locked once, with this class's options.
    """
    raw = inspect.getattr_static(task_class, "run")
    raw = getattr(raw, UNLOCKED_RUN, raw)
    is_static = isinstance(raw, staticmethod)
    function = raw.__func__ if is_static else raw

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        if is_static:
            body = functools.partial(function, *args, **kwargs)
        else:
            body = functools.partial(function, self, *args, **kwargs)
        return run_locked(self, config, args, kwargs, body)

    functools.update_wrapper(run, function)
    setattr(run, UNLOCKED_RUN, raw)
    # inspect.signature(task.run) must keep showing the call's parameters (Celery's
    # retry() reads it): declare them, after the ``self`` a bound method drops.
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    run.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[self_parameter, *signature.parameters.values()]
    )
    return run


#: On a locked ``run``: the class attribute it wraps (a function, or a staticmethod).
UNLOCKED_RUN = "__dlock_unlocked_run__"


class Acquisition:
    """Takes the lock for one run, applying the contention policy when it is held."""

    def __init__(
        self,
        task: Any,
        config: TaskLockConfig,
        client: Any,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        request: Any,
        nested: bool = False,
    ) -> None:
        self.task = task
        self.config = config
        self.client = client
        self.request = request
        self.in_process = bool(request.called_directly or request.is_eager or nested)
        task_id = request.id if not request.called_directly else None
        self.task_id: str = task_id or f"direct-{uuid.uuid4().hex}"
        self.owner = Owner.current(self.task_id, request.hostname)
        self.name = name_for_run(task, config, args, kwargs, request)
        self.started = time.monotonic()
        # Skip policy: a successful run leaves a note naming its call, and a call
        # requested while that identical call was queued or running is skipped
        # (see coalesce.py).
        self.notes = isinstance(config.policy, Skip) and config.skip_covered
        self.call: str | None = None
        if self.notes and config.key.identifies_call:
            self.call = name_digest(self.name)
        elif self.notes:
            self.call = call_identity(task.name, args, kwargs)
        self.requested_at = requested_at(request) if self.call and not self.in_process else None
        self.redelivered = not self.in_process and is_redelivery(request)
        #: What the latest attempt found: who holds the lock, or why Redis could not be asked.
        self.holder: Owner | None = None
        self.cause: LockError | None = None

    @functools.cached_property
    def keys(self) -> LockKeys:
        """The keys of the lock (only some outcomes need them; the lock object has its own)."""
        return LockKeys.for_name(self.name, self.config.prefix)

    # -- the decision: contention.decide, carried out ----------------------------------

    def acquire(self) -> TaskLock | None:
        """The lock, or None to run unlocked; or the run ends here (a raised outcome).

        Attempts, and carries out what :func:`~celery_dlock.celery.contention.decide`
        makes of each attempt's :class:`~celery_dlock.celery.contention.Situation`.
        """
        lock_retries_made = 0 if self.in_process else lock_retries(self.request)
        lock, situation = self._try(Situation(in_process=self.in_process, lock_retries=lock_retries_made))
        policy = self.config.policy
        while True:
            decision = decide(policy, situation, self.config.on_redis_error, self.config.redelivery_wait)
            outcome = decision.outcome
            if outcome is Outcome.RUN:
                assert lock is not None
                return self._run(lock, situation)
            if outcome is Outcome.RUN_UNLOCKED:
                logger.warning(
                    "%s[%s] runs WITHOUT its lock %r: %s (lock_on_redis_error='run')",
                    self.task.name,
                    self.task_id,
                    self.name,
                    self.cause,
                )
                return None
            if outcome in (Outcome.WAIT, Outcome.WAIT_OWN, Outcome.RETRY_HERE):
                self._announce_wait(decision, situation)
                lock, situation = self._try(situation, decision)
                continue
            if outcome is Outcome.REQUEUE_OWN:
                self._requeue_behind_earlier_delivery()
            if outcome is Outcome.RETRY:
                self._requeue(decision, situation.lock_retries)
            if outcome is Outcome.SKIP:
                self._skip(self.holder, cause=self.cause)
            self._fail(self.holder, cause=self.cause, retries=decision.gave_up_after)

    def _try(self, situation: Situation, after: Decision | None = None) -> tuple[TaskLock | None, Situation]:
        """An attempt (after a waiting decision: for up to its wait; none if that is 0),
        and what it found: the lock, or who holds it, or that Redis is down."""
        found: dict[str, bool] = {}
        lock = None
        try:
            if after is None or after.wait:
                lock = self._attempt(after.wait if after else None)
            if lock is not None:
                found["acquired"] = True
            else:
                self.holder = self._holder()
                own = self.holder is not None and self.holder.task_id == self.task_id
                found["held_by_own_delivery"] = own and not self.in_process
        except _BackendDown as down:
            self.holder, self.cause = None, down.error
            found["redis_down"] = True
            if self.config.on_redis_error != "run":
                logger.warning(
                    "%s[%s]: cannot take lock %r (%s); treating it as held "
                    "(lock_on_redis_error='contention')",
                    self.task.name,
                    self.task_id,
                    self.name,
                    down.error,
                )
        if after is None:
            return lock, replace(situation, **found)
        return lock, situation.after(after, **found)

    def _run(self, lock: TaskLock, situation: Situation) -> TaskLock:
        """The lock is ours: unless this delivery must not run after all, the run starts."""
        if self.redelivered or situation.waited_for_own:
            self._drop_if_ended(lock)
        self._skip_if_covered(lock)
        return self._acquired(lock)

    def _announce_wait(self, decision: Decision, situation: Situation) -> None:
        if decision.outcome is Outcome.WAIT:
            self._announce(self.holder, "wait", f"waiting up to {decision.wait:g}s")
        elif decision.outcome is Outcome.WAIT_OWN:
            self._announce(
                Owner(self.task_id, "", 0),
                "wait-own",
                "an earlier delivery of this same task id holds the lock; waiting up to "
                f"{decision.wait:g}s for it to end",
            )
        elif situation.lock_retries == 0:  # RETRY_HERE: said once, at the first wait
            assert isinstance(decision.policy, Retry)
            retries = decision.policy.max_retries
            self._announce(self.holder, "retry", f"waiting in-process for up to {retries} lock retries")

    def _skip_if_covered(self, lock: TaskLock) -> None:
        """Skip this call if it was requested before the last successful run of its key ended."""
        if self.requested_at is None or self.call is None:
            return
        note = RunNote.parse(lock.note)
        if note is None or not note.covers(self.call, self.requested_at):
            return
        try:
            lock.release()  # no note: nothing ran
        except LockError as exc:
            logger.warning("could not release lock %r of a covered call (%s)", self.name, exc)
        if note.task_id == self.task_id:
            # A redelivery of a message whose run already succeeded (its ack was lost):
            # its SUCCESS is stored; storing a skip over it would be wrong.
            logger.info(
                "%s[%s] already succeeded (lock %r); not running this delivery again",
                self.task.name,
                self.task_id,
                self.name,
            )
            raise Ignore()
        self._skip(
            Owner(note.task_id, "", 0),
            reason=f"covered by task {note.task_id}, which was queued or running when this call was "
            f"requested and succeeded {note.finished_at - self.requested_at:.3f}s after that",
        )

    def _drop_if_ended(self, lock: TaskLock) -> None:
        """Drop this delivery (releasing ``lock``) if an earlier delivery of its task id already ended."""
        state = self._stored_state()
        if state not in states.READY_STATES:
            return
        logger.info(
            "%s[%s]: the earlier delivery of this task id already ended with %s; not running it again",
            self.task.name,
            self.task_id,
            state,
        )
        finish_run(ActiveRun(self.task, self.config, lock, self.client, time.monotonic()), "duplicate")
        raise Ignore()

    def _requeue_behind_earlier_delivery(self) -> NoReturn:
        """Publish this message again with a countdown and end this delivery, storing nothing.

        Storing anything (RETRY, a skip) would overwrite the state of the earlier
        delivery, which still runs; ``Ignore`` acknowledges this delivery.
        """
        requeues = _header_count(self.request, REDELIVERIES_HEADER)
        countdown = self.config.redelivery_backoff.countdown_for(requeues)
        headers = self._requeue_headers()
        headers[REDELIVERIES_HEADER] = requeues + 1
        signature = self.task.signature_from_request(
            self.request, countdown=countdown, retries=self.request.retries, headers=headers
        )
        with dedup.publishing_internally():
            signature.apply_async()
        self._announce(
            Owner(self.task_id, "", 0),
            "requeue-own",
            f"the earlier delivery of this task id still holds lock {self.name!r} after "
            f"{self.config.redelivery_wait:g}s; re-queued this delivery to run in {countdown:.2f}s "
            "if that one has not ended by then",
        )
        raise Ignore()

    # -- outcomes -------------------------------------------------------------------------

    def _acquired(self, lock: TaskLock) -> TaskLock:
        # A run that got its lock starts a fresh count of lock retries, so a later
        # self.retry() message does not inherit this run's count.
        for header in (LOCK_RETRIES_HEADER, REDELIVERIES_HEADER):
            self.request.__dict__.pop(header, None)
            if isinstance(self.request.headers, dict):
                self.request.headers.pop(header, None)
        waited = time.monotonic() - self.started
        if self.config.dedup_on_publish and not self.in_process:
            dedup.drop_queued(self.client, self.keys, self.task_id)  # hand the marker over to the run lock
        logger.debug(
            "%s[%s] acquired lock %r (fence %s) after %.3fs",
            self.task.name,
            self.task_id,
            self.name,
            lock.fence,
            waited,
        )
        lock_acquired.send(
            sender=self.task, task_id=self.task_id, key=self.name, fence=lock.fence, waited=waited
        )
        return lock

    def _skip(
        self, holder: Owner | None, cause: LockError | None = None, reason: str | None = None
    ) -> NoReturn:
        who = f"task {holder.task_id}" if holder else "another owner"
        if reason is None:
            reason = f"Redis unreachable: {cause}" if cause else f"lock {self.name!r} is held by {who}"
        message = f"skipped {self.task.name}[{self.task_id}]: {reason}"
        self._announce(holder, "skip", reason)
        exc = TaskSkipped(message, holder.task_id if holder else None, self.name)
        if self.in_process:
            raise exc from cause
        self._drop_marker()
        # Store the outcome ourselves and end with Ignore (RunSkipped), so the worker does
        # not log a duplicate that was meant to go as an error; the worker's main process
        # then sends the one terminal event that matches what is stored.
        store = not _ignores_result(self.task, self.request) or bool(self.task.store_errors_even_if_ignored)
        if self.config.skip_state == "revoked":
            # REVOKED: get() raises TaskRevokedError; like a revoke, no errbacks.
            self.task.backend.mark_as_revoked(
                self.task_id, message, request=self.request, store_result=store, state=states.REVOKED
            )
        else:
            # FAILURE holding TaskSkipped (get() raises it at once); link_error runs.
            self.task.backend.mark_as_failure(
                self.task_id, exc, request=self.request, store_result=store, call_errbacks=True
            )
        raise RunSkipped(message, self.config.skip_state, safe_repr(exc))

    def _fail(
        self, holder: Owner | None, cause: LockError | None = None, retries: int | None = None
    ) -> NoReturn:
        who = f"task {holder.task_id}" if holder else "another owner"
        if cause is not None:
            reason = f"cannot reach Redis to take lock {self.name!r}: {cause}"
        else:
            reason = f"lock {self.name!r} is held by {who}"
        if retries is not None:
            reason += f" (gave up after {retries} lock retries)"
        self._announce(holder, "fail", reason)
        if not self.in_process:
            self._drop_marker()
        raise LockNotAcquired(f"{self.task.name}[{self.task_id}]: {reason}") from cause

    def _requeue(self, decision: Decision, attempt: int) -> NoReturn:
        """A lock retry: publish this message again with the decided countdown, and end this run."""
        policy = decision.policy
        assert isinstance(policy, Retry) and policy.max_retries is not None
        countdown = decision.wait
        headers = self._requeue_headers()
        headers[LOCK_RETRIES_HEADER] = attempt + 1
        signature = self.task.signature_from_request(
            self.request, countdown=countdown, retries=self.request.retries, headers=headers
        )
        if self.config.dedup_on_publish:
            dedup.remark_queued(self.client, self.keys, self.task_id, self.config.dedup_timeout + countdown)
        holder, cause = self.holder, self.cause
        who = f"task {holder.task_id}" if holder else "another owner"
        reason = f"Redis unreachable: {cause}" if cause else f"lock {self.name!r} is held by {who}"
        with dedup.publishing_internally():
            signature.apply_async()
        progress = f"lock retry {attempt + 1}/{policy.max_retries}"
        self._announce(holder, "retry", f"{reason}; {progress} in {countdown:.2f}s")
        exc = LockNotAcquired(f"{self.task.name}[{self.task_id}]: {reason}")
        raise CeleryRetry(progress, exc=exc, when=countdown)

    # -- I/O helpers -----------------------------------------------------------------------

    def _attempt(self, wait: float | None) -> TaskLock | None:
        """One attempt (``wait`` None/0) or attempts for up to ``wait`` seconds, woken on release."""
        lock = TaskLock(
            self.client,
            self.name,
            owner=self.owner,
            timeout=self.config.timeout,
            auto_renewal=True,
            retry_delay=WAIT_POLL,
            blocking_timeout=wait if wait else None,
            on_lost=_report_lost(self.task, self.task_id),
            prefix=self.config.prefix,
            note_ttl=self.config.dedup_timeout if self.notes else None,
        )
        try:
            acquired = lock.acquire(blocking=bool(wait))
        except LockError as exc:
            raise _BackendDown(exc) from exc
        return lock if acquired else None

    def _holder(self) -> Owner | None:
        try:
            return Owner.parse(self.client.get(self.keys.lock))
        except RedisError as exc:
            raise _BackendDown(backend_error(self.client, "inspect", self.name, exc)) from exc

    def _stored_state(self) -> str | None:
        try:
            return str(self.task.AsyncResult(self.task_id).state)
        except Exception as exc:  # no result backend, or it is down: we cannot tell, so run
            logger.debug("cannot read the state of %s: %r", self.task_id, exc)
            return None

    def _requeue_headers(self) -> dict[str, Any]:
        """The headers of a re-queued copy of this message: the same ones, with the decided lock name."""
        headers = dict(self.request.headers or {})
        if self.config.key.wants_request:
            headers[NAME_HEADER] = self.name
        return headers

    def _drop_marker(self) -> None:
        if self.config.dedup_on_publish:
            dedup.drop_queued(self.client, self.keys, self.task_id)

    def _announce(self, holder: Owner | None, action: str, reason: str) -> None:
        level = logging.INFO if action in ROUTINE_ACTIONS else logging.WARNING
        logger.log(level, "%s[%s]: %s -> %s", self.task.name, self.task_id, reason, action)
        lock_contended.send(
            sender=self.task,
            task_id=self.task_id,
            key=self.name,
            holder=holder.task_id if holder else None,
            action=action,
            reason=reason,
        )


def lock_retries(request: Any) -> int:
    """How many times this message was already re-queued because its lock was held."""
    return _header_count(request, LOCK_RETRIES_HEADER)


def is_redelivery(request: Any) -> bool:
    """Whether this message may have run before: the broker redelivered it, or we re-queued it as such."""
    delivery_info = getattr(request, "delivery_info", None) or {}
    if delivery_info.get("redelivered"):
        return True
    return message_header(request, REDELIVERIES_HEADER) is not None


def _header_count(request: Any, name: str) -> int:
    try:
        return max(0, int(message_header(request, name) or 0))
    except (TypeError, ValueError):
        return 0


def _ignores_result(task: Any, request: Any) -> bool:
    """Whether Celery stores no result for this run: what its tracer decides."""
    try:  # Celery 5.4+: the request may override the task's ignore_result
        from celery.app.task import get_actual_ignore_result
    except ImportError:  # Celery 5.3: the task's option alone decides
        return bool(task.ignore_result)
    return bool(get_actual_ignore_result(task, request))


def _report_lost(task: Any, task_id: str) -> Callable[[DistributedLock], None]:
    def on_lost(lock: DistributedLock) -> None:
        reason = lock.lost_reason
        logger.warning(
            "%s[%s] LOST its lock %r (fence %s): %s", task.name, task_id, lock.name, lock.fence, reason
        )
        lock_lost.send(sender=task, task_id=task_id, key=lock.name, fence=lock.fence, reason=reason)

    return on_lost


def finish_run(
    active: ActiveRun, reason: str = "finished", state: str | None = None, retval: Any = None
) -> None:
    """Release a run's lock (after its result is stored); never raises."""
    lock = active.lock
    task_id = lock.owner.task_id
    config = active.config
    if state == states.RETRY and config.dedup_on_publish:
        # self.retry() queued this id again: mark it queued *before* the release, so
        # a publisher never sees neither the lock nor the marker in between.
        when = getattr(retval, "when", None)
        delay = float(when) if isinstance(when, (int, float)) else 0.0
        dedup.remark_queued(active.client, lock.keys, task_id, config.dedup_timeout + delay)
    fence = lock.fence
    note = None
    if active.note_call is not None and state == states.SUCCESS:
        ended = active.body_ended_at if active.body_ended_at is not None else time.time()
        note = RunNote(ended, active.note_call, task_id).text()
    try:
        released = lock.release(note=note)
    except LockError as exc:
        logger.warning(
            "could not release lock %r of %s[%s] (%s); it ends when its lease runs out",
            lock.name,
            active.task.name,
            task_id,
            exc,
        )
        released = False
    held = time.monotonic() - active.acquired_at
    logger.debug(
        "%s[%s] released lock %r (fence %s) after %.3fs%s",
        active.task.name,
        task_id,
        lock.name,
        fence,
        held,
        "" if released else " (it had been lost)",
    )
    lock_released.send(
        sender=active.task, task_id=task_id, key=lock.name, fence=fence, released=released, reason=reason
    )


def _release_after_run(
    sender: Any = None,
    task_id: str | None = None,
    task: Any = None,
    state: str | None = None,
    retval: Any = None,
    **_: Any,
) -> None:
    task = task if task is not None else sender
    if task is None:
        return
    active = _active_runs.pop(_run_key(task_id or task.request.id), None)  # type: ignore[arg-type]
    if active is not None:
        finish_run(active, "finished", state, retval)


task_postrun.connect(_release_after_run, weak=False)
