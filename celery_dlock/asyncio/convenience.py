"""``distributed_lock``, ``distributed_lock_decorator`` and ``get_redis`` for asyncio."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from celery_dlock.connection import check_redis_url, client_options, redis_url_from_env
from celery_dlock.naming import LockDecorator, bare_decoration, lock_name_for

from .lock import DistributedLock

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def get_redis(url: str | None = None) -> Any:
    """A ``redis.asyncio.Redis`` client for ``url``, else ``REDIS_URL``, else ``REDIS_HOST``/..."""
    import redis.asyncio

    url = check_redis_url(url if url is not None else redis_url_from_env(), "url")
    return redis.asyncio.Redis.from_url(url, **client_options())


_default_clients: dict[tuple[int, int, str], Any] = {}


def default_redis() -> Any:
    """One shared :func:`get_redis` client per process, event loop and URL (used when ``redis=None``)."""
    key = (os.getpid(), id(asyncio.get_running_loop()), redis_url_from_env())
    client = _default_clients.get(key)
    if client is None:
        client = _default_clients[key] = get_redis(key[2])
    return client


@asynccontextmanager
async def distributed_lock(
    lock_name: str, redis: Any = None, **options: Any
) -> AsyncIterator[DistributedLock]:
    """Hold ``lock_name`` for the ``async with`` block; raises :class:`LockNotAcquired` if it cannot."""
    lock = DistributedLock(redis if redis is not None else default_redis(), lock_name, **options)
    async with lock:
        yield lock


def _decorator(name: Any = None, redis: Any = None, **options: Any) -> Any:
    """Run the decorated coroutine function while holding a lock (same forms as the sync decorator)."""
    bare = bare_decoration(name, redis, options)
    if bare is not None:
        return _decorator()(bare)

    def decorate(func: F) -> F:
        if not inspect.iscoroutinefunction(func):
            raise TypeError(
                f"celery_dlock.asyncio.distributed_lock_decorator needs a coroutine function, got {func!r}; "
                "use celery_dlock.distributed_lock_decorator for plain functions"
            )
        lock_name = lock_name_for(func, name)

        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            client = redis if redis is not None else default_redis()
            async with DistributedLock(client, lock_name(args, kwargs), **options):
                return await func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


_decorator.__name__ = _decorator.__qualname__ = "distributed_lock_decorator"
distributed_lock_decorator: LockDecorator = _decorator
