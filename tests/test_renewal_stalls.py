"""Renewal never stalls other locks and never spins (a batch outstanding on a frozen
connection; a slow on_lost callback)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
import redis.asyncio

from celery_dlock import DistributedLock
from celery_dlock.asyncio import DistributedLock as AsyncLock
from celery_dlock.embedded import RedisServer
from tests.support.proxy import ChaosProxy

pytestmark = pytest.mark.slow


def test_the_watchdog_does_not_spin_while_a_batch_waits_on_a_frozen_connection(
    proxy: ChaosProxy, own_redis: RedisServer, name: str
) -> None:
    frozen = redis.Redis.from_url(proxy.url)  # redis-py's defaults: no socket timeout
    direct = redis.Redis.from_url(own_redis.url)
    lost: list[str] = []

    def renewed(client: redis.Redis, suffix: str, timeout: float) -> DistributedLock:
        return DistributedLock(
            client, name + suffix, timeout=timeout, auto_renewal=True, on_lost=lambda _: lost.append(suffix)
        )

    first = renewed(frozen, "a", 6)
    assert first.acquire()
    time.sleep(1.2)  # the second lock is due 1.2 s after the first: a batch of its own
    second = renewed(frozen, "b", 6)
    assert second.acquire()
    # A lock on another client, renewed every 0.33 s, all along.
    other = renewed(direct, "c", 1)
    assert other.acquire()
    proxy.cut()  # the first lock's renewal (due at 2 s) waits on the frozen connection
    time.sleep(3.4 - 1.2)  # past the second lock's due time (3.2 s): its client is busy
    cpu_before, wall_before = time.process_time(), time.monotonic()
    time.sleep(2.0)
    cpu = (time.process_time() - cpu_before) / (time.monotonic() - wall_before)
    assert cpu < 0.05, f"the process used {cpu:.0%} of a core while the batch was outstanding"
    # Told lost by the end of its trusted lease (6 s after acquiring, minus the margin).
    deadline = time.monotonic() + 1.5
    while "a" not in lost and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "a" in lost and first.lost
    assert "c" not in lost and not other.lost and other.is_locked_by_me()
    proxy.heal()
    assert other.release()


def test_a_slow_on_lost_callback_does_not_delay_other_renewals(r: redis.Redis, name: str) -> None:
    called = threading.Event()

    def slow_callback(_: object) -> None:
        called.set()
        time.sleep(2.5)

    doomed = DistributedLock(r, name + "-doomed", timeout=0.3, on_lost=slow_callback)
    assert doomed.acquire()
    lost: list[object] = []
    renewed = DistributedLock(r, name + "-renewed", timeout=0.9, auto_renewal=True, on_lost=lost.append)
    assert renewed.acquire()
    assert called.wait(2)
    time.sleep(2.0)  # the callback is still running
    assert not lost and not renewed.lost and renewed.is_locked_by_me()
    assert renewed.release()


def test_asyncio_watchdog_does_not_spin_and_callbacks_do_not_delay_renewals(
    proxy: ChaosProxy, own_redis: RedisServer, name: str
) -> None:
    async def main() -> float:
        frozen = redis.asyncio.Redis.from_url(proxy.url)
        direct = redis.asyncio.Redis.from_url(own_redis.url)
        first = AsyncLock(frozen, name + "-a", timeout=6, auto_renewal=True)
        assert await first.acquire()
        await asyncio.sleep(1.2)
        second = AsyncLock(frozen, name + "-b", timeout=6, auto_renewal=True)
        assert await second.acquire()
        other = AsyncLock(direct, name + "-c", timeout=1, auto_renewal=True)
        assert await other.acquire()
        proxy.cut()
        await asyncio.sleep(3.4 - 1.2)
        cpu_before, wall_before = time.process_time(), time.monotonic()
        await asyncio.sleep(2.0)
        cpu = (time.process_time() - cpu_before) / (time.monotonic() - wall_before)
        assert not other.lost and await other.is_locked_by_me()
        proxy.heal()
        await other.release()
        return cpu

    cpu = asyncio.run(main())
    assert cpu < 0.05, f"the process used {cpu:.0%} of a core while the batch was outstanding"
