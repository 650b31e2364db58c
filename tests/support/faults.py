"""Child-process programs for the fault tests. Each reports by writing JSON to a file."""

from __future__ import annotations

import json
import os
import random
import threading
import time

import redis

from celery_dlock import DistributedLock, LockLost, fenced_set


def write_json(path: str, data: object) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def wait_for_file(path: str, timeout: float) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as fh:
                return json.load(fh)  # type: ignore[no-any-return]
        time.sleep(0.01)
    raise TimeoutError(f"{path} never appeared")


def count_under_locks(url: str, names: list[str], rounds: int, log_path: str, seed: int) -> None:
    """Each round: pick a lock, increment its counter non-atomically while holding it."""
    client = redis.Redis.from_url(url)
    rng = random.Random(seed)
    intervals = []
    for _ in range(rounds):
        name = rng.choice(names)
        lock = DistributedLock(client, name, timeout=10, blocking_timeout=120)
        with lock:
            start = time.monotonic()
            value = int(client.get(f"counter:{name}") or 0)
            client.set(f"counter:{name}", value + 1)
            end = time.monotonic()
            intervals.append((name, start, end, lock.fence, os.getpid()))
    write_json(log_path, intervals)


def hold_forever(url: str, name: str, timeout: float, ready_path: str) -> None:
    """Take the lock with auto-renewal, say so, then sleep until killed."""
    client = redis.Redis.from_url(url)
    lock = DistributedLock(client, name, timeout=timeout, auto_renewal=True)
    assert lock.acquire()
    write_json(ready_path, {"fence": lock.fence, "token": lock.token})
    while True:
        time.sleep(1)


def paused_holder(
    url: str, name: str, timeout: float, fenced_key: str, ready_path: str, report_path: str
) -> None:
    """Take the lock and write with its fence; after being paused past the lease, report what it learned."""
    client = redis.Redis.from_url(url)
    lost_at: list[float] = []
    lost = threading.Event()

    def on_lost(_lock: DistributedLock) -> None:
        lost_at.append(time.monotonic())
        lost.set()

    lock = DistributedLock(client, name, timeout=timeout, auto_renewal=True, on_lost=on_lost)
    assert lock.acquire()
    fence = lock.fence
    assert fenced_set(client, fenced_key, "written by the first holder", fence)
    write_json(ready_path, {"fence": fence})
    lost.wait(30)  # the parent SIGSTOPs us here, then SIGCONTs
    try:
        lock.ensure_held()
        ensure_held_raised = False
    except LockLost:
        ensure_held_raised = True
    stale_write = fenced_set(client, fenced_key, "late write by the paused holder", fence)
    released = lock.release()
    write_json(
        report_path,
        {
            "lost_at": lost_at[0] if lost_at else None,
            "lost_flag": lock.lost,
            "reason": lock.lost_reason,
            "ensure_held_raised": ensure_held_raised,
            "stale_write_accepted": stale_write,
            "release_returned": released,
            "fence": fence,
        },
    )
