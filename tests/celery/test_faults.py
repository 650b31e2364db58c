"""Faults with real workers: killed pool processes, time limits, terminate, dead workers, Redis down."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from celery.exceptions import TimeLimitExceeded, WorkerLostError

from celery_dlock import DistributedLock, LockNotAcquired
from celery_dlock.celery import TaskSkipped
from celery_dlock.embedded import RedisServer
from celery_dlock.keys import LockKeys
from tests.celery.apps.common import read_records, read_started, records
from tests.celery.conftest import load_app, start_worker
from tests.celery.helpers import outcomes, wait_until
from tests.support.observations import record

pytestmark = pytest.mark.slow

# The fault tasks hold 30 s leases; "released within this many seconds of the
# kill" can only be the worker's main process releasing it, never the lease.
RELEASED_WITHIN = 1.5


@pytest.fixture(scope="module")
def faults(celery_env: dict[str, str]) -> Iterator[ModuleType]:
    module = load_app("faults")
    worker = start_worker(module, concurrency=2)
    try:
        yield module
    finally:
        worker.stop()


def lock_key_of(module: ModuleType, task: Any, *args: Any) -> str:
    return LockKeys.for_name(task.lock_name_for(*args), module.app.conf.dlock_prefix).lock


def started_pid(tag: str, timeout: float = 15) -> int:
    entry = wait_until(lambda: read_started(tag), timeout, what="the task to start")[0]
    return int(entry["pid"])


def seconds_until_gone(key: str, timeout: float = 10) -> float:
    started = time.monotonic()
    wait_until(lambda: not records().exists(key), timeout, interval=0.01, what=f"{key} to be released")
    return time.monotonic() - started


def test_pool_process_sigkilled_mid_task_frees_its_lock_quickly(faults: ModuleType, tag: str) -> None:
    result = faults.hold.delay(tag, 20)
    key = lock_key_of(faults, faults.hold, tag, 20)
    pid = started_pid(tag)
    assert records().exists(key)
    os.kill(pid, signal.SIGKILL)
    freed_after = seconds_until_gone(key)
    record(
        "Celery pool process SIGKILLed mid-task",
        "prefork worker (2 processes), task with a 30 s lock_timeout; its pool process killed",
        lock_freed_after_s=round(freed_after, 3),
        lock_timeout_s=30,
        freed_by="the worker's main process (token-checked release)",
    )
    assert freed_after < RELEASED_WITHIN
    with pytest.raises(WorkerLostError):
        result.get(timeout=10)
    # The lock is really free: the same call runs again at once.
    assert faults.hold.delay(tag, 0.1).get(timeout=10)["task_id"]


class _ActiveRequest:
    """What the child watch reads of a Celery request (weak-referenceable, as Celery's set needs)."""

    def __init__(self, task: Any, task_id: str, pid: int, args: tuple[Any, ...]) -> None:
        self.task, self.id, self.hostname, self.worker_pid = task, task_id, "watched@host", pid
        self.args, self.kwargs = args, {}


def test_the_child_watch_frees_the_lock_of_an_active_request_whose_process_is_gone(
    faults: ModuleType, tag: str
) -> None:
    """Celery may be seconds late to report a dead pool process (its sentinel can be held open by
    a sibling): the main process's watcher, looking at Celery's active requests, frees it first."""
    import subprocess

    from celery.worker.state import active_requests

    from celery_dlock.celery import request as request_module
    from celery_dlock.celery.config import redis_client_for_app
    from celery_dlock.celery.tasklock import Owner, TaskLock

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that has exited: the "pool process" that ran this request
    request = _ActiveRequest(faults.hold, f"watched-{uuid.uuid4().hex}", gone.pid, (tag, 20))
    owner = Owner(request.id, request.hostname, gone.pid)
    client = redis_client_for_app(faults.app)
    name, prefix = faults.hold.lock_name_for(tag, 20), faults.app.conf.dlock_prefix
    lock = TaskLock(client, name, owner=owner, timeout=30, prefix=prefix)
    assert lock.acquire(blocking=False)
    active_requests.add(request)
    try:
        request_module._child_watch.ensure_started()
        freed_after = seconds_until_gone(lock.keys.lock, timeout=5)
    finally:
        active_requests.discard(request)
    assert freed_after < 1.0  # the 30 s lease did not free it: the watcher did


def test_a_waiting_duplicate_runs_soon_after_the_holders_process_is_killed(
    faults: ModuleType, tag: str
) -> None:
    holder = faults.hold_or_wait.delay(tag, 20)
    pid = started_pid(tag)
    waiter = faults.hold_or_wait.delay(tag, 0.1)  # waits (up to 20 s) in the other pool process
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    value = waiter.get(timeout=20)
    assert value["start"] - killed_at < RELEASED_WITHIN  # not the 30 s lease
    with pytest.raises(WorkerLostError):
        holder.get(timeout=10)


def test_hard_time_limit_frees_the_lock_quickly(faults: ModuleType, tag: str) -> None:
    result = faults.hold_time_limited.delay(tag, 20)  # time_limit=1.5
    key = lock_key_of(faults, faults.hold_time_limited, tag, 20)
    started_pid(tag)
    started = time.monotonic()
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=15)
    wait_until(lambda: not records().exists(key), 10, interval=0.01)
    assert time.monotonic() - started < 1.5 + RELEASED_WITHIN


def test_revoke_terminate_frees_the_lock_quickly(faults: ModuleType, tag: str) -> None:
    result = faults.hold.delay(tag, 20)
    key = lock_key_of(faults, faults.hold, tag, 20)
    started_pid(tag)
    result.revoke(terminate=True, signal="SIGKILL")
    assert seconds_until_gone(key) < RELEASED_WITHIN
    wait_until(lambda: result.state == "REVOKED", 10)


def test_acks_late_message_requeued_after_its_process_died_runs_after_the_release(
    faults: ModuleType, tag: str
) -> None:
    # reject_on_worker_lost: the main process releases the lock, then requeues; the
    # redelivered message must find the lock free (and never run beside the dead one).
    result = faults.hold_acks_late.delay(tag, 0.2, 20)
    pid = started_pid(tag)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    value = result.get(timeout=30)
    assert value["delivery"] == 2 and value["start"] > killed_at
    assert len(read_records(tag)) == 1


def _pools() -> list[tuple[str, int]]:
    pools = [("threads", 3), ("solo", 1)]
    try:
        import gevent  # noqa: F401  (the `gevent` extra)
    except ImportError:
        return pools
    return [*pools, ("gevent", 5)]


def test_renewal_works_in_threads_solo_and_gevent_pools(faults: ModuleType) -> None:
    # A lock some other worker holds must survive new workers starting (nothing is cleared).
    elsewhere = DistributedLock(records(), faults.hold.lock_name_for("elsewhere", 1), timeout=60,
                                prefix=faults.app.conf.dlock_prefix)
    assert elsewhere.acquire(blocking=False)
    for pool, concurrency in _pools():
        worker = start_worker(faults, pool=pool, concurrency=concurrency)
        assert elsewhere.is_locked_by_me()
        try:
            tag = uuid.uuid4().hex
            runs = [faults.renewed.delay(tag, 3.2) for _ in range(1 if pool == "solo" else 3)]
            values = outcomes(runs, timeout=30)
            done = [v for v in values if isinstance(v, dict)]
            assert len(done) == 1 and done[0]["held_for"] >= 3.2  # 3x its 1 s lease, still held
            assert all(isinstance(v, TaskSkipped) for v in values if not isinstance(v, dict)), values
        finally:
            worker.stop()
    assert elsewhere.release()


# -- a whole worker dies: acks_late redelivery (Redis broker, 2 s visibility timeout) -------------


@pytest.fixture
def redelivery(celery_env: dict[str, str]) -> ModuleType:
    return load_app("redelivery")


def test_acks_late_task_redelivered_after_its_worker_died_runs_once_not_concurrently(
    redelivery: ModuleType, tag: str
) -> None:
    first = start_worker(redelivery, concurrency=2)
    second = None
    try:
        result = redelivery.acked_late.delay(tag, 4.0)
        wait_until(lambda: read_started(tag), 15)
        second = start_worker(redelivery, concurrency=2)
        first.kill()  # main process and (pdeathsig) its pool children
        killed_at = time.monotonic()
        value = result.get(timeout=40)
    finally:
        first.stop()
        if second is not None:
            second.stop()
    completed = read_records(tag)
    assert len(completed) == 1 and value["task_id"] == result.id
    # Every run that started before the kill belonged to the dead worker; the one
    # that completed started after the kill (after the dead run's lease ran out).
    assert completed[0]["start"] > killed_at


def test_message_redelivered_while_its_first_delivery_runs_does_not_run_twice(
    redelivery: ModuleType, tag: str
) -> None:
    # The 5 s task outlives the 2 s visibility timeout: the broker hands the message
    # out again while it runs. The copy waits for the running delivery (same task id),
    # sees it SUCCEEDED, and drops itself instead of running a second time.
    workers = [start_worker(redelivery, concurrency=2), start_worker(redelivery, concurrency=2)]
    try:
        result = redelivery.acked_late.delay(tag, 5.0)
        assert result.get(timeout=30)["task_id"] == result.id
        log = ""
        deadline = time.monotonic() + 10
        while "already ended with SUCCESS" not in log and time.monotonic() < deadline:
            time.sleep(0.2)
            log = "".join(w.log() for w in workers)
    finally:
        for worker in workers:
            worker.stop()
    assert "already ended with SUCCESS" in log, "the broker never redelivered the message"
    assert len(read_started(tag)) == 1 and len(read_records(tag)) == 1


# -- the lock store is unreachable ------------------------------------------------------------------


@pytest.fixture(scope="module")
def lockstore(celery_env: dict[str, str]) -> Iterator[tuple[ModuleType, RedisServer]]:
    server = RedisServer().start()
    os.environ["DLOCK_TEST_OWN_LOCK_URL"] = server.url
    module = load_app("lockstore")
    worker = start_worker(module, concurrency=2)
    try:
        yield module, server
    finally:
        worker.stop()
        server.stop()
        os.environ.pop("DLOCK_TEST_OWN_LOCK_URL", None)


def test_redis_unreachable_contention_mode_applies_the_policy_and_run_mode_runs_unlocked(
    lockstore: tuple[ModuleType, RedisServer], tag: str
) -> None:
    module, server = lockstore
    assert module.down_skip.delay(tag).get(timeout=15)["fence"] == 1  # all fine while Redis is up
    server.kill()
    try:
        with pytest.raises(TaskSkipped, match="Redis unreachable"):
            module.down_skip.delay(tag).get(timeout=30)
        with pytest.raises(LockNotAcquired, match="cannot reach Redis"):
            module.down_fail.delay(tag).get(timeout=30)
        unlocked = module.down_run.delay(tag).get(timeout=30)
        assert unlocked["fence"] is None  # ran, without a lock (lock_on_redis_error="run")
        retried = module.down_retry.delay(tag)
        wait_until(lambda: retried.state == "RETRY", 30)
    finally:
        server.start()
    assert retried.get(timeout=30)["fence"] is not None  # retried until Redis came back
