"""Direct calls ``task(...)`` and eager mode (``task_always_eager``): the lock is taken in the caller.

These are features, tested as such (no worker involved): a direct or eager call
holds the same lock as worker runs of the same call, and policies act in the
caller (skip raises TaskSkipped, fail raises LockNotAcquired, wait and retry
wait in the caller).
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery, Task

import celery_dlock
from celery_dlock import DistributedLock, LockNotAcquired
from celery_dlock.celery import LockedTask, Retry, TaskSkipped, Wait, current_lock
from celery_dlock.keys import LockKeys

_names = itertools.count()


@pytest.fixture
def app(redis_url: str, name: str) -> Iterator[Celery]:
    app = Celery(f"inprocess-{name}", broker="memory://", backend="cache+memory://")
    app.conf.update(dlock_redis_url=redis_url, dlock_prefix=f"{name}:", task_eager_propagates=False)
    app.finalize()
    yield app


def locked(app: Celery, **options: Any) -> Any:
    seen: list[Any] = []

    @app.task(base=LockedTask, bind=True, shared=False, name=f"inprocess.job{next(_names)}", **options)
    def job(self: Any, order_id: int) -> dict[str, Any]:
        lock = self.lock
        assert lock is current_lock() and lock is not None
        seen.append(lock)
        return {"key": lock.key, "fence": lock.fence, "held": lock.is_locked_by_me()}

    job.seen = seen
    return job


def hold(app: Celery, task: Any, *args: Any) -> DistributedLock:
    """Someone else (a plain lock, not a task) holds the lock of this call."""
    client = redis.Redis.from_url(app.conf.dlock_redis_url)
    lock = DistributedLock(client, task.lock_name_for(*args), timeout=10, prefix=app.conf.dlock_prefix)
    assert lock.acquire(blocking=False)
    return lock


def release_later(lock: DistributedLock, seconds: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), lock.release()))
    thread.start()
    return thread


def exists(app: Celery, task: Any, *args: Any) -> bool:
    client = redis.Redis.from_url(app.conf.dlock_redis_url)
    return bool(client.exists(LockKeys.for_name(task.lock_name_for(*args), app.conf.dlock_prefix).lock))


def test_direct_call_runs_under_the_lock_and_releases_it(app: Celery) -> None:
    job = locked(app)
    value = job(7)
    assert value["held"] and value["key"] == job.lock_name_for(7)
    assert not exists(app, job, 7)
    assert current_lock() is None and job.lock is None


def test_direct_call_policies_act_in_the_caller(app: Celery) -> None:
    skip, fail = locked(app, on_contention="skip"), locked(app, on_contention="fail")
    waiting = locked(app, on_contention=Wait(timeout=0.3, then="fail"))
    holders = [hold(app, task, 1) for task in (skip, fail, waiting)]
    with pytest.raises(TaskSkipped, match="is held by another owner"):
        skip(1)
    with pytest.raises(LockNotAcquired) as failed:
        fail(1)
    assert not isinstance(failed.value, TaskSkipped)
    started = time.monotonic()
    with pytest.raises(LockNotAcquired):
        waiting(1)
    assert time.monotonic() - started >= 0.3
    for lock in holders:
        lock.release()
    assert skip(1)["held"] and fail(1)["held"] and waiting(1)["held"]


def test_wait_and_retry_in_the_caller_get_the_lock_once_it_is_released(app: Celery) -> None:
    waiting = locked(app, on_contention=Wait(timeout=10, then="fail"))
    retrying = locked(app, on_contention=Retry(backoff=0.1, backoff_max=0.5, max_retries=50))
    for task in (waiting, retrying):
        holder = hold(app, task, 2)
        thread = release_later(holder, 0.4)
        started = time.monotonic()
        assert task(2)["held"]
        assert time.monotonic() - started >= 0.35
        thread.join()


def test_eager_mode_locks_and_makes_a_skip_visible(app: Celery) -> None:
    app.conf.task_always_eager = True
    job = locked(app)
    result = job.delay(3)
    assert result.get()["held"] and result.state == "SUCCESS"
    assert not exists(app, job, 3)
    holder = hold(app, job, 3)
    try:
        skipped = job.delay(3)
        assert skipped.state == "FAILURE" and isinstance(skipped.result, TaskSkipped)
        with pytest.raises(TaskSkipped):
            skipped.get()
    finally:
        holder.release()


def test_eager_self_retry_runs_again_under_a_fresh_lock(app: Celery) -> None:
    app.conf.task_always_eager = True
    fences: list[int] = []

    @app.task(base=LockedTask, bind=True, shared=False, name="inprocess.retrying", max_retries=2)
    def retrying(self: Any, x: int) -> int:
        fences.append(self.lock.fence)
        if self.request.retries < 2:
            raise self.retry(countdown=0)
        return x

    assert retrying.delay(5).get() == 5
    assert len(fences) == 3 and fences == sorted(set(fences))
    assert not exists(app, retrying, 5)


def test_signal_mode_installed_after_the_task_was_registered(app: Celery) -> None:
    class Foreign(Task):  # type: ignore[misc]
        pass

    @app.task(base=Foreign, shared=False, name="inprocess.foreign")
    def foreign(order_id: int) -> int | None:
        lock = current_lock()
        return lock.fence if lock is not None else None

    assert foreign(1) is None
    celery_dlock.install(app, tasks={"inprocess.foreign": {"on_contention": "fail"}})
    assert foreign(1) == 1 and foreign.apply((1,)).get() == 2
    client = redis.Redis.from_url(app.conf.dlock_redis_url)
    name = foreign._dlock_config.key.name_for((1,), {})
    holder = DistributedLock(client, name, timeout=10, prefix=app.conf.dlock_prefix)
    assert holder.acquire(blocking=False)
    try:
        with pytest.raises(LockNotAcquired):
            foreign(1)
    finally:
        holder.release()


def test_core_imports_without_celery_and_the_celery_names_load_lazily() -> None:
    code = (
        "import sys; sys.modules['celery'] = None\n"
        "import celery_dlock\n"
        "assert celery_dlock.DistributedLock\n"
        "try:\n"
        "    celery_dlock.LockedTask\n"
        "except ImportError:\n"
        "    print('lazy')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "lazy"
    from celery_dlock import LockedTask as lazy_task
    from celery_dlock import install as lazy_install

    assert lazy_task is LockedTask and lazy_install is celery_dlock.celery.install


def test_lost_lock_is_signalled_and_ensure_held_raises(app: Celery) -> None:
    from celery_dlock import LockLost
    from celery_dlock.celery import lock_lost

    lost: list[dict[str, Any]] = []

    def on_lost(sender: Any = None, **kwargs: Any) -> None:
        lost.append(kwargs)

    lock_lost.connect(on_lost, weak=False)
    client = redis.Redis.from_url(app.conf.dlock_redis_url)

    @app.task(base=LockedTask, bind=True, shared=False, name="inprocess.stolen", lock_timeout=0.3)
    def stolen(self: Any, x: int) -> None:
        client.delete(self.lock.keys.lock)  # an operator (or a failover) removes the lock
        time.sleep(0.5)  # the next renewal finds it gone
        self.lock.ensure_held()

    try:
        with pytest.raises(LockLost):
            stolen(1)
    finally:
        lock_lost.disconnect(on_lost)
    assert len(lost) == 1 and lost[0]["key"] == stolen.lock_name_for(1)


def test_locked_task_subclass_keeps_its_own_request_class(app: Celery) -> None:
    from celery.worker.request import Request

    class AuditRequest(Request):  # type: ignore[misc]
        pass

    class AuditedLocked(LockedTask):
        Request = AuditRequest

    @app.task(base=AuditedLocked, shared=False, name="inprocess.audited")
    def audited(x: int) -> int:
        return x

    request_class = audited.Request
    assert issubclass(request_class, AuditRequest) and request_class.releases_abandoned_locks


def test_a_locked_body_calling_its_task_again(app: Celery) -> None:
    seen: list[tuple[str, int, Any]] = []

    @app.task(base=LockedTask, bind=True, shared=False, name="inprocess.recursive",
              lock_key="k:{key}", on_contention="fail")
    def recursive(self: Any, key: str, depth: int) -> None:
        seen.append((key, depth, self.lock))
        if depth == 0:
            recursive(key, 1)  # same key: runs under the outer lock, no self-deadlock
            recursive(key + "-other", 1)  # another key: its own lock, released on return
            assert not exists(app, recursive, key + "-other", 1)
            assert exists(app, recursive, key, 0)

    recursive("a", 0)
    (_, _, outer), (_, _, same), (_, _, other) = seen
    assert same is outer  # the very same lock object
    assert other is not outer and other.key == "k:a-other"
    assert not exists(app, recursive, "a", 0)


def test_the_lock_goes_around_run_so_the_tracer_calls_run_directly(app: Celery) -> None:
    """No __call__ of LockedTask's own: Celery's tracer skips Task.__call__ (a request push
    and pop per task), and a direct call still ends in the locked run."""
    from celery.app.trace import task_has_custom

    job = locked(app, lock_key=["order_id"])
    assert not task_has_custom(job, "__call__")
    assert job(7)["held"] is True
    assert job.apply(args=(8,)).get()["held"] is True


def test_a_locked_class_inheriting_a_locked_run_is_locked_once_with_its_own_options(app: Celery) -> None:
    class Parent(LockedTask):  # type: ignore[misc]
        name = f"inprocess.parent{next(_names)}"
        lock_timeout = 11

        def run(self, order_id: int) -> float:
            lock = current_lock()
            assert lock is not None and lock.is_locked_by_me()
            return lock.options.timeout

    class Child(Parent):
        name = f"inprocess.child{next(_names)}"
        lock_timeout = 22

    parent, child = app.register_task(Parent()), app.register_task(Child())
    assert parent(1) == 11
    assert child(1) == 22
    # The child's run wraps the parent's own body, not the parent's locked run.
    from celery_dlock.celery.runner import UNLOCKED_RUN

    assert getattr(type(child).run, UNLOCKED_RUN) is getattr(type(parent).run, UNLOCKED_RUN)
