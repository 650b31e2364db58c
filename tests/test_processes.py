"""Mutual exclusion across real processes, and fork safety of the watchdog."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_dlock import DistributedLock
from celery_dlock.watchdog import get_watchdog
from tests.support.holders import async_count_under_lock, count_under_lock


def check_intervals(logs: list[list[list[float]]]) -> list[list[float]]:
    intervals = sorted((tuple(i) for log in logs for i in log), key=lambda i: i[0])
    for before, after in itertools.pairwise(intervals):
        assert before[1] <= after[0], f"overlapping holders: {before} and {after}"
        assert before[2] < after[2], f"fence went backwards: {before} then {after}"
    return [list(i) for i in intervals]


@pytest.mark.parametrize(
    "holder,processes,rounds",
    [(count_under_lock, 4, 60), (async_count_under_lock, 3, 60)],
    ids=["sync", "asyncio"],
)
def test_processes_increment_counter_exactly_without_overlap(
    redis_url: str, name: str, tmp_path: Path, holder: Any, processes: int, rounds: int
) -> None:
    counter_key = f"counter-{uuid.uuid4().hex}"
    ctx = multiprocessing.get_context("spawn")
    logs = [tmp_path / f"holder-{i}.json" for i in range(processes)]
    workers = [
        ctx.Process(target=holder, args=(redis_url, name, counter_key, rounds, str(log))) for log in logs
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    client = redis.Redis.from_url(redis_url)
    assert int(client.get(counter_key)) == processes * rounds
    intervals = check_intervals([json.loads(log.read_text()) for log in logs])
    assert len(intervals) == processes * rounds
    assert len({i[3] for i in intervals}) == processes


def _child_after_fork(url: str, parent_lock_key: str, parent_token: str, name: str) -> int:
    """Runs in a forked child; returns an exit code describing what went wrong (0: fine)."""
    if get_watchdog().tracked_count() != 0:
        return 10  # the child inherited the parent's schedule
    client = redis.Redis.from_url(url)
    own = DistributedLock(client, name, timeout=0.4, auto_renewal=True)
    if not own.acquire():
        return 11
    time.sleep(1.2)  # 3x its lease: the child's own watchdog must renew it
    if not own.is_locked_by_me() or own.lost:
        return 12
    own.release()
    return 0


@pytest.mark.slow
def test_fork_child_starts_its_own_watchdog_and_does_not_renew_parents_locks(
    redis_url: str, name: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    parent_lock = DistributedLock(client, name, timeout=0.6, auto_renewal=True)
    assert parent_lock.acquire()
    assert parent_lock.token is not None
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            code = _child_after_fork(redis_url, parent_lock.keys.lock, parent_lock.token, name + "-child")
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's watchdog kept renewing the parent's lock meanwhile.
    assert parent_lock.is_locked_by_me() and not parent_lock.lost
    assert parent_lock.release()


def _async_child_after_fork(url: str, name: str) -> int:
    import asyncio

    import redis.asyncio

    from celery_dlock.asyncio import DistributedLock as AsyncLock
    from celery_dlock.asyncio.watchdog import get_watchdog as get_async_watchdog

    async def main() -> int:
        if get_async_watchdog().tracked_count() != 0:
            return 20
        client = redis.asyncio.Redis.from_url(url)
        lock = AsyncLock(client, name, timeout=0.4, auto_renewal=True)
        if not await lock.acquire():
            return 21
        await asyncio.sleep(1.2)
        ok = await lock.is_locked_by_me() and not lock.lost
        await lock.release()
        await client.aclose()
        return 0 if ok else 22

    return asyncio.run(main())


@pytest.mark.slow
def test_fork_child_runs_its_own_asyncio_watchdog(redis_url: str, name: str) -> None:
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = _async_child_after_fork(redis_url, name)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_waiters_are_served_in_order_not_starved_by_a_barging_releaser(
    redis_url: str, name: str, tmp_path: Path
) -> None:
    """Each process releases and at once asks again. Without FIFO handoff the releaser wins
    almost every time (peers measured 99 %); with it, the lock goes to the longest waiter."""
    from tests.support.holders import hold_repeatedly

    ctx = multiprocessing.get_context("spawn")
    logs = [tmp_path / f"fair-{i}.json" for i in range(4)]
    barrier = ctx.Barrier(len(logs))
    workers = [
        ctx.Process(target=hold_repeatedly, args=(redis_url, name, 100, str(log), barrier)) for log in logs
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    intervals = sorted((tuple(i) for log in logs for i in json.loads(log.read_text())), key=lambda i: i[0])
    # Only count handoffs while every process was competing (not before all had started
    # nor after the first had finished its rounds).
    pids = {i[3] for i in intervals}
    all_started = max(min(i[0] for i in intervals if i[3] == pid) for pid in pids)
    first_done = min(max(i[0] for i in intervals if i[3] == pid) for pid in pids)
    busy = [i for i in intervals if all_started <= i[0] <= first_done]
    same_holder_again = sum(1 for a, b in itertools.pairwise(busy) if a[3] == b[3])
    assert len(busy) > 100
    assert same_holder_again / (len(busy) - 1) < 0.2, f"{same_holder_again} of {len(busy) - 1} handoffs"


def _wait_take_release(url: str, name: str, results: Any) -> None:
    """Runs in a forked child: wait for the lock, hold it briefly, hand it on; report how
    many wake-up messages this process read."""
    from celery_dlock.notify import notifier_for

    client = redis.Redis.from_url(url)
    lock = DistributedLock(client, name, timeout=10, retry_delay=20, blocking_timeout=30)
    acquired = lock.acquire()
    time.sleep(0.05)
    lock.release()
    results.put((acquired, notifier_for(client).messages))


def test_a_handover_wakes_only_the_process_it_was_handed_to(redis_url: str, name: str) -> None:
    # With one channel per lock, every waiting process read every handover message
    # (here 4 + 3 + 2 + 1); with one inbox per process, each reads its own only.
    client = redis.Redis.from_url(redis_url)
    holder = DistributedLock(client, name, timeout=30)
    assert holder.acquire()
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    children = [ctx.Process(target=_wait_take_release, args=(redis_url, name, results)) for _ in range(4)]
    for child in children:
        child.start()
    deadline = time.monotonic() + 20
    while client.zcard(holder.keys.waiters) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.zcard(holder.keys.waiters) == 4
    holder.release()
    reports = [results.get(timeout=30) for _ in children]
    for child in children:
        child.join(10)
    assert reports == [(True, 1)] * 4
