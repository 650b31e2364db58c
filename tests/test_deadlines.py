"""Every lock operation ends on the lock's own deadline, whatever the client's socket
timeout and retry policy (redis-py's defaults here: no socket timeout; Redis() retries
with backoff). Sync and asyncio."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
import redis.asyncio

from celery_dlock import DistributedLock, LockBackendUnavailable, LockError
from celery_dlock.asyncio import DistributedLock as AsyncLock
from celery_dlock.embedded import RedisServer
from tests.support.proxy import ChaosProxy

pytestmark = pytest.mark.slow

SLACK = 1.0  # "plus ~1 s"


def ends_within(seconds: float, call: object) -> tuple[float, object]:
    """Run ``call()``; (how long it took, its result or the exception it raised)."""
    started = time.monotonic()
    try:
        outcome: object = call()  # type: ignore[operator]
    except Exception as exc:
        outcome = exc
    took = time.monotonic() - started
    assert took < seconds, f"took {took:.1f} s (bound {seconds:.1f} s): {outcome!r}"
    return took, outcome


def test_a_waiter_whose_redis_is_killed_ends_on_its_blocking_timeout(
    own_redis: RedisServer, name: str
) -> None:
    client = redis.Redis(port=own_redis.port)  # retries with exponential backoff, no timeouts
    holder = DistributedLock(redis.Redis(port=own_redis.port), name, timeout=30)
    assert holder.acquire()
    waiter = DistributedLock(client, name, timeout=30, blocking_timeout=4)
    result: list[tuple[float, object]] = []
    thread = threading.Thread(target=lambda: result.append(ends_within(4 + SLACK, waiter.acquire)))
    thread.start()
    time.sleep(1.0)  # queued and waiting
    own_redis.kill()
    thread.join(30)
    [(_, outcome)] = result
    assert outcome is False or isinstance(outcome, LockBackendUnavailable)
    assert waiter.token is None


def test_a_single_attempt_and_a_release_behind_a_partition_end_on_the_lease(
    proxy: ChaosProxy, name: str
) -> None:
    client = redis.Redis(port=proxy.port)  # no socket timeout
    holder = DistributedLock(client, name, timeout=2)
    assert holder.acquire()
    proxy.cut()
    other = DistributedLock(client, name + "-other", timeout=2)
    _, outcome = ends_within(2 + SLACK, lambda: other.acquire(blocking=False))
    assert isinstance(outcome, LockBackendUnavailable) and str(proxy.port) in str(outcome)
    assert other.token is None
    _, outcome = ends_within(2 + SLACK, holder.release)
    assert isinstance(outcome, LockError)
    _, outcome = ends_within(2 + SLACK, lambda: holder.extend(5))
    assert isinstance(outcome, LockError)


def test_asyncio_operations_end_on_their_deadline_behind_a_partition(proxy: ChaosProxy, name: str) -> None:
    async def timed(seconds: float, call: object) -> object:
        started = time.monotonic()
        try:
            outcome: object = await call()  # type: ignore[operator]
        except Exception as exc:
            outcome = exc
        took = time.monotonic() - started
        assert took < seconds, f"took {took:.1f} s (bound {seconds:.1f} s): {outcome!r}"
        return outcome

    async def main() -> None:
        client = redis.asyncio.Redis(port=proxy.port)
        holder = AsyncLock(client, name, timeout=2)
        assert await holder.acquire()
        waiter = AsyncLock(client, name, timeout=2, blocking_timeout=3)
        proxy.cut()
        other = AsyncLock(client, name + "-other", timeout=2)
        outcome = await timed(2 + SLACK, lambda: other.acquire(blocking=False))
        assert isinstance(outcome, LockBackendUnavailable)
        outcome = await timed(3 + SLACK, waiter.acquire)
        assert outcome is False or isinstance(outcome, LockBackendUnavailable)
        assert isinstance(await timed(2 + SLACK, holder.release), LockError)
        assert isinstance(await timed(2 + SLACK, lambda: holder.extend(5)), LockError)

    asyncio.run(main())
