"""Fault injection on real processes and real redis-server instances (issue #4).

Every test here starts what it breaks: child processes it kills or pauses, and
redis-server processes it kills, restarts or cuts off behind a TCP proxy.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_dlock import DistributedLock, LockBackendUnavailable, LockLost, fenced_get, fenced_set
from celery_dlock.embedded import RedisServer
from celery_dlock.watchdog import get_watchdog
from tests.support.faults import count_under_locks, hold_forever, paused_holder, wait_for_file
from tests.support.observations import record
from tests.support.proxy import ChaosProxy

pytestmark = pytest.mark.slow
SPAWN = multiprocessing.get_context("spawn")


def start(target: Any, *args: Any) -> Any:
    process = SPAWN.Process(target=target, args=args, daemon=True)
    process.start()
    return process


@pytest.mark.parametrize("locks", [1, 16])
def test_contention_8_processes_x_500(redis_url: str, tmp_path: Path, locks: int) -> None:
    names = [f"contention-{uuid.uuid4().hex[:8]}-{i}" for i in range(locks)]
    logs = [tmp_path / f"p{i}.json" for i in range(8)]
    workers = [start(count_under_locks, redis_url, names, 500, str(log), i) for i, log in enumerate(logs)]
    for worker in workers:
        worker.join(240)
        assert worker.exitcode == 0
    client = redis.Redis.from_url(redis_url)
    records = [tuple(r) for log in logs for r in json.loads(log.read_text())]
    assert len(records) == 8 * 500
    total = sum(int(client.get(f"counter:{n}") or 0) for n in names)
    assert total == 8 * 500  # the non-atomic counters are exact
    overlaps = fence_regressions = 0
    for name in names:
        mine = sorted((r for r in records if r[0] == name), key=lambda r: r[1])
        assert int(client.get(f"counter:{name}") or 0) == len(mine)
        for before, after in itertools.pairwise(mine):
            overlaps += before[2] > after[1]
            fence_regressions += before[3] >= after[3]
    span = max(r[2] for r in records) - min(r[1] for r in records)
    record(
        f"contention, {locks} lock(s)",
        f"8 processes x 500 critical sections (non-atomic GET+SET of a counter) on {locks} lock(s)",
        sections=len(records),
        counter_total=total,
        overlapping_intervals=overlaps,
        fence_regressions=fence_regressions,
        sections_per_s=round(len(records) / span),
    )
    assert overlaps == 0 and fence_regressions == 0


def test_sigkilled_holder_frees_lock_within_lease(redis_url: str, name: str, tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    holder = start(hold_forever, redis_url, name, 1.5, str(ready))
    first = wait_for_file(str(ready), 30)
    time.sleep(2.0)  # renewed past its 1.5 s lease while alive
    client = redis.Redis.from_url(redis_url)
    assert client.get(DistributedLock(client, name).keys.lock).decode() == first["token"]
    os.kill(holder.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    waiter = DistributedLock(client, name, blocking_timeout=10)
    assert waiter.acquire()
    freed_after = time.monotonic() - killed_at
    record(
        "holder SIGKILLed",
        "holder with a 1.5 s auto-renewed lease killed with SIGKILL; a waiter blocks on the lock",
        lease_s=1.5,
        lock_free_after_kill_s=round(freed_after, 3),
        fence_before=first["fence"],
        fence_after=waiter.fence,
    )
    assert freed_after <= 1.5 + 0.5  # within the lease (+ scheduling slack)
    assert waiter.fence > first["fence"]
    waiter.release()


def test_paused_holder_learns_it_lost_and_its_fenced_write_is_refused(
    redis_url: str, name: str, tmp_path: Path
) -> None:
    fenced_key = f"fenced-{uuid.uuid4().hex}"
    ready, report = tmp_path / "ready.json", tmp_path / "report.json"
    holder = start(paused_holder, redis_url, name, 1.0, fenced_key, str(ready), str(report))
    first = wait_for_file(str(ready), 30)
    os.kill(holder.pid, signal.SIGSTOP)
    client = redis.Redis.from_url(redis_url)
    successor = DistributedLock(client, name, timeout=30, blocking_timeout=10)
    assert successor.acquire()  # the paused holder's lease ran out on the server
    assert successor.fence > first["fence"]
    assert fenced_set(client, fenced_key, "written by the successor", successor.fence)
    time.sleep(0.5)
    resumed_at = time.monotonic()
    os.kill(holder.pid, signal.SIGCONT)
    result = wait_for_file(str(report), 30)
    holder.join(10)
    assert result["lost_at"] is not None, "on_lost was never called"
    record(
        "holder paused (SIGSTOP) past its lease",
        "1.0 s auto-renewed lease; holder stopped until a successor acquired and wrote "
        "with its fence, then resumed",
        told_after_resume_s=round(result["lost_at"] - resumed_at, 3),
        ensure_held_raised=result["ensure_held_raised"],
        stale_fenced_write_accepted=result["stale_write_accepted"],
        stale_release_returned=result["release_returned"],
        successor_lock_intact=client.get(successor.keys.lock) == successor.token.encode(),
    )
    # Told at once on resume: the watchdog sees the lease ran out (<= one renewal interval).
    assert result["lost_at"] - resumed_at <= 1.0 / 3 + 0.2
    assert result["lost_flag"] and result["ensure_held_raised"]
    assert result["stale_write_accepted"] is False
    assert result["release_returned"] is False
    assert client.get(successor.keys.lock).decode() == successor.token  # not deleted
    assert fenced_get(client, fenced_key) == (b"written by the successor", successor.fence)
    successor.release()


def test_redis_restart(own_redis: RedisServer) -> None:
    errors: list[BaseException] = []
    previous_hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)  # type: ignore[assignment]
    try:
        client = redis.Redis.from_url(own_redis.url, socket_timeout=1, socket_connect_timeout=1)
        lost = threading.Event()
        holder = DistributedLock(
            client, "held", timeout=1.5, auto_renewal=True, on_lost=lambda _l: lost.set()
        )
        assert holder.acquire()
        waiter_outcome: list[Any] = []

        def wait() -> None:
            started = time.monotonic()
            try:
                got = DistributedLock(client, "held", timeout=5, blocking_timeout=8).acquire()
                waiter_outcome.append(("acquired" if got else "gave up", time.monotonic() - started))
            except LockBackendUnavailable as exc:
                waiter_outcome.append(("error", time.monotonic() - started, str(exc)))

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.3)
        restarted_at = time.monotonic()
        own_redis.restart()  # kill -9, then an empty server on the same port
        assert lost.wait(5), "holder was not told its lock is gone"
        told_after = time.monotonic() - restarted_at
        with pytest.raises(LockLost):
            holder.ensure_held()
        waiter.join(12)
        assert not waiter.is_alive(), "waiter hung"
        assert waiter_outcome and waiter_outcome[0][1] <= 8 + 2
        # The waiter kept trying through the outage and got the (now free) lock.
        assert waiter_outcome[0][0] == "acquired", waiter_outcome
        fresh = DistributedLock(client, "fresh", timeout=5)
        assert fresh.acquire()  # new acquisitions work after reconnect
        assert fresh.release()
        assert holder.release() is False
        watchdog_threads = [t for t in threading.enumerate() if t.name == "celery-dlock-watchdog"]
        assert watchdog_threads and all(t.is_alive() for t in watchdog_threads)
        record(
            "Redis killed (-9) and restarted empty",
            "holder with a 1.5 s auto-renewed lease, a waiter blocked on it (blocking_timeout 8 s)",
            holder_told_after_s=round(told_after, 3),
            waiter_outcome=waiter_outcome[0][0],
            waiter_returned_after_s=round(waiter_outcome[0][1], 3),
            new_acquire_after_reconnect="ok",
            exceptions_escaping_threads=len(errors),
        )
        assert errors == []  # nothing escaped the renewal or notifier threads
    finally:
        threading.excepthook = previous_hook


def test_latency_then_cut_network(own_redis: RedisServer) -> None:
    proxy = ChaosProxy(own_redis.port).start()
    try:
        direct = redis.Redis.from_url(own_redis.url)
        via = redis.Redis.from_url(proxy.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        lost_at: list[float] = []
        lock = DistributedLock(
            via, "cut", timeout=1.5, auto_renewal=True, on_lost=lambda _l: lost_at.append(time.monotonic())
        )
        proxy.latency = 0.05
        assert lock.acquire()
        time.sleep(2.0)  # 50 ms latency each way: renewal still keeps it
        assert not lock.lost and lock.is_locked_by_me()
        proxy.cut()
        expired_at = None
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            if expired_at is None and not direct.exists(lock.keys.lock):
                expired_at = time.monotonic()  # the server let the lease expire
            if expired_at is not None and lost_at:
                break
            time.sleep(0.005)
        assert lost_at and expired_at is not None
        margin = expired_at - lost_at[0]
        with pytest.raises(LockLost):
            lock.ensure_held()

        other = DistributedLock(via, "cut-2", timeout=5)
        started = time.monotonic()
        with pytest.raises(LockBackendUnavailable, match=f"127.0.0.1:{proxy.port}"):
            other.acquire()
        assert time.monotonic() - started < 5  # a clear error, not a hang
        assert other.token is None
        with pytest.raises(LockBackendUnavailable):
            lock.release()
        record(
            "network: 50 ms latency, then cut",
            "client behind a TCP proxy (socket_timeout 0.5 s); 1.5 s auto-renewed lease; "
            "proxy adds 50 ms each way, then black-holes traffic",
            held_through_latency=True,
            declared_lost_before_server_expiry_s=round(margin, 3),
            acquire_during_cut="LockBackendUnavailable",
            acquire_error_after_s=round(time.monotonic() - started, 3),
        )
        assert margin > 0, "declared lost only after the server expired the lease"

        proxy.heal()
        proxy.latency = 0
        # The timed-out acquire was held back, not dropped: after the heal it may still
        # run on the server and take "cut-2" for a token nobody holds (its cleanup
        # release could not get through either). The lease bounds that: within 5 s the
        # lock is free again, and new acquisitions work.
        healed = redis.Redis.from_url(proxy.url, socket_timeout=2)
        again = DistributedLock(healed, "cut-2", timeout=5, blocking_timeout=5 + 1)
        assert again.acquire()
        assert again.release()
        assert DistributedLock(healed, "cut-3").acquire(blocking=False)
    finally:
        proxy.stop()


def test_stale_holder_with_deleted_key_is_told_and_fenced(redis_url: str, name: str) -> None:
    client = redis.Redis.from_url(redis_url)
    key = f"fenced-{uuid.uuid4().hex}"
    old = DistributedLock(client, name, timeout=0.3)
    old.acquire()
    old_fence = old.fence
    time.sleep(0.4)
    new = DistributedLock(client, name, timeout=5)
    new.acquire()
    assert fenced_set(client, key, "new", new.fence)
    assert old_fence is not None and not fenced_set(client, key, "old", old_fence)
    assert fenced_get(client, key) == (b"new", new.fence)
    new.release()
    assert get_watchdog().tracked_count() >= 0


@pytest.mark.parametrize("blocking", [False, True])
def test_acquire_retried_by_the_client_after_a_lost_reply_is_not_stranded(
    own_redis: RedisServer, blocking: bool
) -> None:
    """A client made with ``retry_on_timeout=True`` sends a command again when its reply times out.

    The first ACQUIRE ran on the server, its reply came too late: the retry finds
    the lock holding our own token. It must count as ours (same fence), not as
    "held by someone" - which would leave a lock no object holds until its lease
    ends, and a blocking acquirer queued behind itself.
    """
    proxy = ChaosProxy(own_redis.port).start()
    try:
        direct = redis.Redis.from_url(own_redis.url)
        via = redis.Redis.from_url(
            proxy.url, socket_timeout=0.5, socket_connect_timeout=0.5, retry_on_timeout=True
        )
        warm = DistributedLock(via, "warm-up")  # loads the scripts: the slow request must be EVALSHA
        assert warm.acquire() and warm.release()
        name = f"retried-{blocking}"
        lock = DistributedLock(via, name, timeout=30, blocking_timeout=5 if blocking else None)
        fence_before = int(direct.get(lock.keys.fence) or 0)
        proxy.latency = 0.4  # request and reply each take 0.4 s: the reply misses the 0.5 s timeout

        def speed_up_once_it_ran() -> None:
            deadline = time.monotonic() + 10
            while not direct.exists(lock.keys.lock) and time.monotonic() < deadline:
                time.sleep(0.005)
            proxy.latency = 0  # the retry goes through at once

        watcher = threading.Thread(target=speed_up_once_it_ran)
        watcher.start()
        started = time.monotonic()
        acquired = lock.acquire(blocking=blocking)
        took = time.monotonic() - started
        watcher.join()
        assert acquired, "the retried acquire did not see that the lock was already its own"
        assert direct.get(lock.keys.lock) == lock.token.encode()
        assert lock.fence == fence_before + 1 == int(direct.get(lock.keys.fence))
        assert took < 15, took
        assert lock.release()
        assert not direct.exists(lock.keys.lock)
        record(
            f"reply lost, request retried by redis-py ({'blocking' if blocking else 'one attempt'})",
            "client (retry_on_timeout=True, socket_timeout 0.5 s) behind a TCP proxy; 0.4 s latency "
            "each way for the first ACQUIRE, so it runs on the server but its reply times out",
            acquired=acquired,
            fence_unchanged_by_retry=True,
            acquire_took_s=round(took, 3),
        )
    finally:
        proxy.stop()
