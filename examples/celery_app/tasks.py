"""Tasks showing each contention policy and kind of lock key.

Every task records its run (start, end, worker pid) in a Redis list so the
demo can show what ran, what was skipped and that nothing overlapped.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis

from celery_dlock.celery import LockedTask, Retry
from examples.celery_app.app import REDIS_URL, app

RUNS_KEY = os.environ.get("DEMO_RUNS_KEY", "celery-dlock-demo:runs")
_client = redis.Redis.from_url(REDIS_URL)


def record(task: Any, **details: Any) -> None:
    _client.rpush(RUNS_KEY, json.dumps({"task": task.name.rsplit(".", 1)[-1], "pid": os.getpid(), **details}))


@app.task(bind=True, base=LockedTask, on_contention="skip", lock_timeout=10)
def build_daily_report(self: Any, day: str) -> str:
    """Default key: the task and all its arguments. A duplicate while one runs is skipped."""
    start = time.time()
    time.sleep(1.5)
    record(self, args=[day], start=start, end=time.time(), fence=self.lock.fence)
    return f"report for {day}"


@app.task(bind=True, base=LockedTask, lock_key=["order_id"], on_contention="wait", lock_wait=60)
def charge_order(self: Any, order_id: int, amount_cents: int) -> str:
    """Per-argument key: charges of one order never overlap; other orders run alongside."""
    start = time.time()
    time.sleep(0.3)
    record(self, args=[order_id, amount_cents], start=start, end=time.time(), fence=self.lock.fence)
    return f"charged {amount_cents} to order {order_id}"


@app.task(bind=True, base=LockedTask, lock_key="task", on_contention=Retry(backoff=0.5, max_retries=30))
def sync_inventory(self: Any, warehouse: str) -> str:
    """Task-wide key: one inventory sync at a time; the others re-queue with backoff."""
    start = time.time()
    time.sleep(0.3)
    record(self, args=[warehouse], start=start, end=time.time(), fence=self.lock.fence)
    return f"synced {warehouse}"


@app.task(bind=True, base=LockedTask, lock_key="feed:{feed_url}", on_contention="fail")
def import_feed(self: Any, feed_url: str) -> str:
    """Template key: a second import of the same feed fails at once with LockNotAcquired."""
    start = time.time()
    time.sleep(1.0)
    record(self, args=[feed_url], start=start, end=time.time(), fence=self.lock.fence)
    return f"imported {feed_url}"


@app.task(bind=True, base=LockedTask, lock_key="task", on_contention="skip")
def refresh_exchange_rates(self: Any) -> str:
    """Periodic (see beat_schedule): beat dedups the tick, the lock skips a run that overlaps the last."""
    start = time.time()
    time.sleep(0.2)
    record(self, args=[], start=start, end=time.time(), fence=self.lock.fence)
    return "rates refreshed"
