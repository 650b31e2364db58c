"""In-process and eager runs lock and unlock like worker runs, also when a base class's
``__call__`` calls ``super().__call__()`` (Celery then runs the body on a copy of the
request, which it pops before ``task_postrun``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery, Task
from celery.contrib.testing.worker import start_worker

import celery_dlock
from celery_dlock.celery import LockedTask
from celery_dlock.keys import LockKeys
from celery_dlock.watchdog import get_watchdog
from tests.celery.helpers import wait_until


class CallingSuper(Task):  # type: ignore[misc]
    """A foreign base class of the common kind: its __call__ wraps the run."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **kwargs)


class LockedCallingSuper(LockedTask, CallingSuper):
    pass


def make(redis_url: str, mode: str) -> tuple[Celery, Any]:
    name = uuid.uuid4().hex[:10]
    app = Celery(f"inproc-{name}", broker="memory://", backend="cache+memory://")
    app.conf.update(dlock_redis_url=redis_url, dlock_prefix=f"{name}:", task_eager_propagates=True)
    options: dict[str, Any] = {"lock_key": ["n"], "lock_timeout": 30}
    if mode == "LockedTask":

        @app.task(base=LockedCallingSuper, bind=True, name=f"{name}.job", **options)
        def job(self: Any, n: int) -> int:
            assert self.lock is not None
            return n

    else:

        @app.task(base=CallingSuper, bind=True, name=f"{name}.job")
        def job(self: Any, n: int) -> int:
            return n

        celery_dlock.install(app, tasks={f"{name}.job": options})
    app.finalize()
    return app, app.tasks[f"{name}.job"]


def lock_key(app: Celery, task: Any, n: int) -> str:
    """The lock of ``task(n)`` (install()ed tasks have no lock_name_for; both keep their config)."""
    return LockKeys.for_name(task._dlock_config.key.name_for((n,), {}), app.conf.dlock_prefix).lock


def assert_released(app: Celery, task: Any, client: redis.Redis, after_result: bool = False) -> None:
    if after_result:
        # A worker stores the result before it releases the lock (a redelivered copy must
        # see the final state): get() may return a moment before the release.
        wait_until(lambda: not client.exists(lock_key(app, task, 1)), 5, what="the release")
    assert not client.exists(lock_key(app, task, 1)), "the run's lock is still held"
    renewed = {entry.lock.keys.lock for entry in get_watchdog()._schedule._entries.values()}
    assert lock_key(app, task, 1) not in renewed, "the watchdog still renews a finished run's lock"


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.mark.parametrize("mode", ["LockedTask", "install"])
@pytest.mark.parametrize("how", ["apply", "eager-delay"])
def test_eager_runs_take_and_release_their_lock_once(
    redis_url: str, client: redis.Redis, mode: str, how: str
) -> None:
    app, task = make(redis_url, mode)
    app.conf.task_always_eager = how == "eager-delay"
    for _ in range(2):  # a second identical call runs: nothing left locked
        result = task.apply(args=(1,)) if how == "apply" else task.delay(1)
        assert result.get() == 1
        assert_released(app, task, client)


@pytest.mark.parametrize("mode", ["LockedTask", "install"])
@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_celery_contrib_testing_worker_runs_release_their_lock(
    redis_url: str, client: redis.Redis, mode: str, pool: str
) -> None:
    app, task = make(redis_url, mode)
    with start_worker(app, pool=pool, perform_ping_check=False, loglevel="WARNING"):
        for _ in range(2):
            assert task.delay(1).get(timeout=20) == 1
            assert_released(app, task, client, after_result=True)
