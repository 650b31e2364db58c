"""Hostile or broken notifications: a message on an inbox channel never grants a lock,
and garbage on it never stops wake-ups for later waiters."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from celery_dlock import DistributedLock


def queued_member(client: redis.Redis, lock: DistributedLock) -> tuple[str, str, float]:
    """(inbox channel, token, score) of the one waiter queued on ``lock``, as anyone who
    may read the queue sees it."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        entries = client.zrange(lock.keys.waiters, 0, -1, withscores=True)
        if entries:
            [(member, score)] = entries
            length, _, rest = member.decode().partition(":")
            channel, token = rest[: int(length)], rest[int(length):]
            return channel, token, score
        time.sleep(0.002)
    raise AssertionError("no waiter queued")


def test_a_forged_handover_naming_a_real_waiter_never_grants_the_lock(r: redis.Redis, name: str) -> None:
    holder = DistributedLock(r, name, timeout=30)
    assert holder.acquire()
    waiter = DistributedLock(r, name, timeout=10, retry_delay=20, blocking_timeout=1.5)
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(waiter.acquire()))
    thread.start()
    channel, token, score = queued_member(r, holder)
    fence = int(r.get(holder.keys.fence))
    # Exactly what a real release would publish: next fence, the waiter's score and token.
    for payload in (f"{fence + 1}:{int(score)}:{token}", token):
        r.publish(channel, payload)
        time.sleep(0.1)
    thread.join(10)
    assert result == [False]  # the server never gave it the lock
    assert waiter.token is None and waiter.fence is None
    assert r.get(holder.keys.lock) == holder.token.encode()
    assert holder.release()


def test_garbage_on_an_inbox_does_not_stop_later_wake_ups(r: redis.Redis, name: str) -> None:
    holder = DistributedLock(r, name, timeout=30)
    assert holder.acquire()
    waiter = DistributedLock(r, name, timeout=10, retry_delay=20, blocking_timeout=10)
    took: list[float] = []

    def wait() -> None:
        assert waiter.acquire()
        took.append(time.monotonic())

    thread = threading.Thread(target=wait)
    thread.start()
    channel, _, _ = queued_member(r, holder)
    for garbage in (b"\xff\xfe\x00not utf-8", b"", b"::", b"1:2:", b"x" * 10000):
        r.publish(channel, garbage)
    time.sleep(0.1)
    released_at = time.monotonic()
    assert holder.release()
    thread.join(10)
    assert took and took[0] - released_at < 1.0  # woken by the release, not by its 20 s timer
    assert waiter.release()


@pytest.mark.slow
def test_a_silently_dead_inbox_connection_is_noticed_and_waiters_fall_back(name: str) -> None:
    """The waiter relies on its inbox (retry_delay=20 s); its pub/sub connection goes silent.
    The notifier's health check notices within HEALTH_BOUND and wakes the waiter."""
    from celery_dlock.embedded import RedisServer
    from celery_dlock.inbox import HEALTH_BOUND
    from tests.support.proxy import ChaosProxy

    with RedisServer() as server:
        proxy = ChaosProxy(server.port).start()
        try:
            direct = redis.Redis(port=server.port)
            holder = DistributedLock(direct, name, timeout=30)
            assert holder.acquire()
            waiter = DistributedLock(
                redis.Redis(port=proxy.port), name, timeout=30, retry_delay=20, blocking_timeout=40
            )
            took: list[float] = []

            def wait() -> None:
                if waiter.acquire():
                    took.append(time.monotonic())

            thread = threading.Thread(target=wait)
            thread.start()
            queued_member(direct, holder)
            time.sleep(0.3)  # subscribed and confirmed
            proxy.freeze_pubsub()
            released_at = time.monotonic()
            assert holder.release()  # its hand-over message never arrives
            thread.join(30)
            assert took, "the waiter never got the lock"
            assert took[0] - released_at < HEALTH_BOUND + 1.0
            assert waiter.release()
        finally:
            proxy.heal()
            proxy.stop()
