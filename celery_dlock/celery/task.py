"""``LockedTask``: a Celery task base class whose runs take a distributed lock.

    @app.task(base=LockedTask, lock_key="order:{order_id}", lock_timeout=30, on_contention="retry")
    def charge(order_id): ...

The options are class attributes (see :mod:`celery_dlock.celery.settings` for
the list and their ``dlock_*`` app settings). They are read and checked when
Celery binds the task class to the app, i.e. when the task is registered: a
wrong option fails at import time, not at the first message.

How a run is locked is in :mod:`celery_dlock.celery.runner`; how publishing
deduplicates in :mod:`celery_dlock.celery.dedup`; how the worker's main process
frees the lock of a killed pool process in :mod:`celery_dlock.celery.request`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery import Task
from celery.utils.imports import symbol_by_name

from celery_dlock.celery import dedup
from celery_dlock.celery.config import check_lock_store
from celery_dlock.celery.keyrequest import name_for_publish
from celery_dlock.celery.request import locked_request_class
from celery_dlock.celery.runner import current_lock, locked_run
from celery_dlock.celery.settings import (
    OPTION_NAMES,
    TaskLockConfig,
    build_config,
    check_not_renamed,
    effective_options,
    run_signature,
)
from celery_dlock.celery.tasklock import TaskLock


class LockedTask(Task):  # type: ignore[misc]
    """Base class for tasks that must not run concurrently for the same lock key.

    The lock is taken just before the body runs, in the process that runs it,
    renewed while it runs, and released after the run ends in every state. The
    running body reads it as ``self.lock`` (``bind=True``): ``self.lock.key``,
    ``self.lock.fence``, ``self.lock.ensure_held()``.
    """

    #: Marks the tasks whose app must have a lock store (checked when a worker starts).
    dlock_locked = True

    #: Frees the lock of a pool process that dies mid-task (in the worker's main process).
    Request: Any = "celery_dlock.celery.request:LockedRequest"

    # Lock options; None means "from app.conf" (dlock_timeout, dlock_on_contention, ...).
    lock_key: Any = None
    lock_timeout: Any = None
    on_contention: Any = None
    lock_retry_backoff: Any = None
    lock_retry_backoff_max: Any = None
    lock_retry_jitter: Any = None
    lock_max_retries: Any = None
    lock_wait: Any = None
    lock_wait_fallback: Any = None
    lock_on_redis_error: Any = None
    dedup_on_publish: Any = None
    dedup_timeout: Any = None
    lock_skip_covered: Any = None
    lock_skip_state: Any = None
    lock_redelivery_wait: Any = None

    _dlock_config: TaskLockConfig | None = None

    @classmethod
    def bind(cls, app: Any) -> Any:
        bound = super().bind(app)
        if _is_concrete(cls):
            given = {name: getattr(cls, name) for name in OPTION_NAMES}
            given_on_class = lambda name: getattr(cls, name, None) is not None  # noqa: E731
            check_not_renamed(given_on_class, f"an option of task {cls.name!r}")
            signature = run_signature(cls)
            cls._dlock_config = build_config(
                given, app.conf, cls.name, signature, default_retry_delay=cls.default_retry_delay
            )
            cls.run = locked_run(cls, cls._dlock_config, signature)
            # A subclass may bring its own Request class: keep it, with our release added.
            request_class = symbol_by_name(cls.Request)
            if not getattr(request_class, "releases_abandoned_locks", False):
                cls.Request = locked_request_class(request_class)
            # Like Celery's from_config: options left as None now hold the app-wide value.
            for name, (value, _source) in effective_options(given, app.conf).items():
                if getattr(cls, name) is None and value is not None:
                    setattr(cls, name, value)
        return bound

    def _lock_config(self) -> TaskLockConfig:
        config = type(self)._dlock_config
        if config is None:  # used before Celery bound it (rare): bind now
            type(self).bind(self.app)
            config = type(self)._dlock_config
            assert config is not None
        return config

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: Any = None,
        **options: Any,
    ) -> Any:
        config = self._lock_config()
        check_lock_store(self.app)  # no lock store: an error naming the setting, not a guess

        def send(chosen_id: str | None, chosen_options: Mapping[str, Any]) -> Any:
            return super(LockedTask, self).apply_async(
                args,
                kwargs,
                task_id=chosen_id,
                producer=producer,
                link=link,
                link_error=link_error,
                shadow=shadow,
                **chosen_options,
            )

        canvas = {"link": link, "link_error": link_error}
        return dedup.publish(self, config, args, kwargs, task_id, options, send, canvas)

    def lock_name_for(self, *args: Any, **kwargs: Any) -> str:
        """The lock name ``self.delay(*args, **kwargs)`` uses (the same at publish and in the worker)."""
        return name_for_publish(self, self._lock_config(), None, args, kwargs, {})

    @property
    def lock(self) -> TaskLock | None:
        """The lock of the run in progress (None outside a locked run, or if it runs unlocked)."""
        return current_lock()


def _is_concrete(cls: type) -> bool:
    """Task classes that can run (not abstract bases such as LockedTask itself)."""
    if cls.__dict__.get("abstract") or not getattr(cls, "name", None):
        return False
    return getattr(cls, "run", None) is not Task.run
