"""The acceptance runs with RabbitMQ as broker and Redis as lock store and result backend.

Skipped (with the reason) when nothing listens on the broker's port - except in CI
(``CI=true``), where a missing RabbitMQ is a failure: CI must run these.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from types import ModuleType
from urllib.parse import urlparse

import pytest

from celery_dlock.celery import TaskSkipped
from tests.celery.apps.common import close_gate, open_gate, read_records, read_started
from tests.celery.conftest import load_app, start_worker
from tests.celery.helpers import assert_no_overlap, outcomes, send_concurrently, wait_until

AMQP_ADDRESS = urlparse(os.environ.get("DLOCK_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"))
WHERE = (AMQP_ADDRESS.hostname or "127.0.0.1", AMQP_ADDRESS.port or 5672)
IN_CI = os.environ.get("CI") == "true"


def rabbitmq_listening() -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(WHERE) == 0


LISTENING = rabbitmq_listening()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not LISTENING and not IN_CI, reason=f"RabbitMQ is not listening on {WHERE[0]}:{WHERE[1]}"
    ),
]


@pytest.fixture(scope="module")
def amqp(celery_env: dict[str, str]) -> Iterator[ModuleType]:
    if not LISTENING:
        where = f"{WHERE[0]}:{WHERE[1]}"
        pytest.fail(f"CI=true and RabbitMQ is not listening on {where}: these tests must run in CI")
    module = load_app("amqp")
    module.worker = start_worker(module, concurrency=2)
    try:
        yield module
    finally:
        module.worker.stop()  # tests may have replaced it


def test_skip_20_concurrent_sends_run_once(amqp: ModuleType, tag: str) -> None:
    close_gate(tag)  # the first run holds its lock until all 20 were handled
    results = send_concurrently(amqp.skip_task, 20, tag, 0.1)
    wait_until(lambda: sum(r.ready() for r in results) == 19, 60, interval=0.05, what="19 skips")
    open_gate(tag)
    values = outcomes(results, timeout=60)
    ran = read_records(tag)
    assert len(ran) == 1
    assert sum(isinstance(v, TaskSkipped) for v in values) == 19
    assert {v.holder for v in values if isinstance(v, TaskSkipped)} == {ran[0]["task_id"]}


def test_retry_20_concurrent_sends_all_run_never_overlapping(amqp: ModuleType, tag: str) -> None:
    values = outcomes(send_concurrently(amqp.retry_task, 20, tag, 0.2), timeout=120)
    assert all(isinstance(v, dict) for v in values), values
    ran = read_records(tag)
    assert len(ran) == 20
    assert_no_overlap(ran)


def test_wait_20_concurrent_sends_all_run_never_overlapping(amqp: ModuleType, tag: str) -> None:
    values = outcomes(send_concurrently(amqp.wait_task, 20, tag, 0.2), timeout=120)
    assert all(isinstance(v, dict) for v in values), values
    ran = read_records(tag)
    assert len(ran) == 20
    assert_no_overlap(ran)


def test_dedup_on_publish_returns_the_existing_id(amqp: ModuleType, tag: str) -> None:
    close_gate(tag)
    first = amqp.dedup_task.delay(tag, 0.0)
    assert amqp.dedup_task.delay(tag, 0.0).id == first.id
    wait_until(lambda: read_started(tag), 10)
    assert amqp.dedup_task.delay(tag, 0.0).id == first.id
    open_gate(tag)
    first.get(timeout=15)
    assert len(read_records(tag)) == 1


def test_acks_late_task_redelivered_after_its_worker_died_runs_once_not_concurrently(
    amqp: ModuleType, tag: str
) -> None:
    # RabbitMQ hands an unacked message to another consumer as soon as the dead
    # worker's connection drops, long before the dead run's 2 s lease ends: the
    # redelivered run must wait for that lease, then run once.
    amqp.worker.stop()  # this test wants to know which worker gets the message first
    first = start_worker(amqp, concurrency=1)
    second = None
    try:
        result = amqp.acked_late.delay(tag, 3.0)
        dead_run = wait_until(lambda: read_started(tag), 15)[0]
        second = start_worker(amqp, concurrency=1)
        first.kill()
        killed_at = time.monotonic()
        value = result.get(timeout=40)
        # It arrived while the dead run's lease still held the lock, and waited for it.
        assert "an earlier delivery of this same task id holds the lock" in second.log()
    finally:
        first.stop()
        if second is not None:
            second.stop()
        amqp.worker = start_worker(amqp, concurrency=2)
    completed = read_records(tag)
    assert len(completed) == 1 and value["task_id"] == result.id
    assert completed[0]["start"] > killed_at and completed[0]["pid"] != dead_run["pid"]
    assert completed[0]["fence"] > dead_run["fence"]
