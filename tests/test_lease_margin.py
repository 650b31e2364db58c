"""A lock is returned with its full lease, however it was obtained (direct, handover, retry).

The property: when acquire() returns True, the server holds this lock's token with a
remaining lease of at least ``timeout`` minus the time since the request that set it
was sent. Seen from outside: the PTTL read right after acquire() returns is at least
``timeout - (that read's round trip + 1 % + 2 ms)`` (the Redlock drift margin).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import threading
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio

from celery_dlock import DistributedLock
from celery_dlock.asyncio import DistributedLock as AsyncLock
from tests.support.holders import acquire_and_read_pttl
from tests.support.protocols import protocols_and_paths

# Every client made from redis_url here speaks RESP2 in one run, RESP3 in the other.
redis_url = protocols_and_paths


def lease_floor_ms(timeout_ms: float, round_trip_s: float) -> float:
    return timeout_ms - (round_trip_s * 1000 + 0.01 * timeout_ms + 2)


def read_pttl(client: redis.Redis, key: str) -> tuple[int, float]:
    started = time.monotonic()
    return int(client.pttl(key)), time.monotonic() - started


@pytest.mark.parametrize("note_ttl", [None, 60.0], ids=["plain", "with-notes"])
def test_a_handed_over_lock_is_returned_with_its_full_lease(
    redis_url: str, name: str, note_ttl: float | None
) -> None:
    client = redis.Redis.from_url(redis_url)
    # Three hand-overs in a row: the first waits on a new inbox subscription, the
    # later ones on a live one (the path that could take the lock with no round trip).
    for _ in range(3):
        holder = DistributedLock(client, name, timeout=30, note_ttl=note_ttl)
        assert holder.acquire()
        waiter = DistributedLock(
            client, name, timeout=10, retry_delay=20, blocking_timeout=10, note_ttl=note_ttl
        )
        got: list[tuple[bool, int, float]] = []

        def wait(waiter: DistributedLock = waiter, got: list[tuple[bool, int, float]] = got) -> None:
            acquired = waiter.acquire()
            got.append((acquired, *read_pttl(client, waiter.keys.lock)))

        thread = threading.Thread(target=wait)
        thread.start()
        deadline = time.monotonic() + 10
        while client.zcard(holder.keys.waiters) < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        holder.release()
        thread.join(15)
        [(acquired, pttl, round_trip)] = got
        assert acquired
        assert pttl >= lease_floor_ms(10_000, round_trip), f"returned with {pttl} ms of a 10 s lease"
        assert waiter.trusted_until - time.monotonic() <= pttl / 1000  # never trusted past the server
        assert waiter.release()


def test_an_asyncio_handed_over_lock_is_returned_with_its_full_lease(redis_url: str, name: str) -> None:
    async def handover(client: redis.asyncio.Redis) -> tuple[int, float]:
        holder = AsyncLock(client, name, timeout=30)
        assert await holder.acquire()
        waiter = AsyncLock(client, name, timeout=10, retry_delay=20, blocking_timeout=10)
        task = asyncio.ensure_future(waiter.acquire())
        while await client.zcard(holder.keys.waiters) < 1:
            await asyncio.sleep(0.001)
        await holder.release()
        assert await task
        started = time.monotonic()
        pttl = int(await client.pttl(waiter.keys.lock))
        round_trip = time.monotonic() - started
        assert await waiter.release()
        return pttl, round_trip

    async def main() -> list[tuple[int, float]]:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return [await handover(client) for _ in range(3)]
        finally:
            await client.aclose()

    for pttl, round_trip in asyncio.run(main()):
        assert pttl >= lease_floor_ms(10_000, round_trip), f"returned with {pttl} ms of a 10 s lease"


def run_holders(redis_url: str, name: str, tmp_path: Path, processes: int, rounds: int) -> list[list[float]]:
    ctx = multiprocessing.get_context("spawn")
    logs = [tmp_path / f"pttl-{i}.json" for i in range(processes)]
    barrier = ctx.Barrier(processes)
    workers = [
        ctx.Process(target=acquire_and_read_pttl, args=(redis_url, name, rounds, str(log), barrier, 0.001))
        for log in logs
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(180)
        assert worker.exitcode == 0
    return [record for log in logs for record in json.loads(log.read_text())]


@pytest.mark.parametrize(
    "processes,rounds", [(8, 40), (2, 150)], ids=["8-process-contention", "2-process-loop"]
)
def test_every_contended_acquisition_returns_with_the_full_lease(
    redis_url: str, name: str, tmp_path: Path, processes: int, rounds: int
) -> None:
    records = run_holders(redis_url, name, tmp_path, processes, rounds)
    assert len(records) == processes * rounds
    short = [(pttl, rt) for _, _, pttl, rt in records if pttl < lease_floor_ms(10_000, rt)]
    assert not short, f"{len(short)} of {len(records)} acquisitions returned a short lease, e.g. {short[:5]}"
    if processes == 8:
        # FIFO hand-over: nobody waits much longer than the others.
        waits = [returned - asked for asked, returned, _, _ in records]
        mean = sum(waits) / len(waits)
        assert max(waits) <= 20 * mean, f"longest wait {max(waits):.4f} s, mean {mean:.4f} s"
