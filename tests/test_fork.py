"""Fork: a child does not hold its parent's locks (sync and asyncio)."""

from __future__ import annotations

import asyncio
import os

import pytest
import redis
import redis.asyncio

from celery_dlock import DistributedLock, LockLost
from celery_dlock.asyncio import DistributedLock as AsyncLock


def run_in_child(check: object) -> int:
    """Fork; run ``check`` in the child (its return is the exit code); the parent's exit code of it."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            code = check()  # type: ignore[operator]
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_forked_child_does_not_hold_its_parents_sync_lock(redis_url: str, name: str) -> None:
    client = redis.Redis.from_url(redis_url)
    lock = DistributedLock(client, name, timeout=30, auto_renewal=True)
    assert lock.acquire()
    token = lock.token

    def child() -> int:
        try:
            lock.ensure_held()
            return 1
        except LockLost:
            pass
        if not lock.lost:
            return 2
        if lock.extend(10) is not False:
            return 3
        if lock.release() is not False:
            return 4
        try:
            with lock:  # a with block on the inherited object, left normally
                pass
        except Exception:
            pass
        lock.__exit__(None, None, None)
        return 0

    assert run_in_child(child) == 0
    assert client.get(lock.keys.lock) == token.encode()  # untouched by the child
    lock.ensure_held()
    assert lock.release()


def test_leaving_a_with_block_in_a_forked_child_does_not_delete_the_parents_lock(
    redis_url: str, name: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    with DistributedLock(client, name, timeout=30) as lock:
        token = lock.token
        assert run_in_child(lambda: (lock.__exit__(None, None, None), 0)[1]) == 0
        assert client.get(lock.keys.lock) == token.encode()
    assert not client.exists(lock.keys.lock)


def test_a_forked_child_does_not_hold_its_parents_asyncio_lock(redis_url: str, name: str) -> None:
    async def take() -> AsyncLock:
        lock = AsyncLock(redis.asyncio.Redis.from_url(redis_url), name, timeout=30)
        assert await lock.acquire()
        return lock

    lock = asyncio.run(take())
    client = redis.Redis.from_url(redis_url)
    token = lock.token

    def child() -> int:
        async def check() -> int:
            lock.redis = redis.asyncio.Redis.from_url(redis_url)  # the parent's loop is gone
            try:
                lock.ensure_held()
                return 1
            except LockLost:
                pass
            if await lock.extend(10) is not False:
                return 3
            if await lock.release() is not False:
                return 4
            await lock.__aexit__(None, None, None)
            return 0

        return asyncio.run(check())

    assert run_in_child(child) == 0
    assert client.get(lock.keys.lock) == token.encode()

    async def release() -> bool:
        lock.redis = redis.asyncio.Redis.from_url(redis_url)
        return await lock.release()

    assert asyncio.run(release())


@pytest.fixture(autouse=True)
def _no_threads_warning(recwarn: pytest.WarningsRecorder) -> None:
    """os.fork() in a process with threads warns (Python 3.12+); that is what these tests do."""
