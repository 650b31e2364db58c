"""App-wide settings of the Celery layer, read from ``app.conf`` (lower-case, ``dlock_`` prefix).

Shared by :mod:`celery_dlock.celery` (tasks) and :mod:`celery_dlock.beat`.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from celery_dlock.channel import dedicate_connection
from celery_dlock.connection import check_redis_url, client_options, redis_url_from_env
from celery_dlock.keys import DEFAULT_PREFIX, check_prefix

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def setting(conf: Any, name: str, default: Any = None) -> Any:
    """``app.conf[name]`` (or ``default`` when unset or None); works on plain objects too."""
    try:
        value = conf.get(name, default)
    except AttributeError:
        value = getattr(conf, name, default)
    return default if value is None else value


def lock_redis_url(conf: Any) -> str:
    """``dlock_redis_url``, else the broker URL when it is Redis, else ``REDIS_URL``/``REDIS_HOST``..."""
    url = setting(conf, "dlock_redis_url")
    if url:
        return check_redis_url(url, "dlock_redis_url")
    broker = setting(conf, "broker_url") or ""
    if isinstance(broker, str):
        first = broker.split(";")[0].strip()
        if first.startswith(REDIS_SCHEMES):
            return first
    return redis_url_from_env()


def lock_prefix(conf: Any) -> str:
    return check_prefix(setting(conf, "dlock_prefix", DEFAULT_PREFIX))


_clients: dict[tuple[int, str], Any] = {}
_clients_lock = threading.Lock()


def redis_client_for_app(app: Any) -> Any:
    """One redis-py client per process and lock URL for ``app`` (fork-safe: keyed by pid).

    The lock's scripts on it (a task run's acquire and release, the watchdog's
    renewals) keep one connection (:func:`celery_dlock.channel.dedicate_connection`)
    instead of checking one out of the pool for each, which costs a pool process
    more CPU than the lock's own work does. A Celery pool process runs one task at a
    time, so nothing waits for that connection; with a thread pool, a thread that finds
    it busy borrows one from the pool. Other commands, pipelines and waiters' pub/sub
    use the pool.
    """
    url = lock_redis_url(app.conf)
    key = (os.getpid(), url)
    client = _clients.get(key)
    if client is not None:
        return client
    import redis

    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = redis.Redis.from_url(url, **client_options())
            dedicate_connection(client)  # before any other thread can see the client
            _clients[key] = client
        return client
