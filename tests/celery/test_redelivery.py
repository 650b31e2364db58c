"""Redelivery never parks a pool process and never re-runs finished work (Redis broker,
``acks_late``, a 2 s ``visibility_timeout`` shorter than the tasks)."""

from __future__ import annotations

import os
import signal
from types import ModuleType

import pytest
from kombu.transport import redis as kombu_redis

from celery_dlock.keys import LockKeys
from tests.celery.apps.common import close_gate, open_gate, read_started, records
from tests.celery.conftest import load_app, start_worker
from tests.celery.helpers import wait_until

# The broker must hand an unacknowledged message out again within seconds: kombu's Redis
# transport has the settings for that (unacked_restore_interval/_throttle) from 5.7; older
# ones scan for such messages every ~100 s.
pytestmark = pytest.mark.skipif(
    not hasattr(kombu_redis.Channel, "unacked_restore_throttle"),
    reason="this kombu's Redis transport cannot redeliver within the test's time",
)


@pytest.fixture
def redelivery(celery_env: dict[str, str]) -> ModuleType:
    return load_app("redelivery")


def lock_key(module: ModuleType, task: object, *args: object) -> str:
    name = task.lock_name_for(*args)  # type: ignore[attr-defined]
    return LockKeys.for_name(name, module.app.conf.dlock_prefix).lock


def test_a_copy_redelivered_while_the_first_delivery_runs_frees_its_pool_process(
    redelivery: ModuleType, tag: str
) -> None:
    # Two pool processes. The first runs the task and holds on a closed gate; the
    # broker hands the message out again 2 s later. That copy may wait for the first
    # delivery for lock_redelivery_wait (1 s), then must re-queue itself and give its
    # pool process back: an unrelated task sent then must start while the gate is closed.
    worker = start_worker(redelivery, concurrency=2)
    task = redelivery.late_by_policy["skip"]
    close_gate(tag)
    try:
        result = task.delay(tag, 0)
        wait_until(lambda: read_started(tag), 15, what="the first delivery to start")
        wait_until(
            lambda: "an earlier delivery of this same task id holds the lock" in worker.log(),
            20,
            what="the redelivered copy",
        )
        probe_tag = f"{tag}-probe"
        redelivery.probe.delay(probe_tag)
        wait_until(lambda: read_started(probe_tag), 15, what="the unrelated task to get a pool process")
        assert "re-queued this delivery" in worker.log()
        open_gate(tag)
        assert result.get(timeout=30)["task_id"] == result.id
        wait_until(lambda: "already ended with SUCCESS" in worker.log(), 20, what="the last copy to go")
        key = lock_key(redelivery, task, tag, 0)
        wait_until(lambda: not records().exists(key), 10, what="the lock to go")
    finally:
        open_gate(tag)
        worker.stop()
    assert len(read_started(tag)) == 1  # the body ran once


@pytest.mark.parametrize(
    "policy",
    [
        "retry",
        pytest.param("skip", marks=pytest.mark.slow),
        pytest.param("wait", marks=pytest.mark.slow),
        pytest.param("fail", marks=pytest.mark.slow),
    ],
)
def test_a_copy_redelivered_after_the_first_delivery_finished_does_not_run_again(
    redelivery: ModuleType, tag: str, policy: str
) -> None:
    # The first delivery stores SUCCESS and releases its lock, but its worker dies before
    # acknowledging the message (its main process is stopped, then killed): the broker
    # delivers it again. The lock is free by then; the copy must still not run the body.
    task = redelivery.late_by_policy[policy]
    first = start_worker(redelivery, concurrency=1)
    second = None
    close_gate(tag)
    try:
        result = task.delay(tag, 0)
        wait_until(lambda: read_started(tag), 15, what="the first delivery to start")
        os.kill(first.pid, signal.SIGSTOP)  # the pool process runs on; its result is never acked
        open_gate(tag)
        wait_until(lambda: result.state == "SUCCESS", 15, what="the first delivery to store SUCCESS")
        wait_until(lambda: not records().exists(lock_key(redelivery, task, tag, 0)), 10, what="the release")
        first.kill()
        second = start_worker(redelivery, concurrency=1)
        wait_until(
            lambda: "already ended with SUCCESS" in second.log() or len(read_started(tag)) > 1,
            30,
            what="the redelivered copy",
        )
    finally:
        open_gate(tag)
        first.stop()
        if second is not None:
            second.stop()
    assert len(read_started(tag)) == 1  # the body ran once
    assert result.state == "SUCCESS"
