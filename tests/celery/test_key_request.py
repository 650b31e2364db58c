"""A lock_key callable may also take the request (queue, headers, ...): the publisher decides
the name, the worker locks exactly that name; the (args, kwargs) form keeps working."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest

from celery_dlock.celery import LockKeyRequest
from tests.celery.apps.common import read_records
from tests.celery.conftest import load_app, start_worker
from tests.celery.helpers import wait_until


@pytest.fixture(scope="module")
def keyrequest(celery_env: dict[str, str]) -> Iterator[ModuleType]:
    yield load_app("keyrequest")


def expected(module: ModuleType, tenant: str, task: object) -> str:
    return f"{module.app.conf.task_default_queue}:{tenant}:{task.name}"  # type: ignore[attr-defined]


@pytest.mark.parametrize("task_name", ["tenant_job", "plain_tenant_job"], ids=["LockedTask", "install"])
def test_publish_dedups_and_the_run_locks_by_a_key_computed_from_headers_and_queue(
    keyrequest: ModuleType, tag: str, task_name: str
) -> None:
    task = getattr(keyrequest, task_name)
    first = task.apply_async((tag, 1), headers={"tenant": "a"})
    # Other arguments, same tenant: the same lock, already queued -> not published again.
    same_tenant = task.apply_async((tag, 2), headers={"tenant": "a"})
    other_tenant = task.apply_async((tag, 3), headers={"tenant": "b"})
    assert same_tenant.id == first.id
    assert other_tenant.id != first.id
    worker = start_worker(keyrequest, concurrency=2)
    try:
        first.get(timeout=20)
        other_tenant.get(timeout=20)
    finally:
        worker.stop()
    keys = sorted(record["key"] for record in read_records(tag))
    assert keys == [expected(keyrequest, "a", task), expected(keyrequest, "b", task)]


def test_a_message_without_a_decided_name_is_named_from_the_request_the_worker_received(
    keyrequest: ModuleType, tag: str
) -> None:
    # app.send_task() never calls the task class, so nothing decides the name at publish:
    # the worker computes it from the message it got - the same name.
    task = keyrequest.tenant_skip
    worker = start_worker(keyrequest, concurrency=1)
    try:
        by_name = keyrequest.app.send_task(task.name, (tag, 1), headers={"tenant": "c"})
        by_name.get(timeout=20)
        wait_until(lambda: read_records(tag), 10)
        by_class = task.apply_async((tag, 2), headers={"tenant": "c"})
        by_class.get(timeout=20)
    finally:
        worker.stop()
    keys = [record["key"] for record in read_records(tag)]
    assert keys == [expected(keyrequest, "c", task)] * 2


def test_lock_name_for_gives_what_a_plain_delay_would_lock(keyrequest: ModuleType) -> None:
    for task in (keyrequest.tenant_job, keyrequest.tenant_skip):
        assert task.lock_name_for("x", 1) == expected(keyrequest, "None", task)


def test_the_request_a_key_sees_at_publish(keyrequest: ModuleType) -> None:
    from celery_dlock.celery.keyrequest import request_for_publish

    task = keyrequest.tenant_job
    seen = request_for_publish(task, "id-1", ("t", 1), {}, {"headers": {"tenant": "a"}, "priority": 3})
    assert seen == LockKeyRequest(
        task=task.name,
        id="id-1",
        queue=keyrequest.app.conf.task_default_queue,
        routing_key=keyrequest.app.conf.task_default_queue,
        priority=3,
        headers={"tenant": "a"},
    )


def test_a_message_published_again_keeps_the_name_decided_for_it(keyrequest: ModuleType, tag: str) -> None:
    # A lock retry or self.retry() publishes the message again with its headers: the
    # name decided the first time is kept, not worked out anew.
    from celery_dlock.keys import LockKeys
    from tests.celery.apps.common import records

    decided = f"decided-{tag}"
    result = keyrequest.tenant_job.apply_async((tag, 1), headers={"tenant": "z", "dlock_lock_name": decided})
    try:
        marker = LockKeys.for_name(decided, keyrequest.app.conf.dlock_prefix).extension("queued")
        assert records().get(marker) == result.id.encode()
    finally:
        with keyrequest.app.connection_for_write() as connection:
            connection.default_channel.queue_purge(keyrequest.app.conf.task_default_queue)
