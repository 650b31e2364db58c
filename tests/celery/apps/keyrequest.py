"""Lock keys computed from the message: a lock per tenant header and queue."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import celery_dlock
from celery_dlock.celery import LockedTask, LockKeyRequest
from tests.celery.apps.common import make_app, run_recorded

app = make_app("keyrequest")


def by_tenant(args: Sequence[Any], kwargs: Mapping[str, Any], request: LockKeyRequest) -> str:
    return f"{request.queue}:{request.headers.get('tenant')}:{request.task}"


def by_tenant_keyword(args: Sequence[Any], kwargs: Mapping[str, Any], *, request: LockKeyRequest) -> str:
    return f"{request.queue}:{request.headers.get('tenant')}:{request.task}"


@app.task(base=LockedTask, bind=True, lock_key=by_tenant, dedup_on_publish=True, lock_timeout=10)
def tenant_job(self: Any, tag: str, n: int) -> dict[str, Any]:
    return run_recorded(self, tag, 0.0)


@app.task(base=LockedTask, bind=True, lock_key=by_tenant_keyword, lock_timeout=10, on_contention="skip")
def tenant_skip(self: Any, tag: str, n: int) -> dict[str, Any]:
    return run_recorded(self, tag, 0.0)


@app.task(bind=True)
def plain_tenant_job(self: Any, tag: str, n: int) -> dict[str, Any]:
    """Locked by install() (signal mode), same key function."""
    return run_recorded(self, tag, 0.0)


celery_dlock.install(app, tasks={plain_tenant_job.name: {"lock_key": by_tenant, "dedup_on_publish": True}})
