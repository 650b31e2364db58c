"""Shared setup of the Celery apps the worker tests run (in the test process and in real workers).

Everything comes from environment variables set by ``tests/celery/conftest.py``
before the app module is imported, so the pytest process (publisher) and the
worker subprocess build the same app:

``DLOCK_TEST_BROKER``, ``DLOCK_TEST_BACKEND``, ``DLOCK_TEST_LOCK_URL`` (lock store),
``DLOCK_TEST_RUN`` (unique per session: queue names, key prefix, record lists).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery


def run_id() -> str:
    """Unique per test session; read when called, since this module may be imported early."""
    return os.environ.get("DLOCK_TEST_RUN", "dlock-test-local")


def lock_url() -> str:
    return os.environ.get("DLOCK_TEST_LOCK_URL", "redis://127.0.0.1:6379/0")


def queue_name(app_name: str) -> str:
    return f"{run_id()}-{app_name}"


def make_app(app_name: str, broker: str | None = None, **conf: Any) -> Celery:
    app = Celery(app_name, broker=broker or os.environ.get("DLOCK_TEST_BROKER", lock_url()))
    app.conf.update(
        result_backend=os.environ.get("DLOCK_TEST_BACKEND", lock_url()),
        task_default_queue=queue_name(app_name),
        dlock_prefix=f"{run_id()}:",
        dlock_redis_url=lock_url(),
        broker_connection_retry_on_startup=True,
        result_expires=3600,
        worker_hijack_root_logger=True,
        worker_redirect_stdouts=False,
        task_send_sent_event=False,
    )
    app.conf.update(conf)
    return app


_clients: dict[tuple[int, str], redis.Redis] = {}


def records() -> redis.Redis:
    """A client of the server that holds the locks and the test records."""
    key = (os.getpid(), lock_url())
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(key[1], socket_timeout=10)
    return _clients[key]


def record_list(tag: str) -> str:
    return f"{run_id()}:record:{tag}"


def started_list(tag: str) -> str:
    return f"{run_id()}:started:{tag}"


def gate_key(tag: str) -> str:
    return f"{run_id()}:gate:{tag}"


def close_gate(tag: str) -> None:
    """Runs of ``tag`` that start from now on hold until :func:`open_gate` (at most 60 s).

    Tests use it instead of long sleeps: "the holder is still running" is then a
    fact the test controls, not a race against a slow machine.
    """
    records().set(gate_key(tag), "closed", ex=300)


def open_gate(tag: str) -> None:
    records().set(gate_key(tag), "open", ex=300)


def _wait_for_gate(tag: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while records().get(gate_key(tag)) == b"closed" and time.monotonic() < deadline:
        time.sleep(0.02)


def run_recorded(task: Any, tag: str, seconds: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The body of most test tasks: note the start, sleep (and wait for a closed gate), note the interval.

    Intervals use ``time.monotonic()``, which on Linux is one clock for every
    process of the machine, so intervals of different workers can be compared.
    """
    lock = getattr(task, "lock", None)
    if lock is None:
        from celery_dlock.celery import current_lock

        lock = current_lock()
    start = time.monotonic()
    entry: dict[str, Any] = {
        "task_id": task.request.id,
        "pid": os.getpid(),
        "start": start,
        "fence": lock.fence if lock is not None else None,
        "key": lock.key if lock is not None else None,
        **(extra or {}),
    }
    records().rpush(started_list(tag), json.dumps(entry))
    time.sleep(seconds)
    _wait_for_gate(tag)
    if lock is not None:
        lock.ensure_held()
    entry["end"] = time.monotonic()
    records().rpush(record_list(tag), json.dumps(entry))
    return entry


def read_records(tag: str) -> list[dict[str, Any]]:
    return [json.loads(item) for item in records().lrange(record_list(tag), 0, -1)]


def read_started(tag: str) -> list[dict[str, Any]]:
    return [json.loads(item) for item in records().lrange(started_list(tag), 0, -1)]
