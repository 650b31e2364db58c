"""Tasks for tests/celery/test_worker.py: every policy and key kind, on a Redis broker."""

from __future__ import annotations

import time
from typing import Any

from celery.exceptions import Ignore, Reject

from celery_dlock.celery import LockedTask, Retry, Wait
from tests.celery.apps.common import make_app, records, run_recorded

app = make_app("basic")


@app.task(base=LockedTask, bind=True, lock_timeout=2, on_contention="skip")
def skip_task(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(
    base=LockedTask, bind=True, lock_timeout=2,
    on_contention=Retry(backoff=0.05, backoff_max=0.4, max_retries=400),
)
def retry_task(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(base=LockedTask, bind=True, lock_timeout=2, on_contention=Wait(timeout=60, then="fail"))
def wait_task(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(
    base=LockedTask, bind=True, lock_timeout=2,
    on_contention=Retry(backoff=0.05, backoff_max=0.1, max_retries=2, jitter=False),
)
def retry_few(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(
    base=LockedTask, bind=True, lock_timeout=2,
    on_contention=Wait(timeout=0.2, then=Retry(backoff=0.1, backoff_max=0.3, max_retries=100)),
)
def wait_then_retry(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(base=LockedTask, bind=True, lock_timeout=2, on_contention="fail")
def fail_task(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(base=LockedTask, bind=True, lock_timeout=2, lock_key="order:{tag}:{order_id}", on_contention="wait")
def order_task(self: Any, tag: str, order_id: int, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds, {"order_id": order_id})


@app.task(base=LockedTask, bind=True, lock_timeout=2, on_contention="wait")
def key_of_call(self: Any, tag: str, value: Any, other: Any = ("a", 1), *, note: str = "n") -> str:
    """Returns the lock key the worker computed for this call."""
    assert self.lock is not None
    return str(self.lock.key)


@app.task(base=LockedTask, bind=True, lock_timeout=2, lock_key=["tag", "value"], on_contention="wait")
def key_of_listed(self: Any, tag: str, value: Any, ignored: Any = None) -> str:
    assert self.lock is not None
    return str(self.lock.key)


@app.task(base=LockedTask, bind=True, lock_timeout=1, on_contention="skip")
def long_task(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    """Runs several times longer than its lease; the lease must follow."""
    assert self.lock is not None
    ttls = []
    deadline = time.monotonic() + seconds
    start = time.monotonic()
    while time.monotonic() < deadline:
        ttls.append(int(records().pttl(self.lock.keys.lock)))
        time.sleep(0.1)
    self.lock.ensure_held()
    return {"ttls": ttls, "fence": self.lock.fence, "start": start, "end": time.monotonic()}


@app.task(
    base=LockedTask, bind=True, lock_timeout=2, max_retries=1, default_retry_delay=0,
    on_contention=Retry(backoff=0.05, backoff_max=0.2, max_retries=100),
)
def self_retrying(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    """Calls self.retry() once; its max_retries=1 must survive any number of lock retries."""
    entry = run_recorded(self, tag, seconds, {"retries": self.request.retries})
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return entry


@app.task(base=LockedTask, bind=True, lock_timeout=30, on_contention="skip")
def ends_with(self: Any, tag: str, how: str) -> dict[str, Any]:
    """Ends with Ignore or Reject (Celery skips after_return for both): the lock must still go."""
    run_recorded(self, tag, 0.1)
    if how == "ignore":
        raise Ignore()
    if how == "reject":
        raise Reject("rejected on purpose", requeue=False)
    raise ValueError(how)


@app.task(base=LockedTask, bind=True, lock_timeout=2, dedup_on_publish=True, on_contention="skip")
def dedup_task(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    return run_recorded(self, tag, seconds)


@app.task(
    base=LockedTask, bind=True, lock_timeout=2, dedup_on_publish=True, max_retries=1, default_retry_delay=0.5,
    on_contention="skip",
)
def dedup_self_retrying(self: Any, tag: str, seconds: float) -> dict[str, Any]:
    entry = run_recorded(self, tag, seconds, {"retries": self.request.retries})
    if self.request.retries == 0:
        raise self.retry()
    return entry


# -- signal counters: the worker records every lock event per key, the tests read them --

from celery_dlock.celery.signals import lock_acquired, lock_contended, lock_released  # noqa: E402
from tests.celery.apps.common import run_id  # noqa: E402

RUN = run_id()


def events_key(key: str) -> str:
    return f"{RUN}:events:{key}"


@lock_contended.connect
def _count_contended(sender: Any = None, key: str = "", action: str = "", **_: Any) -> None:
    records().hincrby(events_key(key), f"contended:{action}", 1)


@lock_acquired.connect
def _count_acquired(sender: Any = None, key: str = "", **_: Any) -> None:
    records().hincrby(events_key(key), "acquired", 1)


@lock_released.connect
def _count_released(sender: Any = None, key: str = "", released: bool = False, **_: Any) -> None:
    records().hincrby(events_key(key), "released" if released else "released-late", 1)
