"""A counter incremented non-atomically under a LockedTask lock, for the contention test."""

from __future__ import annotations

import os
import time
from typing import Any

from celery_dlock.celery import LockedTask
from tests.celery.apps.common import make_app, records, run_id

app = make_app("contention")


@app.task(
    base=LockedTask,
    bind=True,
    lock_key="counter:{name}",
    lock_timeout=10,
    on_contention="wait",
    lock_wait=120,
)
def increment(self: Any, name: str) -> None:
    client = records()
    start = time.monotonic()
    value = int(client.get(f"{run_id()}:counter:{name}") or 0)  # read ...
    time.sleep(0.001)
    client.set(f"{run_id()}:counter:{name}", value + 1)  # ... write: only safe under the lock
    end = time.monotonic()
    client.rpush(f"{run_id()}:intervals:{name}", f"{start} {end} {self.lock.fence} {os.getpid()}")
