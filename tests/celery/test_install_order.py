"""install() locks every run whatever the registration order and the task's options:
tasks registered before it with ``autoretry_for`` (Celery wraps ``run`` on the instance),
``bind=True``, ``shared_task``, type annotations; a task it cannot lock is an error."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery import Celery, shared_task

import celery_dlock
from celery_dlock.celery import current_lock


def fresh_app(redis_url: str) -> Celery:
    name = uuid.uuid4().hex[:10]
    app = Celery(f"order-{name}", broker="memory://", backend="cache+memory://")
    app.conf.update(dlock_redis_url=redis_url, dlock_prefix=f"{name}:", task_eager_propagates=True)
    return app


@pytest.mark.parametrize("install_first", [False, True], ids=["registered-before", "registered-after"])
def test_autoretry_tasks_are_locked_whatever_the_order(redis_url: str, install_first: bool) -> None:
    app = fresh_app(redis_url)
    name = f"{app.main}.flaky"
    seen: list[Any] = []
    if install_first:
        celery_dlock.install(app, tasks={name: {"lock_key": ["n"]}})

    @app.task(name=name, bind=True, autoretry_for=(ValueError,), retry_backoff=False, max_retries=2,
              default_retry_delay=0)
    def flaky(self: Any, n: int) -> int:
        seen.append(current_lock())
        return n

    app.finalize()
    task = app.tasks[name]
    assert task._orig_run is not None  # Celery wrapped run on the instance
    if not install_first:
        celery_dlock.install(app, tasks={name: {"lock_key": ["n"]}})
    assert task.apply(args=(7,)).get() == 7
    assert task.apply(args=(8,)).get() == 8
    assert len(seen) == 2 and all(lock is not None for lock in seen), "a run went unlocked"


def test_shared_and_typed_tasks_registered_before_install_are_locked(redis_url: str) -> None:
    app = fresh_app(redis_url)
    name = f"{app.main}.typed"
    seen: list[Any] = []

    @shared_task(name=name, bind=True)
    def typed(self: Any, n: int, label: str = "x") -> str:
        seen.append(current_lock())
        return f"{label}{n}"

    app.finalize()
    celery_dlock.install(app, tasks={name: {"lock_key": ["n"]}})
    assert app.tasks[name].apply(args=(3,), kwargs={"label": "y"}).get() == "y3"
    assert seen and seen[0] is not None


def test_a_task_whose_run_cannot_be_locked_is_an_error_naming_it(redis_url: str) -> None:
    app = fresh_app(redis_url)
    name = f"{app.main}.odd"

    @app.task(name=name)
    def odd(n: int) -> int:
        return n

    app.finalize()
    task = app.tasks[name]
    task.run = lambda n: n  # replaced on the instance by someone else: nothing we can wrap safely
    with pytest.raises(TypeError, match=name):
        celery_dlock.install(app, tasks={name: {"lock_key": ["n"]}})
