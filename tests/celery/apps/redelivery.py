"""acks_late tasks on a Redis broker with a short visibility timeout (messages come back fast)."""

from __future__ import annotations

from typing import Any

from celery_dlock.celery import LockedTask
from tests.celery.apps.common import make_app, run_recorded

app = make_app(
    "redelivery",
    broker_transport_options={
        "visibility_timeout": 2,  # an unacked message is delivered again after 2 s...
        "unacked_restore_interval": 1,  # ...checked every second
        "unacked_restore_throttle": 1,
    },
    worker_prefetch_multiplier=1,
)


@app.task(base=LockedTask, bind=True, acks_late=True, lock_timeout=2, on_contention="skip")
def acked_late(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)
