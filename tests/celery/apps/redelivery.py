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


# One task per contention policy, each waiting at most 1 s for an earlier delivery of
# its own task id before re-queueing itself 1 s later.
def _policy_task(policy: str) -> Any:
    @app.task(
        base=LockedTask,
        bind=True,
        acks_late=True,
        name=f"redelivery.late_{policy}",
        lock_timeout=2,
        on_contention=policy,
        lock_redelivery_wait=1.0,
        lock_retry_backoff=1.0,
        lock_retry_backoff_max=1.0,
    )
    def late(self: Any, tag: str, seconds: float) -> dict[str, Any]:
        return run_recorded(self, tag, seconds)

    return late


late_by_policy = {policy: _policy_task(policy) for policy in ("skip", "retry", "wait", "fail")}


@app.task(bind=True)
def probe(self: Any, tag: str) -> dict[str, Any]:
    """An unlocked task: it starts only when a pool process is free."""
    return run_recorded(self, tag, 0)
