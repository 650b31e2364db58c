"""Code run in child processes by the multi-process tests."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis

from celery_dlock import DistributedLock


def count_under_lock(url: str, name: str, counter_key: str, rounds: int, log_path: str) -> None:
    """Increment a counter with a deliberately non-atomic read-sleep-write, under the lock.

    Records every holder interval (monotonic start/end, fence) so the parent can
    check that no two intervals overlap.
    """
    client = redis.Redis.from_url(url)
    intervals = []
    for _ in range(rounds):
        lock = DistributedLock(client, name, timeout=10, blocking_timeout=60)
        with lock:
            start = time.monotonic()
            value = int(client.get(counter_key) or 0)
            time.sleep(0.0005)
            client.set(counter_key, value + 1)
            end = time.monotonic()
            intervals.append((start, end, lock.fence, os.getpid()))
    with open(log_path, "w") as fh:
        json.dump(intervals, fh)


def async_count_under_lock(url: str, name: str, counter_key: str, rounds: int, log_path: str) -> None:
    """The asyncio twin: three coroutines per process share the rounds, one lock object each time."""
    import asyncio

    import redis.asyncio

    from celery_dlock.asyncio import DistributedLock as AsyncLock

    intervals: list[tuple[float, float, int | None, int]] = []

    async def worker(client: redis.asyncio.Redis, count: int) -> None:
        for _ in range(count):
            lock = AsyncLock(client, name, timeout=10, blocking_timeout=60)
            async with lock:
                start = time.monotonic()
                value = int(await client.get(counter_key) or 0)
                await asyncio.sleep(0.0005)
                await client.set(counter_key, value + 1)
                intervals.append((start, time.monotonic(), lock.fence, os.getpid()))

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(url)
        share = [rounds // 3] * 3
        share[0] += rounds - sum(share)
        await asyncio.gather(*(worker(client, n) for n in share))
        await client.aclose()

    asyncio.run(main())
    with open(log_path, "w") as fh:
        json.dump(intervals, fh)


def hold_repeatedly(url: str, name: str, rounds: int, log_path: str, barrier: Any) -> None:
    """Acquire, hold ~1 ms, release, immediately try again: the pattern that lets a releaser barge."""
    client = redis.Redis.from_url(url)
    client.ping()
    intervals = []
    barrier.wait(60)  # all processes start competing together
    for _ in range(rounds):
        lock = DistributedLock(client, name, timeout=10, blocking_timeout=60)
        asked = time.monotonic()
        with lock:
            start = time.monotonic()
            while time.monotonic() - start < 0.001:
                pass
            intervals.append((start, time.monotonic(), asked, os.getpid()))
    with open(log_path, "w") as fh:
        json.dump(intervals, fh)


def acquire_and_read_pttl(url: str, name: str, rounds: int, log_path: str, barrier: Any, hold: float) -> None:
    """Acquire, read the lock's PTTL at once, hold ``hold`` s, release; ``rounds`` times.

    Logs (asked, acquired, pttl_ms, pttl round trip s) per acquisition: what the
    server held the moment acquire() returned, and the waits for the fairness check.
    """
    client = redis.Redis.from_url(url)
    client.ping()
    records = []
    barrier.wait(60)
    for _ in range(rounds):
        lock = DistributedLock(client, name, timeout=10, blocking_timeout=60)
        asked = time.monotonic()
        assert lock.acquire()
        returned = time.monotonic()
        pttl = client.pttl(lock.keys.lock)
        round_trip = time.monotonic() - returned
        start = time.monotonic()
        while time.monotonic() - start < hold:
            pass
        lock.release()
        records.append((asked, returned, pttl, round_trip))
    with open(log_path, "w") as fh:
        json.dump(records, fh)
