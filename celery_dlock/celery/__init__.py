"""Celery integration of celery-dlock (requires ``pip install celery-dlock[celery]``).

* :class:`LockedTask`: ``@app.task(base=LockedTask, lock_key=..., on_contention=...)``.
* :func:`install`: the same locking for tasks with another base class (signal mode).
* Policies for ``on_contention``: :class:`Skip`, :class:`Retry`, :class:`Wait`, :class:`Fail`.
* :func:`current_lock`: the lock of the running task body (``self.lock`` in LockedTask).
* :func:`queued_markers`, :func:`clear_queued_marker`: see and clear ``dedup_on_publish`` markers.
* Signals: :mod:`celery_dlock.celery.signals`.

See docs/celery.md.
"""

import celery_dlock.celery.compat  # noqa: F401 (first: refuses a Celery this layer cannot work with)
from celery_dlock.celery.dedup import QueuedMarker, clear_queued_marker, queued_markers
from celery_dlock.celery.errors import LockStoreNotConfigured, TaskSkipped
from celery_dlock.celery.install import install
from celery_dlock.celery.keyrequest import LockKeyRequest
from celery_dlock.celery.policies import Fail, Retry, Skip, Wait
from celery_dlock.celery.runner import current_lock
from celery_dlock.celery.signals import lock_acquired, lock_contended, lock_lost, lock_released
from celery_dlock.celery.task import LockedTask
from celery_dlock.celery.tasklock import TaskLock

__all__ = [
    "Fail",
    "LockKeyRequest",
    "LockStoreNotConfigured",
    "LockedTask",
    "QueuedMarker",
    "Retry",
    "Skip",
    "TaskLock",
    "TaskSkipped",
    "Wait",
    "clear_queued_marker",
    "current_lock",
    "install",
    "lock_acquired",
    "lock_contended",
    "lock_lost",
    "lock_released",
    "queued_markers",
]
