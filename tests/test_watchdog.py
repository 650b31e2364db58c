"""The renewal watchdog wakes when a renewal is due, not once per acquisition.

Waking a thread costs more CPU than the lock's own round trip, so a lock taken
while the watchdog already sleeps until before its first renewal must not wake
it; a lock that needs the watchdog sooner than that must.
"""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio

from celery_dlock import DistributedLock
from celery_dlock.asyncio import DistributedLock as AsyncDistributedLock
from celery_dlock.asyncio.watchdog import get_watchdog as get_async_watchdog
from celery_dlock.watchdog import get_watchdog


def test_acquisitions_do_not_wake_a_sleeping_watchdog(r: redis.Redis, name: str) -> None:
    first = DistributedLock(r, name + ":first", timeout=30, auto_renewal=True)
    first.acquire()
    time.sleep(0.2)  # the watchdog has planned and now sleeps until the first renewal
    watchdog = get_watchdog()
    before = watchdog.wakeups
    for _ in range(100):
        lock = DistributedLock(r, name, timeout=30, auto_renewal=True)
        assert lock.acquire(blocking=False)
        assert lock.release()
    woken = watchdog.wakeups - before
    first.release()
    assert woken <= 2, f"100 acquisitions woke the watchdog {woken} times"


def test_a_lock_due_sooner_wakes_the_sleeping_watchdog(r: redis.Redis, name: str) -> None:
    slow = DistributedLock(r, name + ":slow", timeout=60, auto_renewal=True)
    slow.acquire()
    time.sleep(0.2)  # the watchdog sleeps until slow's renewal, 20 s away
    fast = DistributedLock(r, name, timeout=1.0, auto_renewal=True)
    fast.acquire()
    time.sleep(2.5)  # 2.5 leases: only renewals keep it
    assert fast.is_locked_by_me() and not fast.lost
    assert 0 < r.pttl(fast.keys.lock) <= 1000
    fast.release()
    slow.release()


def test_async_acquisitions_do_not_wake_a_sleeping_watchdog(redis_url: str, name: str) -> None:
    async def main() -> tuple[int, bool]:
        client = redis.asyncio.Redis.from_url(redis_url)
        first = AsyncDistributedLock(client, name + ":first", timeout=30, auto_renewal=True)
        await first.acquire()
        await asyncio.sleep(0.2)
        watchdog = get_async_watchdog()
        before = watchdog.wakeups
        for _ in range(100):
            lock = AsyncDistributedLock(client, name, timeout=30, auto_renewal=True)
            assert await lock.acquire(blocking=False)
            assert await lock.release()
        woken = watchdog.wakeups - before
        fast = AsyncDistributedLock(client, name + ":fast", timeout=1.0, auto_renewal=True)
        await fast.acquire()
        await asyncio.sleep(2.5)
        renewed = await fast.is_locked_by_me() and not fast.lost
        await fast.release()
        await first.release()
        await client.aclose()
        return woken, renewed

    woken, renewed = asyncio.run(main())
    assert woken <= 2, f"100 acquisitions woke the asyncio watchdog {woken} times"
    assert renewed, "a lock due sooner than the sleeping watchdog's wake-up was not renewed"


def test_a_renewal_reply_for_an_earlier_acquisition_is_ignored(r: redis.Redis, name: str) -> None:
    # A renewal planned for one acquisition can come back after the lock object was
    # released and acquired again; its reply says nothing about the new acquisition.
    from celery_dlock.schedule import RenewalSchedule

    lock = DistributedLock(r, name, timeout=3, auto_renewal=True)
    schedule = RenewalSchedule()
    assert lock.acquire()
    schedule.track(lock, time.monotonic())
    plan = schedule.plan(time.monotonic() + lock.options.renewal_interval + 0.01)
    assert plan.batches, "the renewal is due"
    schedule.untrack(lock)
    assert lock.release()
    assert lock.acquire()
    schedule.track(lock, time.monotonic())
    trusted = lock.trusted_until
    now = time.monotonic()
    lost = schedule.complete(plan.batches[0], [-1], None, now, now)  # "not ours any more"
    assert lost == [] and not lock.lost
    assert lock.trusted_until == trusted
    assert lock.release()
