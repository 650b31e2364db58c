"""Signal-handler mode: lock tasks that cannot use ``base=LockedTask``.

    celery_dlock.install(app, tasks={
        "thirdparty.tasks.sync_account": {"lock_key": ["account_id"], "on_contention": "retry"},
    })

or put the same mapping in ``app.conf.dlock_tasks`` and call ``install(app)``.

Why not just signals? Celery logs and swallows any exception raised by a signal
receiver (``task_prerun`` included, see ``celery.app.trace``), so a receiver
cannot stop a run, which "skip", "retry" and "fail" must do. ``install`` therefore
wraps each listed task's ``run`` on the task instance (the task keeps its own
class, base class and ``__call__``); the wrapper does exactly what
``LockedTask.__call__`` does (:func:`celery_dlock.celery.runner.run_locked`). The
rest is the same Celery machinery LockedTask uses: ``task_postrun`` releases the
lock, ``task_revoked`` drops queued markers, and the task's ``Request`` class is
extended so the worker's main process frees the lock of a killed pool process.
With ``dedup_on_publish`` the instance's ``apply_async`` is wrapped too.

When: tasks are wrapped as soon as both ``install`` was called and the task is
registered; ``install`` looks again when the app is finalized and when a worker
starts (``worker_init``, before the worker builds its task tracers), so task
modules imported by the worker are covered. A task listed but never registered
is reported with a warning when the worker starts.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping
from typing import Any

from celery.app.trace import build_tracer
from celery.signals import worker_init, worker_process_init
from celery.utils.imports import symbol_by_name

from celery_dlock.celery import dedup
from celery_dlock.celery.config import redis_client_for_app
from celery_dlock.celery.request import locked_request_class
from celery_dlock.celery.runner import run_locked
from celery_dlock.celery.settings import OPTION_NAMES, build_config, run_signature

logger = logging.getLogger("celery_dlock.celery")

PATCHED_ATTR = "_dlock_installed"


class Installation:
    """The tasks ``install`` was asked to lock in one app, and the wrapping of each."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.explicit: dict[str, dict[str, Any]] = {}
        self._mutex = threading.RLock()

    def add(self, tasks: Mapping[str, Mapping[str, Any]]) -> None:
        checked = check_task_options(tasks, "tasks")
        with self._mutex:
            self.explicit.update(checked)

    def specs(self) -> dict[str, dict[str, Any]]:
        from_conf = self.app.conf.get("dlock_tasks") or {}
        specs = check_task_options(from_conf, "app.conf.dlock_tasks")
        specs.update(self.explicit)
        return specs

    def apply(self, report_missing: bool = False) -> list[Any]:
        """Wrap every listed task that is registered and not wrapped yet; returns those wrapped now."""
        wrapped = []
        with self._mutex:
            registry = self.app._tasks  # the registry without triggering finalization
            for name, options in self.specs().items():
                task = registry.get(name)
                if task is None:
                    if report_missing:
                        logger.warning(
                            "celery-dlock: task %r is listed for locking but is not registered in %r",
                            name, self.app,
                        )
                    continue
                if getattr(task, PATCHED_ATTR, False):
                    continue
                lock_task(task, options)
                wrapped.append(task)
        return wrapped


def check_task_options(tasks: object, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(tasks, Mapping):
        raise TypeError(f"{where} must map task names to option dicts, got {type(tasks).__name__}: {tasks!r}")
    checked: dict[str, dict[str, Any]] = {}
    for name, options in tasks.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"{where} keys must be task names (non-empty str), got {name!r}")
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise TypeError(
                f"{where}[{name!r}] must be a dict of lock options, got {type(options).__name__}: {options!r}"
            )
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(
                f"{where}[{name!r}] has unknown lock option {unknown[0]!r}; the options are: "
                f"{', '.join(OPTION_NAMES)}"
            )
        checked[name] = dict(options)
    return checked


def lock_task(task: Any, options: Mapping[str, Any]) -> None:
    """Make one registered task instance run under its lock (see the module docstring)."""
    from celery_dlock.celery.task import LockedTask

    if isinstance(task, LockedTask):
        raise TypeError(
            f"task {task.name!r} already uses base=LockedTask; set its lock options as task "
            "options instead of listing it in install()/dlock_tasks"
        )
    original_run = task.run
    config = build_config(options, task.app.conf, task.name, run_signature(type(task), task))

    @functools.wraps(original_run)
    def locked_run(*args: Any, **kwargs: Any) -> Any:
        return run_locked(task, config, args, kwargs, functools.partial(original_run, *args, **kwargs))

    task.run = locked_run
    task._dlock_config = config
    task.Request = locked_request_class(symbol_by_name(task.Request))
    if config.dedup_on_publish:
        task.apply_async = _deduplicating_apply_async(task, config, task.apply_async)
    setattr(task, PATCHED_ATTR, True)
    if task.__trace__ is not None:
        # A tracer built earlier captured the unwrapped run; build it again.
        task.__trace__ = build_tracer(task.name, task, app=task.app)
    logger.debug("celery-dlock: %s runs under lock (%s)", task.name, config.key.describe())


def _deduplicating_apply_async(task: Any, config: Any, original: Any) -> Any:
    @functools.wraps(original)
    def apply_async(
        args: Any = None, kwargs: Any = None, task_id: str | None = None, **options: Any
    ) -> Any:
        if not dedup.should_deduplicate(config, options, task.app):
            return original(args, kwargs, task_id=task_id, **options)
        return dedup.publish_once(
            task, config, redis_client_for_app(task.app), args, kwargs, task_id, options,
            lambda chosen_id: original(args, kwargs, task_id=chosen_id, **options),
        )

    return apply_async


_installations: dict[int, Installation] = {}
_installations_lock = threading.Lock()


def install(app: Any, tasks: Mapping[str, Mapping[str, Any]] | None = None) -> Installation:
    """Lock the tasks listed in ``tasks`` and in ``app.conf.dlock_tasks`` (see the module docstring).

    May be called more than once (each call adds tasks). Option names are
    checked at once; option values when each task is wrapped (they may come
    from ``app.conf`` and need the task's signature).
    """
    with _installations_lock:
        installation = _installations.get(id(app))
        first = installation is None
        if installation is None:
            installation = _installations[id(app)] = Installation(app)
    if tasks is not None:
        installation.add(tasks)
    if first:
        _connect(app, installation)
    if app.finalized:
        installation.apply()
    return installation


def _connect(app: Any, installation: Installation) -> None:
    def on_finalized(sender: Any = None, **_: Any) -> None:
        installation.apply()

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            installation.apply(report_missing=True)

    def on_process_init(sender: Any = None, **_: Any) -> None:
        # Tasks registered only now (rare) get wrapped, and their tracer rebuilt above.
        installation.apply()

    app.on_after_finalize.connect(on_finalized, weak=False)
    worker_init.connect(on_worker_init, weak=False)
    worker_process_init.connect(on_process_init, weak=False)
