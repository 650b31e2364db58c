"""A tour of celery-dlock's core lock, runnable end to end.

    python -m examples.distributed_lock_example      # or: python examples/distributed_lock_example.py

Uses ``REDIS_URL`` when set (an error if no Redis answers there); unset, localhost:6379
when a server answers there, otherwise a private embedded ``redis-server`` for the
duration of the demo. All
keys live under a per-run prefix, and every lock is released at the end.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid

import redis

from celery_dlock import (
    DistributedLock,
    LockNotAcquired,
    distributed_lock,
    distributed_lock_decorator,
)
from celery_dlock.embedded import ensure_redis_url

PREFIX = f"dlock-demo-{uuid.uuid4().hex[:8]}:"


def step(title: str) -> None:
    print(f"\n== {title}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="   [log] %(levelname)s %(message)s")
    url = ensure_redis_url()
    os.environ["REDIS_URL"] = url  # the convenience helpers' default client uses it
    client = redis.Redis.from_url(url)
    print(f"Redis at {url}; keys under {PREFIX!r}")

    step("1. context manager: `with DistributedLock(...)`")
    with DistributedLock(client, "report", timeout=10, prefix=PREFIX) as lock:
        print(f"   holding {lock.name!r}: token={lock.token[:8]}..., fence={lock.fence}")
    print(f"   released; locked by anyone now? {lock.is_locked_by_anyone()}")

    step("2. convenience function: `with distributed_lock(name)` (default client from REDIS_URL)")
    with distributed_lock("nightly-job", timeout=10, prefix=PREFIX) as lock:
        print(f"   holding {lock.name!r} with fence {lock.fence}")

    step("3. decorator, with a name template over the function's arguments")

    @distributed_lock_decorator("order:{order_id}", timeout=10, prefix=PREFIX)
    def ship(order_id: int, carrier: str = "post") -> str:
        return f"order {order_id} shipped by {carrier} under lock 'order:{order_id}'"

    print("  ", ship(42))

    step("4. manual acquire / release, with status queries and extend")
    lock = DistributedLock(client, "manual", timeout=2, prefix=PREFIX)
    print(f"   acquire -> {lock.acquire()}, is_locked_by_me -> {lock.is_locked_by_me()}")
    print(f"   extend(3) -> {lock.extend(3)}, remaining lease {client.pttl(lock.keys.lock)} ms")
    print(f"   release -> {lock.release()}, release again -> {lock.release()} (never an exception)")

    step("5. auto-renewal keeps a lock 3x past its timeout")
    lock = DistributedLock(client, "long-task", timeout=1, auto_renewal=True, prefix=PREFIX)
    lock.acquire()
    time.sleep(3.2)
    print(f"   after 3.2 s with a 1 s lease: still mine? {lock.is_locked_by_me()}, lost? {lock.lost}")
    lock.release()

    step("6. a conflict between two holders")
    holder = DistributedLock(client, "shared", timeout=10, prefix=PREFIX)
    holder.acquire()
    holder_fence = holder.fence
    rival = DistributedLock(client, "shared", timeout=10, prefix=PREFIX)
    print(f"   rival non-blocking acquire -> {rival.acquire(blocking=False)}")
    print(f"   rival release of holder's lock -> {rival.release()} (holder's lock untouched)")
    try:
        with DistributedLock(client, "shared", prefix=PREFIX):
            pass
    except LockNotAcquired as exc:
        print(f"   `with` on a held lock raises LockNotAcquired: {exc}")
    waiter = DistributedLock(client, "shared", timeout=10, retry_delay=30, blocking_timeout=20, prefix=PREFIX)
    threading.Timer(0.5, holder.release).start()
    started = time.monotonic()
    waiter.acquire()
    print(
        f"   a blocked waiter got it {time.monotonic() - started:.2f} s later, woken by the release "
        f"(not its 30 s retry_delay); its fence {waiter.fence} > the first holder's {holder_fence}"
    )
    waiter.release()

    step("7. a holder is told when its lock is lost")
    lost = threading.Event()
    lock = DistributedLock(
        client, "fragile", timeout=1, auto_renewal=True, on_lost=lambda _l: lost.set(), prefix=PREFIX
    )
    lock.acquire()
    client.delete(lock.keys.lock)  # someone deletes it behind our back
    print(f"   on_lost called within 2 s? {lost.wait(2)}; lock.lost = {lock.lost}")

    # Fence counters stay (they must never go backwards); a release's receipt (":released",
    # so a retried release answers True) expires after 60 s.
    leftovers = [k for k in client.scan_iter(f"{PREFIX}*") if not k.endswith((b":fence", b":released"))]
    print(f"\nDone. Lock keys left behind: {leftovers or 'none'}")
    for key in client.scan_iter(f"{PREFIX}*"):
        client.delete(key)


if __name__ == "__main__":
    main()
