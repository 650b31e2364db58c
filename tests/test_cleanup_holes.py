"""Clean-up holes: an exception landing between a successful attempt and the caller
receiving the lock leaves no lock behind and nothing for the watchdog to renew."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest
import redis
import redis.asyncio

from celery_dlock import DistributedLock, protocol
from celery_dlock.asyncio import DistributedLock as AsyncLock
from celery_dlock.watchdog import get_watchdog
from tests.support.protocols import protocols_and_paths

# Every client made from redis_url here speaks RESP2 in one run, RESP3 in the other.
redis_url = protocols_and_paths


class Interrupt(BaseException):
    """What a signal handler raising (a soft time limit, KeyboardInterrupt) looks like."""


def raise_as_it_returns(code: Any) -> Callable[..., Any]:
    """A trace function that raises Interrupt the moment ``code`` returns True: the
    latest point an asynchronous exception can land before the caller has the result."""

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "return" and arg is True:
            raise Interrupt
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        return local if event == "call" and frame.f_code is code else None

    return tracer


def test_an_interrupt_as_acquire_returns_inside_with_leaves_no_lock(r: redis.Redis, name: str) -> None:
    lock = DistributedLock(r, name, timeout=30, auto_renewal=True)
    sys.settrace(raise_as_it_returns(protocol.acquire.__code__))  # what `with` runs to acquire
    try:
        with pytest.raises(Interrupt), lock:
            pytest.fail("the body must not run")
    finally:
        sys.settrace(None)
    assert not r.exists(lock.keys.lock)
    assert lock.token is None
    assert get_watchdog().tracked_count() == 0


def test_an_interrupt_as_an_asyncio_acquire_returns_leaves_no_lock(redis_url: str, name: str) -> None:
    async def main() -> tuple[bool, int]:
        from celery_dlock.asyncio.watchdog import get_watchdog as get_async_watchdog

        client = redis.asyncio.Redis.from_url(redis_url)
        lock = AsyncLock(client, name, timeout=30, auto_renewal=True)
        sys.settrace(raise_as_it_returns(protocol.acquire.__code__))  # what `async with` runs
        try:
            with pytest.raises(Interrupt):
                async with lock:
                    pytest.fail("the body must not run")
        finally:
            sys.settrace(None)
        await asyncio.sleep(0.1)  # a clean-up may run as a task
        exists = bool(await client.exists(lock.keys.lock))
        tracked = get_async_watchdog().tracked_count()
        await client.aclose()
        return exists, tracked

    exists, tracked = asyncio.run(main())
    assert not exists and tracked == 0


@pytest.mark.slow
def test_a_release_whose_reply_is_lost_and_retried_returns_true_without_a_false_loss(name: str) -> None:
    from celery_dlock.embedded import RedisServer
    from tests.support.proxy import ChaosProxy

    with RedisServer() as server:
        proxy = ChaosProxy(server.port).start()
        try:
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            client = redis.Redis(port=proxy.port, retry=Retry(NoBackoff(), 3))  # retries a lost reply
            lost: list[object] = []
            lock = DistributedLock(client, name, timeout=30, on_lost=lost.append)
            assert lock.acquire() and lock.release()  # the server knows the scripts now
            assert lock.acquire()
            proxy.drop_next_reply.set()
            assert lock.release() is True
            assert not proxy.drop_next_reply.is_set()  # the reply really was lost
            assert lost == [] and not lock.lost and lock.token is None
            assert not redis.Redis(port=server.port).exists(lock.keys.lock)
        finally:
            proxy.stop()
