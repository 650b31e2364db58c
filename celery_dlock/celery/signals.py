"""Celery signals sent by celery-dlock, so you can count lock events and alert on them.

Connect like any Celery signal::

    from celery_dlock.celery.signals import lock_contended

    @lock_contended.connect
    def count(sender, task_id, key, holder, action, **kwargs):
        statsd.incr(f"dlock.contended.{action}")

``sender`` is always the task. Every signal also has a log line on the
``celery_dlock.celery`` logger (acquired/released: DEBUG, contended: INFO, lost
and abandoned releases: WARNING). Like all Celery signals, exceptions raised by
receivers are logged and swallowed: a receiver cannot change what the lock does.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

#: The run took its lock. Arguments: ``task_id``, ``key``, ``fence`` (int),
#: ``waited`` (seconds spent before the lock was taken).
lock_acquired = Signal(name="lock_acquired")

#: The run found its lock held. Arguments: ``task_id``, ``key``, ``holder``
#: (task id of the holder, or None), ``action`` (what happens now: ``"skip"``,
#: ``"retry"``, ``"wait"``, ``"fail"``; ``"wait-own"`` when the holder is an
#: earlier delivery of this same task id, and ``"requeue-own"`` when that one
#: still runs after ``lock_redelivery_wait``), ``reason`` (text).
lock_contended = Signal(name="lock_contended")

#: The lock was found lost while the task ran (renewal failed, or the lease ran
#: out). Sent from the renewal thread. Arguments: ``task_id``, ``key``,
#: ``fence``, ``reason``.
lock_lost = Signal(name="lock_lost")

#: The lock was released. Arguments: ``task_id``, ``key``, ``fence`` (None when
#: released by the worker's main process for a pool process that died),
#: ``released`` (False if it had already expired or been taken over),
#: ``reason`` (``"finished"``, or why the main process released it).
lock_released = Signal(name="lock_released")

__all__ = ["lock_acquired", "lock_contended", "lock_lost", "lock_released"]
