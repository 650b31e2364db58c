"""Tasks for the fault tests: killed pool processes, time limits, revoke(terminate=True), pools."""

from __future__ import annotations

import time
from typing import Any

from celery_dlock.celery import LockedTask, Wait
from tests.celery.apps.common import make_app, records, run_id, run_recorded

app = make_app("faults")

# lock_timeout=30: if the lock goes away within a second or two after its holder
# died, the worker's main process released it; the lease could not have expired.


@app.task(base=LockedTask, bind=True, lock_timeout=30, on_contention="skip")
def hold(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(base=LockedTask, bind=True, lock_timeout=30, time_limit=1.5, on_contention="skip")
def hold_time_limited(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(
    base=LockedTask, bind=True, lock_timeout=30, acks_late=True, reject_on_worker_lost=True,
    on_contention="skip",
)
def hold_acks_late(self: Any, tag: str, seconds: float, first_seconds: float) -> dict[str, Any]:
    """The first delivery sleeps ``first_seconds`` (to be killed), later ones ``seconds``."""
    delivery = int(records().incr(f"{run_id()}:deliveries:{tag}"))
    return run_recorded(self, tag, first_seconds if delivery == 1 else seconds, {"delivery": delivery})


@app.task(base=LockedTask, bind=True, lock_timeout=1, on_contention="skip")
def renewed(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    started = time.monotonic()
    entry = run_recorded(self, tag, seconds)  # ends with self.lock.ensure_held()
    entry["held_for"] = time.monotonic() - started
    return entry


@app.task(base=LockedTask, bind=True, lock_timeout=30, on_contention=Wait(timeout=20, then="fail"))
def hold_or_wait(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)
