"""dedup_on_publish tasks that re-publish themselves (the classic polling loop)."""

from __future__ import annotations

from typing import Any

from celery_dlock.celery import LockedTask, Retry
from tests.celery.apps.common import make_app, record_list, records, run_recorded

app = make_app("republish")


@app.task(
    base=LockedTask, bind=True, lock_key=["tag"], dedup_on_publish=True, lock_timeout=10,
    on_contention=Retry(backoff=0.05, max_retries=100),
)
def poll(self: Any, tag: str, remaining: int, countdown: float) -> str:
    records().rpush(record_list(tag), self.request.id)
    if remaining > 0:
        self.apply_async((tag, remaining - 1, countdown), countdown=countdown)
    return self.request.id


@app.task(base=LockedTask, bind=True, lock_key=["tag"], dedup_on_publish=True, lock_timeout=10)
def held(self: Any, tag: str) -> dict[str, Any]:
    return run_recorded(self, tag, 0.0)
