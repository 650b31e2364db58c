"""extend() and renewal never race: after extend() returns, no reply of a renewal sent
before it raises the lock's trust, and a shortening extend() reschedules the watchdog."""

from __future__ import annotations

import asyncio
import threading
import time

import redis
import redis.asyncio

from celery_dlock import DistributedLock
from celery_dlock.asyncio import DistributedLock as AsyncLock
from celery_dlock.schedule import RenewalSchedule
from celery_dlock.scripts import EXTEND
from celery_dlock.watchdog import run_script_batch
from tests.support.protocols import protocols_and_paths

# Every client made from redis_url here speaks RESP2 in one run, RESP3 in the other.
redis_url = protocols_and_paths


def test_a_renewal_reply_sent_before_an_extend_never_raises_trust_after_it(r: redis.Redis, name: str) -> None:
    # (The process's watchdog renews it too, but not before 10 s.)
    lock = DistributedLock(r, name, timeout=30, auto_renewal=True)
    assert lock.acquire()
    schedule = RenewalSchedule()
    schedule.track(lock, time.monotonic())
    [batch] = schedule.plan(time.monotonic() + lock.options.renewal_interval + 0.01).batches
    sent_at = time.monotonic()
    replies = run_script_batch(r, EXTEND, batch.calls())  # the renewal runs on the server...
    assert lock.extend(1, replace=True)  # ...then the shortening extend, which returns...
    schedule.complete(batch, replies, None, sent_at, time.monotonic())  # ...then the renewal's reply
    assert r.pttl(lock.keys.lock) <= 1000
    assert lock.trusted_until <= time.monotonic() + 1.0, "trusted past the server's lease"
    # The renewal due next comes before the shortened lease ends.
    plan = schedule.plan(time.monotonic())
    assert plan.wake_at <= lock.trusted_until
    assert lock.release()


def test_a_shortening_extend_brings_on_lost_forward(r: redis.Redis, name: str) -> None:
    lost_at: list[float] = []
    lock = DistributedLock(r, name, timeout=30, on_lost=lambda _: lost_at.append(time.monotonic()))
    assert lock.acquire()
    time.sleep(0.05)  # the watchdog now sleeps until the 30 s lease ends
    extended_at = time.monotonic()
    assert lock.extend(0.3, replace=True)
    deadline = time.monotonic() + 3
    while not lost_at and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lost_at, "on_lost was not called when the shortened lease ended"
    assert lost_at[0] - extended_at < 0.3 + 0.2
    assert lock.release() is False or not r.exists(lock.keys.lock)


def test_a_shortened_auto_renewed_lock_is_renewed_before_the_short_lease_ends(
    r: redis.Redis, name: str
) -> None:
    lost: list[object] = []
    lock = DistributedLock(r, name, timeout=6, auto_renewal=True, on_lost=lost.append)  # renewed every 2 s
    assert lock.acquire()
    assert lock.extend(0.4, replace=True)
    time.sleep(1.2)
    assert not lost and not lock.lost
    assert lock.is_locked_by_me()
    assert r.pttl(lock.keys.lock) > 1000  # renewed to its timeout again
    assert lock.release()


def test_asyncio_shortening_extend_reschedules_the_watchdog(redis_url: str, name: str) -> None:
    async def main() -> tuple[float, bool, bool]:
        client = redis.asyncio.Redis.from_url(redis_url)
        fired = threading.Event()
        watched = AsyncLock(client, name, timeout=30, on_lost=lambda _: fired.set())
        assert await watched.acquire()
        await asyncio.sleep(0.05)
        extended_at = time.monotonic()
        assert await watched.extend(0.3, replace=True)
        while not fired.is_set() and time.monotonic() - extended_at < 3:
            await asyncio.sleep(0.01)
        took = time.monotonic() - extended_at
        renewed = AsyncLock(client, name + "-renewed", timeout=6, auto_renewal=True)
        assert await renewed.acquire()
        assert await renewed.extend(0.4, replace=True)
        await asyncio.sleep(1.2)
        still_held = not renewed.lost and await renewed.is_locked_by_me()
        await renewed.release()
        await client.aclose()
        return took, fired.is_set(), still_held

    took, fired, still_held = asyncio.run(main())
    assert fired and took < 0.5
    assert still_held
