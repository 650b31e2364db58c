"""Signal-handler mode: lock tasks that cannot use ``base=LockedTask``.

    celery_dlock.install(app, tasks={
        "thirdparty.tasks.sync_account": {"lock_key": ["account_id"], "on_contention": "retry"},
    })

or put the same mapping in ``app.conf.dlock_tasks`` and call ``install(app)``
(after configuring the app, before or after the tasks are defined).

Why not signals alone? Celery logs and swallows any exception raised by a
signal receiver (``task_prerun`` included, see ``celery.app.trace``), so a
receiver cannot stop a run, which "skip", "retry" and "fail" must do. The run
is stopped from inside instead: each listed task's ``run`` is wrapped by
:func:`celery_dlock.celery.runner.locked_run`, as LockedTask's is. The task keeps
its own class, base class and ``__call__``. The rest is the same Celery machinery LockedTask uses:
``task_postrun`` releases the lock, ``task_revoked`` drops queued markers, and
the task's ``Request`` class is extended so the worker's main process frees
the lock of a killed pool process. With ``dedup_on_publish``, ``apply_async``
is wrapped too.

*When* this happens matters: the worker builds each task's tracer (which
captures ``run``) once, and a publisher may never finalize the app. So the
wrapping uses Celery's own hook for rewriting task attributes at registration,
task annotations (``Task.annotate``, run when a task class is first bound to
the app): ``install`` puts an annotation in front of the app's own (which still
apply, merged with ours), so every listed task is wrapped the moment it is
registered, in every process. Tasks already registered when ``install`` is
called are wrapped at once. A listed task that no worker ever registers is
reported with a warning when a worker starts.
"""

from __future__ import annotations

import functools
import logging
import threading
import types
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from celery.app.annotations import prepare as prepare_annotations
from celery.app.trace import build_tracer
from celery.signals import worker_init
from celery.utils.imports import symbol_by_name

from celery_dlock.celery import dedup
from celery_dlock.celery.config import check_lock_store_at_start
from celery_dlock.celery.request import locked_request_class
from celery_dlock.celery.runner import locked_run
from celery_dlock.celery.settings import (
    OPTION_NAMES,
    TaskLockConfig,
    build_config,
    check_not_renamed,
    run_signature,
)

logger = logging.getLogger("celery_dlock.celery")

INSTALLED_ATTR = "_dlock_installed"


class Installation:
    """The tasks ``install`` was asked to lock in one app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.explicit: dict[str, dict[str, Any]] = {}
        self._mutex = threading.RLock()

    def add(self, tasks: Mapping[str, Mapping[str, Any]]) -> None:
        checked = check_task_options(tasks, "tasks")
        with self._mutex:
            self.explicit.update(checked)

    def specs(self) -> dict[str, dict[str, Any]]:
        specs = check_task_options(self.app.conf.get("dlock_tasks") or {}, "app.conf.dlock_tasks")
        with self._mutex:
            specs.update(self.explicit)
        return specs

    def patch_for(self, task_class: type) -> dict[str, Any] | None:
        """The attributes that lock ``task_class`` (None if it is not listed or already locked)."""
        name = getattr(task_class, "name", None)
        if not name or task_class.__dict__.get(INSTALLED_ATTR):
            return None
        options = self.specs().get(name)
        if options is None:
            return None
        return locked_attributes(task_class, self.app, options)

    def patch_registered(self) -> None:
        """Wrap listed tasks that were registered (bound) before ``install`` was called."""
        for name in self.specs():
            task = self.app._tasks.get(name)  # the registry as is: no finalization, no evaluation
            if task is None or not task.__bound__:
                continue
            attributes = self.patch_for(type(task))
            if attributes is None:
                continue
            for key, value in attributes.items():
                setattr(type(task), key, value)
            _lock_instance_run(task)
            if task.__trace__ is not None:
                # A tracer built earlier captured the unwrapped run; build it again.
                task.__trace__ = build_tracer(task.name, task, app=self.app)

    def report_missing(self) -> None:
        for name in self.specs():
            if name not in self.app._tasks:
                logger.warning("celery-dlock: task %r is listed for locking but is not registered", name)


def _lock_instance_run(task: Any) -> None:
    """A ``run`` that Celery set on the task object at registration shadows the locked
    ``run`` of its class: ``autoretry_for`` wraps the original as ``task._orig_run``, so
    that is what gets locked. Any other ``run`` on the object is an error naming the task
    (a silent unlocked run is the one thing install() must never give)."""
    if "run" not in task.__dict__:
        return
    if "_orig_run" in task.__dict__:
        task._orig_run = types.MethodType(type(task).run, task)
        return
    raise TypeError(
        f"task {task.name!r} cannot be locked by install(): its run was replaced on the task "
        "object; call install() before the task is registered, or use base=LockedTask"
    )


class LockingAnnotations:
    """A task annotation (see ``task_annotations``) that adds our attributes to listed tasks.

    Celery applies only the *first* annotation that matches a task, so this one
    wraps the app's own annotations: it asks them first and merges the answer
    with ours, so the app's annotations keep working unchanged.
    """

    def __init__(self, installation: Installation) -> None:
        self.installation = installation
        self._own: list[Any] | None = None

    def _app_annotations(self) -> list[Any]:
        if self._own is None:
            self._own = list(prepare_annotations(self.installation.app.conf.task_annotations))
        return self._own

    def annotate(self, task: Any) -> dict[str, Any] | None:
        theirs = _first(self._app_annotations(), "annotate", task)
        ours = self.installation.patch_for(task)
        if ours is None:
            return theirs
        return {**(theirs or {}), **ours}

    def annotate_any(self) -> dict[str, Any] | None:
        return _first(self._app_annotations(), "annotate_any")


def _first(annotations: list[Any], method: str, *args: Any) -> dict[str, Any] | None:
    for annotation in annotations:
        function = getattr(annotation, method, None)
        if function is not None:
            reply = function(*args)
            if reply is not None:
                return dict(reply)
    return None


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
        check_not_renamed(options.__contains__, f"in {where}[{name!r}]")
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(
                f"{where}[{name!r}] has unknown lock option {unknown[0]!r}; the options are: "
                f"{', '.join(OPTION_NAMES)}"
            )
        checked[name] = dict(options)
    return checked


def locked_attributes(task_class: Any, app: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """Class attributes that make ``task_class`` run under its lock (validated options)."""
    from celery_dlock.celery.task import LockedTask

    if issubclass(task_class, LockedTask):
        raise TypeError(
            f"task {task_class.name!r} already uses base=LockedTask; set its lock options as task "
            "options instead of listing it in install()/dlock_tasks"
        )
    signature = run_signature(task_class)
    config = build_config(
        options, app.conf, task_class.name, signature, default_retry_delay=task_class.default_retry_delay
    )
    attributes: dict[str, Any] = {
        "run": locked_run(task_class, config, signature),
        "Request": locked_request_class(symbol_by_name(task_class.Request)),
        "_dlock_config": config,
        INSTALLED_ATTR: True,
    }
    if config.dedup_on_publish or config.key.wants_request:
        attributes["apply_async"] = _publishing_apply_async(config, task_class.apply_async)
    logger.debug("celery-dlock: %s runs under lock (%s)", task_class.name, config.key.describe())
    return attributes


def _publishing_apply_async(config: TaskLockConfig, original: Callable[..., Any]) -> Callable[..., Any]:
    """``apply_async`` that decides the lock name (keys that need the message) and deduplicates."""

    @functools.wraps(original)
    def apply_async(
        self: Any, args: Any = None, kwargs: Any = None, task_id: str | None = None, **options: Any
    ) -> Any:
        def send(chosen_id: str | None, chosen_options: Mapping[str, Any]) -> Any:
            return original(self, args, kwargs, task_id=chosen_id, **chosen_options)

        return dedup.publish(self, config, args, kwargs, task_id, options, send)

    return apply_async


_installations: weakref.WeakKeyDictionary[Any, Installation] = weakref.WeakKeyDictionary()
_installations_lock = threading.Lock()


def install(app: Any, tasks: Mapping[str, Mapping[str, Any]] | None = None) -> Installation:
    """Lock the tasks listed in ``tasks`` and in ``app.conf.dlock_tasks`` (see the module docstring).

    May be called more than once (each call adds tasks). Option names are
    checked at once; option values when each task is registered (they may come
    from ``app.conf`` and need the task's signature), with a clear error then.
    """
    with _installations_lock:
        installation = _installations.get(app)
        first = installation is None
        if installation is None:
            installation = _installations[app] = Installation(app)
    if tasks is not None:
        installation.add(tasks)
    if first:
        app.annotations = [LockingAnnotations(installation)]
        check_lock_store_at_start(app)

        def on_worker_init(sender: Any = None, **_: Any) -> None:
            if getattr(sender, "app", None) is app:
                installation.patch_registered()
                installation.report_missing()

        worker_init.connect(on_worker_init, weak=False)
    installation.patch_registered()
    return installation
