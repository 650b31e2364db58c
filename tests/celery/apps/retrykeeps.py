"""A lock retry re-queues the same call: what the re-queued message still carries."""

from __future__ import annotations

import json
from typing import Any

from celery_dlock.celery import LockedTask, Retry
from tests.celery.apps.common import _wait_for_gate, make_app, record_list, records

app = make_app("retrykeeps")


@app.task(
    base=LockedTask, bind=True, lock_key=["tag"], lock_timeout=10,
    on_contention=Retry(backoff=0.1, backoff_max=0.2, max_retries=100), shared=False,
)
def keeps(self: Any, tag: str, role: str) -> str:
    request = self.request
    headers = request.headers or {}
    records().rpush(record_list(tag), json.dumps({
        "role": role,
        "id": request.id,
        "trace": getattr(request, "x_trace", None) or headers.get("x_trace"),
        "priority": (request.delivery_info or {}).get("priority"),
        "expires": str(request.expires) if request.expires else None,
        "callbacks": len(request.callbacks or []),
        "errbacks": len(request.errbacks or []),
    }))
    if role == "holder":
        _wait_for_gate(tag)
    return role


@app.task(shared=False)
def after(result: Any, tag: str) -> None:
    records().rpush(f"{record_list(tag)}:after", json.dumps(result))
