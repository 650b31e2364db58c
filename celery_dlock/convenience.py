"""``distributed_lock`` (context manager), ``distributed_lock_decorator`` and ``get_redis`` (sync)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from celery_dlock.connection import check_redis_url, client_options, redis_url_from_env
from celery_dlock.lock import DistributedLock
from celery_dlock.naming import LockDecorator, bare_decoration, lock_name_for

F = TypeVar("F", bound=Callable[..., Any])


def get_redis(url: str | None = None) -> Any:
    """A ``redis.Redis`` client for ``url``, else ``REDIS_URL``, else ``REDIS_HOST``/``REDIS_PORT``/...

    The client has socket timeouts, so a dead server gives an error, not a hang.
    """
    import redis

    url = check_redis_url(url if url is not None else redis_url_from_env(), "url")
    return redis.Redis.from_url(url, **client_options())


_default_clients: dict[tuple[int, str], Any] = {}


def default_redis() -> Any:
    """One shared :func:`get_redis` client per process and URL (used when ``redis=None``)."""
    import os

    key = (os.getpid(), redis_url_from_env())
    client = _default_clients.get(key)
    if client is None:
        client = _default_clients[key] = get_redis(key[1])
    return client


@contextmanager
def distributed_lock(lock_name: str, redis: Any = None, **options: Any) -> Iterator[DistributedLock]:
    """Hold ``lock_name`` for the ``with`` block; raises :class:`LockNotAcquired` if it cannot.

    ``redis=None`` uses :func:`get_redis`. ``options`` are those of :class:`DistributedLock`.
    """
    lock = DistributedLock(redis if redis is not None else default_redis(), lock_name, **options)
    with lock:
        yield lock


def _decorator(name: Any = None, redis: Any = None, **options: Any) -> Any:
    """Run the decorated function while holding a lock.

    Usable bare (``@distributed_lock_decorator``), called (``@distributed_lock_decorator()``),
    with a name (``@distributed_lock_decorator("nightly", timeout=60)``) or with a template
    over the function's arguments (``@distributed_lock_decorator("order:{order_id}")``).
    The default name is the function's module-qualified name.
    """
    bare = bare_decoration(name, redis, options)
    if bare is not None:
        return _decorator()(bare)

    def decorate(func: F) -> F:
        lock_name = lock_name_for(func, name)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            client = redis if redis is not None else default_redis()
            with DistributedLock(client, lock_name(args, kwargs), **options):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


_decorator.__name__ = _decorator.__qualname__ = "distributed_lock_decorator"
distributed_lock_decorator: LockDecorator = _decorator
