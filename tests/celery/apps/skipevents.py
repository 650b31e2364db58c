"""Skipped runs and the Celery events they send (the worker runs with task events on)."""

from __future__ import annotations

from typing import Any

from celery_dlock.celery import LockedTask
from tests.celery.apps.common import make_app, records, run_recorded

app = make_app("skipevents", worker_send_task_events=True)


@app.task(base=LockedTask, bind=True, lock_timeout=10, on_contention="skip", lock_skip_state="failure")
def as_failure(self: Any, tag: str) -> dict[str, Any]:
    return run_recorded(self, tag, 0.0)


@app.task(base=LockedTask, bind=True, lock_timeout=10, on_contention="skip", lock_skip_state="revoked")
def as_revoked(self: Any, tag: str) -> dict[str, Any]:
    return run_recorded(self, tag, 0.0)


@app.task
def on_error(task_id: str, tag: str) -> None:
    """A link_error errback (the task id form): notes the task id it was called for."""
    records().rpush(f"errback:{tag}", task_id)


@app.task
def mark(tag: str, what: str) -> str:
    """A plain task that notes it ran (canvas members after or beside a skip)."""
    records().rpush(f"ran:{tag}", what)
    return what


@app.task
def gather(results: list[Any], tag: str) -> list[Any]:
    """A chord body."""
    records().rpush(f"ran:{tag}", "chord-body")
    return results
