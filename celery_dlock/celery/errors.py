"""Exceptions of the Celery layer.

They travel through the result backend (JSON: type, module and ``args``), so
each one keeps every constructor argument in ``args`` and can be rebuilt from
them by the process that calls ``AsyncResult.get()``.
"""

from __future__ import annotations

from celery.exceptions import Ignore, ImproperlyConfigured

from celery_dlock.errors import LockNotAcquired


class LockStoreNotConfigured(ImproperlyConfigured):  # type: ignore[misc]
    """The app has no usable lock store: the message names the setting to fix
    (``dlock_redis_url``, ``dlock_redis_client``, or the transport options)."""


class TaskSkipped(LockNotAcquired):
    """The run was skipped because another run held its lock (policy ``"skip"``).

    ``holder`` is the task id of the run that held the lock (None when the
    holder was not a Celery task, or Redis could not be asked); ``key`` is the
    lock name. ``AsyncResult.get()`` raises it, so a skipped duplicate is never
    mistaken for a successful run. It derives from :class:`LockNotAcquired`, so
    ``except LockNotAcquired`` covers both "skipped" and "failed to lock".
    """

    def __init__(self, message: str, holder: str | None = None, key: str | None = None) -> None:
        super().__init__(message, holder, key)

    @property
    def holder(self) -> str | None:
        return self.args[1] if len(self.args) > 1 else None

    @property
    def key(self) -> str | None:
        return self.args[2] if len(self.args) > 2 else None

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RunSkipped(Ignore):  # type: ignore[misc]
    """Internal: how a skipped run ends in the pool process, its outcome already stored.

    An ``Ignore`` for Celery's tracer (nothing else stored, no error logged); the worker's
    main process (our request class) sends the one terminal event that matches the stored
    state: ``task-failed`` for ``"failure"``, ``task-revoked`` for ``"revoked"``.
    """

    def __init__(self, message: str, state: str = "failure", exception: str = "") -> None:
        super().__init__(message, state, exception)

    @property
    def state(self) -> str:
        return str(self.args[1]) if len(self.args) > 1 else "failure"

    @property
    def exception(self) -> str:
        return str(self.args[2]) if len(self.args) > 2 else ""
