"""Tasks whose lock store is a Redis server the test stops (broker and results stay up)."""

from __future__ import annotations

import os
from typing import Any

from celery_dlock.celery import LockedTask, Retry
from tests.celery.apps.common import make_app, run_recorded

app = make_app("lockstore", dlock_redis_url=os.environ.get("DLOCK_TEST_OWN_LOCK_URL"))


@app.task(base=LockedTask, bind=True, lock_timeout=2, on_contention="skip")
def down_skip(self: Any, tag: str) -> dict[str, Any]:
    return run_recorded(self, tag, 0.0)


@app.task(base=LockedTask, bind=True, lock_timeout=2, on_contention="fail")
def down_fail(self: Any, tag: str) -> dict[str, Any]:
    return run_recorded(self, tag, 0.0)


@app.task(
    base=LockedTask, bind=True, lock_timeout=2,
    on_contention=Retry(backoff=0.3, backoff_max=0.6, max_retries=60),
)
def down_retry(self: Any, tag: str) -> dict[str, Any]:
    return run_recorded(self, tag, 0.0)


@app.task(base=LockedTask, bind=True, lock_timeout=2, on_contention="wait", lock_on_redis_error="run")
def down_run(self: Any, tag: str) -> dict[str, Any]:
    return run_recorded(self, tag, 0.0)
