"""Signal mode (``celery_dlock.install``) on tasks with a foreign base class, in a real worker."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from types import ModuleType

import pytest

from celery_dlock import LockNotAcquired
from celery_dlock.celery import TaskSkipped
from celery_dlock.keys import LockKeys
from tests.celery.apps.common import close_gate, open_gate, read_records, read_started, records, run_id
from tests.celery.conftest import load_app, start_worker
from tests.celery.helpers import assert_no_overlap, outcomes, overlaps, send_concurrently, wait_until


@pytest.fixture(scope="module")
def foreign(celery_env: dict[str, str]) -> Iterator[ModuleType]:
    module = load_app("foreign")
    worker = start_worker(module, concurrency=2)
    try:
        yield module
    finally:
        worker.stop()


def audited(module: ModuleType, task_name: str) -> int:
    return int(records().get(f"{run_id()}:audited:{module.PREFIX}{task_name}") or 0)


def lock_key(module: ModuleType, task: object, *args: object) -> str:
    name = task._dlock_config.key.name_for(args, {})  # type: ignore[attr-defined]
    return LockKeys.for_name(name, module.app.conf.dlock_prefix).lock


def test_tasks_keep_their_foreign_base_class(foreign: ModuleType) -> None:
    for name in ("f_skip", "f_retry", "f_wait", "f_fail", "f_dedup", "f_hold", "f_order"):
        task = getattr(foreign, name)
        assert isinstance(task, foreign.AuditedTask) and task._dlock_installed, name


@pytest.mark.slow
def test_skip_runs_once_and_reports_the_holder(foreign: ModuleType, tag: str) -> None:
    before = audited(foreign, "f_skip")
    close_gate(tag)
    results = send_concurrently(foreign.f_skip, 8, tag, 0.1)
    wait_until(lambda: sum(r.ready() for r in results) == 7, 60, interval=0.05, what="7 skips")
    open_gate(tag)
    values = outcomes(results, timeout=60)
    ran = read_records(tag)
    assert len(ran) == 1
    assert [type(v).__name__ for v in values].count("TaskSkipped") == 7
    assert {v.holder for v in values if isinstance(v, TaskSkipped)} == {ran[0]["task_id"]}
    assert ran[0]["fence"] is not None  # current_lock() works in a foreign task
    assert audited(foreign, "f_skip") - before == 8  # the foreign __call__ still wraps every call


@pytest.mark.slow
def test_retry_runs_all_without_overlap(foreign: ModuleType, tag: str) -> None:
    values = outcomes(send_concurrently(foreign.f_retry, 8, tag, 0.2), timeout=90)
    assert all(isinstance(v, dict) for v in values), values
    ran = read_records(tag)
    assert len(ran) == 8
    assert_no_overlap(ran)


@pytest.mark.slow
def test_wait_from_dlock_tasks_setting_runs_all_without_overlap(foreign: ModuleType, tag: str) -> None:
    values = outcomes(send_concurrently(foreign.f_wait, 8, tag, 0.2), timeout=90)
    assert all(isinstance(v, dict) for v in values), values
    ran = read_records(tag)
    assert len(ran) == 8
    assert_no_overlap(ran)


def test_fail_raises_lock_not_acquired(foreign: ModuleType, tag: str) -> None:
    close_gate(tag)
    holder = foreign.f_fail.delay(tag, 0.0)
    wait_until(lambda: read_started(tag), 10)
    with pytest.raises(LockNotAcquired) as failure:
        foreign.f_fail.delay(tag, 0.0).get(timeout=20)
    assert not isinstance(failure.value, TaskSkipped)
    open_gate(tag)
    assert holder.get(timeout=10)["task_id"] == holder.id


def test_template_key_on_an_unbound_task(foreign: ModuleType, tag: str) -> None:
    results = [foreign.f_order.delay(tag, 1), foreign.f_order.delay(tag, order_id=2)]
    one, two = outcomes(results, timeout=20)
    assert {one["key"], two["key"]} == {f"order:{tag}:1", f"order:{tag}:2"}
    assert overlaps(one, two)


def test_dedup_on_publish_from_dlock_tasks(foreign: ModuleType, tag: str) -> None:
    close_gate(tag)
    first = foreign.f_dedup.delay(tag, 0.0)
    assert foreign.f_dedup.delay(tag, 0.0).id == first.id
    wait_until(lambda: read_started(tag), 10)
    assert foreign.f_dedup.s(tag, 0.0).apply_async().id == first.id  # signature path, while running
    open_gate(tag)
    first.get(timeout=15)
    assert len(read_records(tag)) == 1


@pytest.mark.slow
def test_killed_pool_process_frees_the_lock_quickly(foreign: ModuleType, tag: str) -> None:
    foreign.f_hold.delay(tag, 20)
    key = lock_key(foreign, foreign.f_hold, tag, 20)
    pid = int(wait_until(lambda: read_started(tag), 15)[0]["pid"])
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    wait_until(lambda: not records().exists(key), 10, interval=0.01)
    assert time.monotonic() - started < 1.5  # the lease is 30 s: the main process released it
