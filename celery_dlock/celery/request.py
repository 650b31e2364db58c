"""The worker's main process frees the lock of a pool process that died mid-task.

When a pool child is SIGKILLed (OOM killer, ``kill -9``), hits the hard time
limit, or is ended by ``revoke(terminate=True)``, no code runs in the child
after that, so its ``finally`` and ``task_postrun`` never release the lock.
The worker's main process does learn about it: billiard reports the job as
failed with ``WorkerLostError``/``Terminated``/``TimeLimitExceeded`` and Celery
calls the request's ``on_failure`` (and ``on_timeout``) *in the main process*.

Celery lets a task choose its request class (``Task.Request``). Ours, built on
whatever class the task used before, releases the lock there: it recomputes the
lock name from the request's arguments and deletes the lock only if its token
says it is held by exactly this task id, node and child pid
(:func:`celery_dlock.lock.release_by_token_suffix`). It first makes sure
the child is really gone (a hard time limit is reported just *before* billiard
kills the child), polling for up to ``lock_timeout`` in a small thread.

Celery may take seconds to notice a dead pool process (see :class:`ChildWatch`),
so the request class also starts a watcher that looks at the processes of the
active locked requests, and releases as soon as one is gone. A request ended by
``revoke(terminate=True)`` leaves the active set at once, so its ``terminate``
hands it to the same wait-until-gone release. If the whole
worker dies instead, the lease simply runs out, ``lock_timeout`` after the last
renewal.

Release happens before Celery's own handling (which may requeue an ``acks_late``
message), so the redelivered message finds the lock free.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from billiard.einfo import ExceptionWithTraceback  # type: ignore[import-untyped]
from celery.exceptions import Terminated, TimeLimitExceeded, WorkerLostError
from celery.worker.request import Request

from celery_dlock.celery.config import redis_client_for_app
from celery_dlock.celery.errors import RunSkipped
from celery_dlock.celery.keyrequest import name_for_run
from celery_dlock.celery.signals import lock_released
from celery_dlock.celery.tasklock import Owner, release_owned_by
from celery_dlock.keys import LockKeys

logger = logging.getLogger("celery_dlock.celery")

#: Failures reported by the main process that mean the pool process is gone (or being killed).
PROCESS_ENDED = (WorkerLostError, Terminated, TimeLimitExceeded, SystemExit, KeyboardInterrupt)
POLL_INTERVAL = 0.1


def process_gone(pid: int) -> bool:
    """Whether our child ``pid`` has exited (a zombie counts as exited; it runs no code)."""
    waitid = getattr(os, "waitid", None)
    if waitid is not None:
        try:
            return waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True  # already reaped by billiard
        except OSError:
            pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def release_abandoned(request: Any, exc: BaseException) -> None:
    """Release the lock held by the (dead or dying) pool process that ran ``request``."""
    task = request.task
    config = getattr(task, "_dlock_config", None)
    pid = getattr(request, "worker_pid", None)
    if config is None or not pid or pid == os.getpid():
        return  # not a locked task, never started, or ran in this process (threads/solo pools)
    if getattr(request, "_dlock_abandoned", False):
        return  # the watcher and Celery's failure handler may both report one death
    request._dlock_abandoned = True
    try:
        name = name_for_run(task, config, request.args or (), request.kwargs or {}, request)
    except Exception as error:
        logger.warning("cannot compute the lock of %s[%s] to release it: %r", task.name, request.id, error)
        return
    owner = Owner(str(request.id), str(request.hostname), int(pid))
    keys = LockKeys.for_name(name, config.prefix)
    reason = f"pool process {pid} ended ({type(exc).__name__})"
    if process_gone(pid):
        _release(task, keys, name, owner, reason)
        return
    deadline = time.monotonic() + config.timeout

    def release_when_gone() -> None:
        while time.monotonic() < deadline:
            if process_gone(pid):
                _release(task, keys, name, owner, reason)
                return
            time.sleep(POLL_INTERVAL)
        logger.warning(
            "pool process %s of %s[%s] is still alive %.1fs after %r; leaving its lock %r to its lease",
            pid,
            task.name,
            request.id,
            config.timeout,
            exc,
            name,
        )

    threading.Thread(target=release_when_gone, name="celery-dlock-abandoned", daemon=True).start()


def _release(task: Any, keys: LockKeys, name: str, owner: Owner, reason: str) -> None:
    try:
        released = release_owned_by(redis_client_for_app(task.app), keys, owner)
    except Exception as error:
        logger.warning(
            "could not release lock %r of %s[%s] (%s): %r", name, task.name, owner.task_id, reason, error
        )
        return
    if released:
        logger.warning("released lock %r of %s[%s]: %s", name, task.name, owner.task_id, reason)
    lock_released.send(
        sender=task, task_id=owner.task_id, key=name, fence=None, released=released, reason=reason
    )


class ChildWatch:
    """A main-process thread that notices within ``POLL_INTERVAL`` that a pool process died.

    Celery itself may learn of a dead pool process only seconds later (it relies
    on the process sentinel, which another pool process can keep open, and on a
    5 s maintenance timer). Started by the first locked request accepted, the
    thread looks every ``POLL_INTERVAL`` at the worker's active requests (Celery's
    own set, so accepting a request costs nothing more here): when the process of
    a locked one is gone, its lock is released at once (the ``on_failure`` path
    then finds nothing left).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def ensure_started(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="celery-dlock-childwatch", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        from celery.worker.state import active_requests

        own_pid = os.getpid()
        while True:
            time.sleep(POLL_INTERVAL)
            try:
                active = list(active_requests)
            except RuntimeError:  # the set changed while we copied it: look again next time
                continue
            for request in active:
                try:
                    pid = getattr(request, "worker_pid", None)
                    if not pid or pid == own_pid or getattr(request.task, "_dlock_config", None) is None:
                        continue
                    if process_gone(pid):
                        release_abandoned(request, WorkerLostError(f"pool process {pid} exited"))
                except Exception:  # never let the watcher die
                    logger.exception("celery-dlock: checking the pool process of %r failed", request)


_child_watch = ChildWatch()


def _fresh_watch_in_child() -> None:
    global _child_watch
    _child_watch = ChildWatch()


os.register_at_fork(after_in_child=_fresh_watch_in_child)


_classes: dict[type, type] = {}
_classes_lock = threading.Lock()


def locked_request_class(base: type) -> type:
    """A subclass of the request class ``base`` that frees locks of dead pool processes."""
    with _classes_lock:
        existing = _classes.get(base)
        if existing is not None:
            return existing

        class LockedRequest(base):  # type: ignore[misc]
            releases_abandoned_locks = True

            def on_failure(
                self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
            ) -> Any:
                exc = exc_info.exception
                if isinstance(exc, ExceptionWithTraceback):
                    exc = exc.exc
                if isinstance(exc, PROCESS_ENDED):
                    release_abandoned(self, exc)
                if isinstance(exc, RunSkipped):
                    # Celery sends no event for an Ignore: send the terminal one the stored state implies.
                    if exc.state == "revoked":
                        self.send_event("task-revoked", terminated=False, signum=None, expired=False)
                    else:
                        self.send_event("task-failed", exception=exc.exception, traceback="")
                return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

            def on_accepted(self, pid: int, time_accepted: float) -> Any:
                _child_watch.ensure_started()
                return super().on_accepted(pid, time_accepted)

            def terminate(self, pool: Any, signal: Any = None) -> Any:
                # revoke(terminate=True) of a running request: Celery marks it done at once
                # (the watcher no longer sees it) and may report the death seconds later.
                running = bool(self.time_start and self.worker_pid)
                result = super().terminate(pool, signal)
                if running:
                    release_abandoned(self, Terminated(signal))  # once the process is gone
                return result

            def on_timeout(self, soft: bool, timeout: float) -> Any:
                result = super().on_timeout(soft, timeout)
                if not soft:
                    release_abandoned(self, TimeLimitExceeded(timeout))
                return result

        LockedRequest.__qualname__ = LockedRequest.__name__ = f"Locked{base.__name__}"
        _classes[base] = LockedRequest
        return LockedRequest


#: The request class of :class:`celery_dlock.celery.LockedTask` (``Task.Request``).
LockedRequest = locked_request_class(Request)
