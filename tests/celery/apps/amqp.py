"""The acceptance tasks again, with RabbitMQ as broker (Redis stays the lock store and result backend)."""

from __future__ import annotations

import os
from typing import Any

from kombu import Queue

from celery_dlock.celery import LockedTask, Retry
from tests.celery.apps.common import make_app, queue_name, run_recorded

AMQP_URL = os.environ.get("DLOCK_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
QUEUE = queue_name("amqp")

app = make_app(
    "amqp",
    broker=AMQP_URL,
    # The queue disappears a minute after its last use: test runs leave nothing behind.
    task_queues=[Queue(QUEUE, queue_arguments={"x-expires": 60_000})],
    task_default_queue=QUEUE,
)


@app.task(base=LockedTask, bind=True, lock_timeout=2, on_contention="skip")
def skip_task(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(
    base=LockedTask, bind=True, lock_timeout=2,
    on_contention=Retry(backoff=0.05, backoff_max=0.4, max_retries=400),
)
def retry_task(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(base=LockedTask, bind=True, lock_timeout=2, on_contention="wait")
def wait_task(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(base=LockedTask, bind=True, lock_timeout=2, acks_late=True, on_contention="skip")
def acked_late(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(base=LockedTask, bind=True, lock_timeout=2, dedup_on_publish=True)
def dedup_task(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)
