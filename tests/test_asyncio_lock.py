"""celery_dlock.asyncio against a real redis-server: the same behaviours as the sync lock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
import redis.asyncio

from celery_dlock.asyncio import (
    DistributedLock,
    LockBackendUnavailable,
    LockLost,
    LockNotAcquired,
    distributed_lock,
    distributed_lock_decorator,
)
from celery_dlock.asyncio.notify import notifier_for
from celery_dlock.asyncio.watchdog import get_watchdog
from celery_dlock.scripts import HANDOFF_WINDOW_MS, JOIN, WAIT
from tests.support.counting import CountingAsyncRedis
from tests.support.protocols import resp2_and_resp3

# Every client made from redis_url here speaks RESP2 in one run, RESP3 in the other.
redis_url = resp2_and_resp3


def run(redis_url: str, body: Callable[[redis.asyncio.Redis], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return await body(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_acquire_release_and_ownership(redis_url: str, name: str) -> None:
    async def body(r: redis.asyncio.Redis) -> None:
        lock = DistributedLock(r, name, timeout=5)
        other = DistributedLock(r, name, timeout=5)
        assert await lock.acquire(blocking=False)
        assert await r.get(lock.keys.lock) == lock.token.encode()
        assert await lock.is_locked_by_me() and await other.is_locked_by_anyone()
        assert not await other.acquire(blocking=False)
        assert await other.release() is False
        assert await other.extend(5) is False
        assert await lock.release() is True
        assert await lock.release() is False
        assert not await lock.is_locked_by_anyone()

    run(redis_url, body)


def test_two_tasks_on_one_loop_cannot_release_each_others_lock(redis_url: str, name: str) -> None:
    async def body(r: redis.asyncio.Redis) -> None:
        first = DistributedLock(r, name, timeout=0.2)
        second = DistributedLock(r, name, timeout=5)

        first_fence: list[int | None] = []

        async def slow_holder() -> bool:
            await first.acquire()
            first_fence.append(first.fence)
            await asyncio.sleep(0.4)  # its lease runs out meanwhile
            return await first.release()

        async def next_holder() -> bool:
            await asyncio.sleep(0.3)
            return await second.acquire(blocking=False)

        released, acquired = await asyncio.gather(slow_holder(), next_holder())
        assert acquired is True and released is False
        assert await r.get(second.keys.lock) == second.token.encode()
        assert second.fence is not None and first_fence[0] is not None
        assert second.fence > first_fence[0]
        await second.release()

    run(redis_url, body)


def test_fence_strictly_increases(redis_url: str, name: str) -> None:
    async def body(r: redis.asyncio.Redis) -> list[int]:
        fences = []
        for _ in range(6):
            async with DistributedLock(r, name) as lock:
                fences.append(lock.fence)
        return fences

    fences = run(redis_url, body)
    assert fences == sorted(set(fences))


def test_waiter_woken_by_release_and_by_expiry(redis_url: str, name: str) -> None:
    async def body(r: redis.asyncio.Redis) -> tuple[float, float]:
        holder = DistributedLock(r, name, timeout=30)
        await holder.acquire()
        waiter = DistributedLock(r, name, retry_delay=20, blocking_timeout=25)
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, lambda: asyncio.ensure_future(holder.release()))
        started = time.monotonic()
        assert await waiter.acquire()
        by_release = time.monotonic() - started
        await waiter.release()

        crashed = DistributedLock(r, name + "-x", timeout=0.5)
        await crashed.acquire()  # never released
        waiter2 = DistributedLock(r, name + "-x", retry_delay=20, blocking_timeout=25)
        started = time.monotonic()
        assert await waiter2.acquire()
        by_expiry = time.monotonic() - started
        await waiter2.release()
        return by_release, by_expiry

    by_release, by_expiry = run(redis_url, body)
    assert by_release < 5 and by_expiry < 10


def test_coroutine_waiters_share_one_subscription(redis_url: str, name: str) -> None:
    async def body(r: redis.asyncio.Redis) -> None:
        holder = DistributedLock(r, name, timeout=30)
        await holder.acquire()
        locks = [DistributedLock(r, name, timeout=5, blocking_timeout=20) for _ in range(8)]

        async def take_and_release(lock: DistributedLock) -> int:
            await lock.acquire()
            fence = lock.fence
            await lock.release()
            assert fence is not None
            return fence

        tasks = [asyncio.ensure_future(take_and_release(lock)) for lock in locks]
        await asyncio.sleep(0.3)
        notifier = notifier_for(r)
        numsub = await r.pubsub_numsub(notifier.inbox(holder.options.prefix).channel)
        assert numsub[0][1] == 1  # one subscriber, not eight
        assert await r.zcard(holder.keys.waiters) == 8
        await holder.release()
        fences = await asyncio.wait_for(asyncio.gather(*tasks), 20)
        assert len(set(fences)) == 8
        assert notifier.messages == 8  # one wake-up message per handover, nothing else

    run(redis_url, body)


def test_auto_renewal_and_one_batched_watchdog(redis_url: str, name: str) -> None:
    async def body(_: redis.asyncio.Redis) -> None:
        client = CountingAsyncRedis.from_url(redis_url)
        locks = [DistributedLock(client, f"{name}-{i}", timeout=0.6, auto_renewal=True) for i in range(40)]
        for lock in locks:
            await lock.acquire()
        client.round_trips = 0
        await asyncio.sleep(1.9)  # > 3x the lease
        trips = client.round_trips
        assert all([await lock.is_locked_by_me() for lock in locks])
        assert not any(lock.lost for lock in locks)
        assert 2 <= trips <= 12, trips  # about one pipeline per 0.2 s interval, not 40
        watchdogs = [t for t in asyncio.all_tasks() if t.get_name() == "celery-dlock-watchdog"]
        assert len(watchdogs) == 1
        for lock in locks:
            await lock.release()
        assert get_watchdog().tracked_count() == 0
        await client.aclose()

    run(redis_url, body)


def test_lost_when_key_deleted(redis_url: str, name: str) -> None:
    async def body(r: redis.asyncio.Redis) -> None:
        lost = asyncio.Event()
        lock = DistributedLock(r, name, timeout=0.9, auto_renewal=True, on_lost=lambda _l: lost.set())
        await lock.acquire()
        await r.delete(lock.keys.lock)
        await asyncio.wait_for(lost.wait(), 2)
        with pytest.raises(LockLost):
            lock.ensure_held()
        assert await lock.release() is False

    run(redis_url, body)


def test_cancelled_acquire_never_leaves_an_orphan_lock(redis_url: str, name: str) -> None:
    async def body(r: redis.asyncio.Redis) -> None:
        outcomes = {"held": 0, "free": 0}
        for attempt in range(40):
            lock = DistributedLock(r, f"{name}-{attempt}", timeout=30)
            task = asyncio.ensure_future(lock.acquire())
            for _ in range(attempt % 8):
                await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            await asyncio.sleep(0.05)  # let a background cleanup finish
            value = await r.get(lock.keys.lock)
            if value is None:
                outcomes["free"] += 1
            else:
                # Only a lock its object knows it holds may remain.
                assert lock.token is not None and value == lock.token.encode()
                outcomes["held"] += 1
                await lock.release()
        print(outcomes)
        assert outcomes["free"] > 0

    run(redis_url, body)


def test_cancelled_release_keeps_token_while_key_exists(redis_url: str, name: str) -> None:
    async def body(r: redis.asyncio.Redis) -> None:
        for attempt in range(30):
            lock = DistributedLock(r, f"{name}-{attempt}", timeout=30)
            await lock.acquire()
            token = lock.token
            task = asyncio.ensure_future(lock.release())
            for _ in range(attempt % 6):
                await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            await asyncio.sleep(0.05)
            if await r.exists(lock.keys.lock):
                assert lock.token == token  # still releasable
                assert await lock.release()
            else:
                assert lock.token is None

    run(redis_url, body)


def test_context_manager_and_decorator(redis_url: str, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)

    async def body(r: redis.asyncio.Redis) -> None:
        async with distributed_lock(name, timeout=5) as lock:
            assert await lock.is_locked_by_me()
            with pytest.raises(LockNotAcquired):
                async with distributed_lock(name, redis=r):
                    pass

        @distributed_lock_decorator("order:{order_id}", redis=r)
        async def process(order_id: int) -> bool:
            return bool(await r.exists(f"dlock:{{order:{order_id}}}"))

        @distributed_lock_decorator
        async def bare() -> str:
            return "ok"

        assert await process(5) is True
        assert await bare() == "ok"

    run(redis_url, body)

    with pytest.raises(TypeError, match="coroutine function"):

        @distributed_lock_decorator("x")
        def not_async() -> None: ...


def test_uncontended_acquire_and_release_are_one_round_trip_each(redis_url: str, name: str) -> None:
    async def body(_: redis.asyncio.Redis) -> None:
        client = CountingAsyncRedis.from_url(redis_url)
        lock = DistributedLock(client, name)
        await lock.acquire()
        await lock.release()  # scripts are cached now
        client.round_trips = 0
        await lock.acquire()
        assert client.round_trips == 1
        await lock.release()
        assert client.round_trips == 2
        await client.aclose()

    run(redis_url, body)


def test_unreachable_server_names_it() -> None:
    from celery_dlock.embedded import free_port

    port = free_port()

    async def body() -> None:
        client = redis.asyncio.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
        lock = DistributedLock(client, "nowhere")
        with pytest.raises(LockBackendUnavailable, match=f"127.0.0.1:{port}"):
            await lock.acquire()
        assert lock.token is None

    asyncio.run(body())


def test_sync_client_is_rejected_with_a_pointer() -> None:
    with pytest.raises(TypeError, match="celery_dlock.DistributedLock"):
        DistributedLock(redis.Redis(), "x")


@pytest.mark.slow
def test_lost_when_redis_is_stopped(own_redis) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        client = redis.asyncio.Redis.from_url(own_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        lost_at: list[float] = []
        lock = DistributedLock(
            client,
            "survivor",
            timeout=1.5,
            auto_renewal=True,
            on_lost=lambda _l: lost_at.append(time.monotonic()),
        )
        acquired_at = time.monotonic()
        await lock.acquire()
        own_redis.kill()
        deadline = time.monotonic() + 5
        while not lost_at and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert lost_at, "holder was never told"
        assert lost_at[0] <= acquired_at + 1.5 + 0.05
        with pytest.raises(LockLost):
            lock.ensure_held()
        with pytest.raises(LockBackendUnavailable):
            await lock.release()

    asyncio.run(body())


def test_lease_is_server_side_px(redis_url: str, name: str) -> None:
    async def body(r: redis.asyncio.Redis) -> None:
        lock = DistributedLock(r, name, timeout=2.5)
        await lock.acquire()
        assert 2000 < await r.pttl(lock.keys.lock) <= 2500
        assert (await r.get(lock.keys.lock)).decode() == lock.token
        await lock.release()

    run(redis_url, body)


def test_release_between_failed_attempt_and_subscribe_is_not_missed(
    redis_url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery_dlock.asyncio.notify import AsyncReleaseNotifier

    async def body(r: redis.asyncio.Redis) -> None:
        holder = DistributedLock(r, name, timeout=30)
        await holder.acquire()
        original = AsyncReleaseNotifier._subscribe

        async def release_first(self: AsyncReleaseNotifier, channel: str) -> None:
            await holder.release()  # lands before the waiter's SUBSCRIBE
            await original(self, channel)

        monkeypatch.setattr(AsyncReleaseNotifier, "_subscribe", release_first)
        waiter = DistributedLock(r, name, retry_delay=20, blocking_timeout=3)
        assert await waiter.acquire()
        await waiter.release()

    run(redis_url, body)


async def warm_up(client: redis.asyncio.Redis, name: str) -> None:
    """One wait on ``name``, so this loop's inbox is subscribed and live."""
    holder = DistributedLock(client, name, timeout=30)
    await holder.acquire()
    waiter = DistributedLock(client, name, retry_delay=20, blocking_timeout=10)
    waiting = asyncio.ensure_future(waiter.acquire())
    await asyncio.sleep(0.2)
    await holder.release()
    assert await asyncio.wait_for(waiting, 10)
    await waiter.release()


def test_handover_before_the_waiter_registered_is_not_missed(
    redis_url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(r: redis.asyncio.Redis) -> None:
        await warm_up(r, name)
        notifier = notifier_for(r)
        holder = DistributedLock(r, name, timeout=30)
        await holder.acquire()
        waiter = DistributedLock(r, name, retry_delay=20, blocking_timeout=30)
        original = DistributedLock._performers["call"]

        async def attempt_then_release(self: DistributedLock, step: Any, *rest: Any) -> Any:
            reply = await original(self, step, *rest)
            if self is waiter and JOIN in step.args:
                seen = notifier.messages
                await holder.release()
                deadline = time.monotonic() + 5
                while notifier.messages == seen and time.monotonic() < deadline:
                    await asyncio.sleep(0.001)  # the reader has the handover before the waiter registers
            return reply

        monkeypatch.setitem(DistributedLock._performers, "call", attempt_then_release)
        started = time.monotonic()
        assert await waiter.acquire()
        assert time.monotonic() - started < 5  # woken by the handover, not by its 20 s timer
        await waiter.release()

    run(redis_url, body)


def test_a_waiting_acquire_costs_two_round_trips_once_the_inbox_is_live(redis_url: str, name: str) -> None:
    async def body(_: redis.asyncio.Redis) -> None:
        client = CountingAsyncRedis.from_url(redis_url)
        await warm_up(client, name)
        holder = DistributedLock(client, name, timeout=30)
        await holder.acquire()
        waiter = DistributedLock(client, name, retry_delay=20, blocking_timeout=10)
        client.round_trips = 0
        waiting = asyncio.ensure_future(waiter.acquire())
        await asyncio.sleep(0.3)
        await holder.release()
        assert await asyncio.wait_for(waiting, 10)
        # the queueing attempt, the holder's release, the winning attempt: no SUBSCRIBE,
        # no re-attempt after subscribing
        assert client.round_trips == 3
        await waiter.release()
        await client.aclose()

    run(redis_url, body)


def test_a_handover_is_confirmed_with_one_attempt_that_sets_the_full_lease(redis_url: str, name: str) -> None:
    async def body(_: redis.asyncio.Redis) -> None:
        client = CountingAsyncRedis.from_url(redis_url)
        await warm_up(client, name)
        holder = DistributedLock(client, name, timeout=30)
        await holder.acquire()
        waiter = DistributedLock(client, name, timeout=5, retry_delay=20, blocking_timeout=10)
        waiting = asyncio.ensure_future(waiter.acquire())
        await asyncio.sleep(0)  # let it send its queued attempt
        deadline = time.monotonic() + 10
        while await client.zcard(holder.keys.waiters) < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        client.round_trips = 0
        await holder.release()
        assert await asyncio.wait_for(waiting, 10)
        confirmed_at = time.monotonic()
        assert client.round_trips == 2  # the release, and the waiter's confirming attempt
        pttl = await client.pttl(waiter.keys.lock)
        assert pttl > 5000 - 100  # the waiter's own lease, not the hand-over's short one
        assert waiter.trusted_until - confirmed_at <= pttl / 1000
        await asyncio.sleep(HANDOFF_WINDOW_MS / 1000 + 0.2)
        assert await waiter.is_locked_by_me() and not waiter.lost
        assert await waiter.release()
        await client.aclose()

    run(redis_url, body)


def test_a_handover_received_before_a_failed_attempt_is_never_adopted(redis_url: str, name: str) -> None:
    # As the sync test: the attempt fails just after a release handed the lock over; its
    # clean-up frees that lock, and must be over before the next attempt, which must
    # then take the lock itself rather than adopt the earlier handover.
    async def body(r: redis.asyncio.Redis) -> None:
        holder = DistributedLock(r, name, timeout=10)
        assert await holder.acquire()

        class BlippingRedis(redis.asyncio.Redis):
            blipped = False

            async def execute_command(self, *args: Any, **options: Any) -> Any:
                if not BlippingRedis.blipped and args[0] == "EVALSHA" and WAIT in args:
                    BlippingRedis.blipped = True
                    await holder.release()
                    await asyncio.sleep(0.05)  # the notifier reads the handover meanwhile
                    raise redis.ConnectionError("simulated: the reply was lost")
                return await super().execute_command(*args, **options)

        client = BlippingRedis.from_url(redis_url)
        waiter = DistributedLock(client, name, timeout=10, retry_delay=0.2, blocking_timeout=5)
        assert await waiter.acquire()
        await asyncio.sleep(0.1)  # any clean-up still running in the background would be done
        assert BlippingRedis.blipped
        assert waiter.token is not None and await waiter.is_locked_by_me()
        other = DistributedLock(r, name, timeout=10)
        assert not await other.acquire(blocking=False)
        assert await waiter.release()
        await client.aclose()
        await r.aclose()
        # The loop's notifier, whose clients are now closed, still ends when cancelled
        # (as asyncio.run does at shutdown; this used to hang there).
        reader = notifier_for(client)._reader
        assert reader is not None
        reader.cancel()
        done, _ = await asyncio.wait({reader}, timeout=3)
        assert done

    run(redis_url, body)


def test_renewal_stops_before_release(redis_url: str, name: str) -> None:
    async def body(_: redis.asyncio.Redis) -> None:
        client = CountingAsyncRedis.from_url(redis_url)
        lock = DistributedLock(client, name, timeout=0.3, auto_renewal=True)
        await lock.acquire()
        await asyncio.sleep(0.35)
        await lock.release()
        client.round_trips = 0
        await asyncio.sleep(0.5)
        assert client.round_trips == 0
        assert get_watchdog().tracked_count() == 0
        await client.aclose()

    run(redis_url, body)
