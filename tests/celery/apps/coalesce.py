"""Tasks for tests/celery/test_coalesce.py: the skip policy and calls covered by a later-started run."""

from __future__ import annotations

from typing import Any

from celery_dlock.celery import LockedTask
from tests.celery.apps.common import make_app, records, run_id, run_recorded

app = make_app("coalesce")


@app.task(base=LockedTask, bind=True, lock_timeout=5, on_contention="skip")
def refresh(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(base=LockedTask, bind=True, lock_timeout=5, on_contention="skip", lock_skip_covered=False)
def refresh_every_call(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


def fail_once_key(tag: str) -> str:
    return f"{run_id()}:fail-once:{tag}"


@app.task(base=LockedTask, bind=True, lock_timeout=5, on_contention="skip")
def fails_first_time(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    entry = run_recorded(self, tag, seconds)
    if records().set(fail_once_key(tag), "failed", nx=True, ex=300):
        raise RuntimeError("the first run fails")
    return entry


@app.task(base=LockedTask, bind=True, lock_timeout=5, lock_key="order:{order_id}", on_contention="skip")
def charge(self: Any, tag: str, order_id: int) -> dict[str, Any]:
    return run_recorded(self, tag, 0.2, {"op": "charge"})


@app.task(base=LockedTask, bind=True, lock_timeout=5, lock_key="order:{order_id}", on_contention="skip")
def refund(self: Any, tag: str, order_id: int) -> dict[str, Any]:
    return run_recorded(self, tag, 0.2, {"op": "refund"})


@app.task(base=LockedTask, bind=True, lock_timeout=5, lock_key="task", on_contention="skip")
def notify_user(self: Any, tag: str, user: int) -> dict[str, Any]:
    return run_recorded(self, tag, 0.1, {"user": user})
