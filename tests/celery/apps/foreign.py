"""Signal mode: tasks with a foreign base class (own ``__call__``), locked by ``install()``."""

from __future__ import annotations

from typing import Any

from celery import Task

import celery_dlock
from celery_dlock.celery import Retry, Wait
from tests.celery.apps.common import make_app, records, run_id, run_recorded


class AuditedTask(Task):  # type: ignore[misc]
    """Somebody else's base class: it wraps every call and must keep doing so."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        records().incr(f"{run_id()}:audited:{self.name}")
        return super().__call__(*args, **kwargs)


app = make_app("foreign")
PREFIX = "tests.celery.apps.foreign."

# Two of the tasks are configured through the setting, the others through install().
app.conf.dlock_tasks = {
    PREFIX + "f_wait": {"lock_timeout": 2, "on_contention": Wait(timeout=60, then="fail")},
    PREFIX + "f_dedup": {"lock_timeout": 2, "dedup_on_publish": True},
}
celery_dlock.install(
    app,
    tasks={
        PREFIX + "f_skip": {"lock_timeout": 2, "on_contention": "skip"},
        PREFIX + "f_retry": {
            "lock_timeout": 2, "on_contention": Retry(backoff=0.05, backoff_max=0.4, max_retries=400),
        },
        PREFIX + "f_fail": {"lock_timeout": 2, "on_contention": "fail"},
        PREFIX + "f_order": {"lock_key": "order:{tag}:{order_id}", "on_contention": "skip"},
        PREFIX + "f_hold": {"lock_timeout": 30},
    },
)


@app.task(base=AuditedTask, bind=True)
def f_skip(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(base=AuditedTask, bind=True)
def f_retry(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(base=AuditedTask, bind=True)
def f_wait(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(base=AuditedTask, bind=True)
def f_fail(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(base=AuditedTask, bind=True)
def f_dedup(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(base=AuditedTask, bind=True)
def f_hold(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(base=AuditedTask)
def f_order(tag: str, order_id: int, seconds: float = 0.5) -> dict[str, Any]:
    """Not bound: the lock still comes from the call's arguments."""
    return run_recorded(f_order, tag, seconds, {"order_id": order_id})
