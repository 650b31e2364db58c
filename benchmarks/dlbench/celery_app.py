"""The Celery app the P4/P5 workers run (``celery -A dlbench.celery_app worker``).

Configured from the environment the harness sets: ``DLBENCH_REDIS_URL`` (the private
server: broker, celery-dlock, celery-once and celery-singleton all use it),
``DLBENCH_PREFIX`` (counter keys) and ``DLBENCH_SLOW`` (P5 body, seconds).
Tasks of a library that is not importable are simply not defined.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery, Task

URL = os.environ.get("DLBENCH_REDIS_URL", "redis://127.0.0.1:6399/0")
PREFIX = os.environ.get("DLBENCH_PREFIX", "dlbench:")
SLOW = float(os.environ.get("DLBENCH_SLOW", "0.25"))
QUEUE = "dlbench"

app = Celery("dlbench", broker=URL)
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # celery-once
    ONCE={"backend": "celery_once.backends.Redis", "settings": {"url": URL, "default_timeout": 3600}},
    # celery-singleton
    singleton_backend_url=URL,
    singleton_key_prefix=PREFIX + "singleton:",
    # celery-dlock
    dlock_redis_url=URL,
    dlock_prefix=PREFIX + "dlock:",
)

_clients: dict[int, redis.Redis] = {}


def client() -> redis.Redis:
    pid = os.getpid()
    if pid not in _clients:
        _clients[pid] = redis.Redis.from_url(URL)
    return _clients[pid]


def counter(task_name: str, what: str) -> str:
    return f"{PREFIX}count:{task_name}:{what}"


def _fast(task: Task) -> None:
    client().incr(counter(task.name, "done"))


def _slow(task: Task) -> None:
    r = client()
    r.incr(counter(task.name, "started"))
    time.sleep(SLOW)
    r.incr(counter(task.name, "done"))


# name -> why it is missing (for the report)
MISSING: dict[str, str] = {}
P4_TASKS: dict[str, Any] = {}
P5_TASKS: dict[str, Any] = {}


@app.task(bind=True, name="dlbench.p4.plain")
def p4_plain(self: Task, i: int) -> None:
    _fast(self)


P4_TASKS["plain Task"] = p4_plain

#: The floor lock's compare-and-delete (as in P1), for the probe below.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_releases: dict[int, Any] = {}


def release_script() -> Any:
    pid = os.getpid()
    if pid not in _releases:
        _releases[pid] = client().register_script(_RELEASE)  # EVALSHA, loaded on first NOSCRIPT
    return _releases[pid]


@app.task(bind=True, name="dlbench.p4.probe")
def p4_probe(self: Task, i: int) -> None:
    """A plain task that also pays two bare round trips, the floor lock's (P1): SET NX PX and
    its token-checked release by EVALSHA. Its cost over plain is the yardstick of a lock's
    cost per task: P4's target is LockedTask at most 2x that."""
    key = f"{PREFIX}probe:{i}"
    client().set(key, "token", nx=True, px=60_000)
    release_script()(keys=[key], args=["token"])
    _fast(self)


P4_TASKS["probe: plain + 2 bare round trips"] = p4_probe

try:
    from celery_dlock.celery import LockedTask
except Exception as exc:
    MISSING["LockedTask"] = f"LockedTask not available: {exc!r}"
else:

    @app.task(bind=True, base=LockedTask, name="dlbench.p4.locked")
    def p4_locked(self: Task, i: int) -> None:
        _fast(self)

    @app.task(bind=True, base=LockedTask, on_contention="skip", name="dlbench.p5.locked_skip")
    def p5_locked_skip(self: Task, i: int) -> None:
        _slow(self)

    @app.task(bind=True, base=LockedTask, on_contention="skip", dedup_on_publish=True,
              name="dlbench.p5.locked_dedup")
    def p5_locked_dedup(self: Task, i: int) -> None:
        _slow(self)

    P4_TASKS["celery-dlock LockedTask"] = p4_locked
    P5_TASKS["celery-dlock LockedTask (skip)"] = p5_locked_skip
    P5_TASKS["celery-dlock LockedTask (dedup_on_publish)"] = p5_locked_dedup

try:
    from celery_once import QueueOnce
except Exception as exc:
    MISSING["QueueOnce"] = f"celery-once not available: {exc!r}"
else:

    @app.task(bind=True, base=QueueOnce, once={"graceful": True}, name="dlbench.p4.once")
    def p4_once(self: Task, i: int) -> None:
        _fast(self)

    @app.task(bind=True, base=QueueOnce, once={"graceful": True}, name="dlbench.p5.once")
    def p5_once(self: Task, i: int) -> None:
        _slow(self)

    P4_TASKS["celery-once QueueOnce"] = p4_once
    P5_TASKS["celery-once QueueOnce"] = p5_once

try:
    from celery_singleton import Singleton
except Exception as exc:
    MISSING["Singleton"] = f"celery-singleton not available: {exc!r}"
else:

    @app.task(bind=True, base=Singleton, name="dlbench.p4.singleton")
    def p4_singleton(self: Task, i: int) -> None:
        _fast(self)

    @app.task(bind=True, base=Singleton, name="dlbench.p5.singleton")
    def p5_singleton(self: Task, i: int) -> None:
        _slow(self)

    P4_TASKS["celery-singleton Singleton"] = p4_singleton
    P5_TASKS["celery-singleton Singleton"] = p5_singleton
