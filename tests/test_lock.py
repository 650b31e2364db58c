"""The sync DistributedLock against a real redis-server: issue #2's numbered behaviours."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from celery_dlock import (
    DistributedLock,
    LockBackendUnavailable,
    LockError,
    LockLost,
    LockNotAcquired,
)
from celery_dlock.inbox import inbox_channel, member_prefix
from celery_dlock.notify import ReleaseNotifier, notifier_for
from celery_dlock.scripts import HANDOFF_WINDOW_MS, JOIN, WAIT
from celery_dlock.watchdog import get_watchdog
from tests.support.counting import CountingRedis
from tests.support.protocols import protocols_and_paths

# Every client made from redis_url here speaks RESP2 in one run, RESP3 in the other.
redis_url = protocols_and_paths

# -- 1. ownership ----------------------------------------------------------------


def test_acquire_release_roundtrip(r: redis.Redis, name: str) -> None:
    lock = DistributedLock(r, name, timeout=5)
    assert lock.token is None and lock.fence is None
    assert lock.acquire(blocking=False)
    assert lock.token is not None and len(lock.token) >= 32
    assert r.get(lock.keys.lock) == lock.token.encode()
    assert lock.is_locked_by_me() and lock.is_locked_by_anyone()
    assert lock.release() is True
    assert lock.token is None
    assert not lock.is_locked_by_anyone()
    assert lock.release() is False  # not held any more: False, never an exception


def test_second_owner_cannot_acquire_or_release(r: redis.Redis, name: str) -> None:
    holder = DistributedLock(r, name, timeout=5)
    other = DistributedLock(r, name, timeout=5)
    assert holder.acquire()
    assert other.acquire(blocking=False) is False
    assert other.release() is False
    assert other.extend(10) is False
    assert r.get(holder.keys.lock) == holder.token.encode()  # untouched
    assert holder.release()


def test_stale_holder_release_leaves_new_holders_lock_alone(r: redis.Redis, name: str) -> None:
    stale = DistributedLock(r, name, timeout=0.2)
    assert stale.acquire()
    time.sleep(0.3)  # lease expires on the server
    fresh = DistributedLock(r, name, timeout=5)
    assert fresh.acquire(blocking=False)
    assert stale.extend(5) is False and stale.lost
    assert stale.release() is False
    assert r.get(fresh.keys.lock) == fresh.token.encode()
    assert fresh.release()


def test_tokens_are_random_and_distinct(r: redis.Redis, name: str) -> None:
    tokens = set()
    for _ in range(50):
        lock = DistributedLock(r, name)
        lock.acquire()
        tokens.add(lock.token)
        lock.release()
    assert len(tokens) == 50
    assert all(len(bytes.fromhex(t)) >= 16 for t in tokens)  # >= 128 bits


def test_acquire_while_holding_is_an_error(r: redis.Redis, name: str) -> None:
    lock = DistributedLock(r, name)
    assert lock.acquire()
    with pytest.raises(LockError, match="already held"):
        lock.acquire()
    assert lock.release()


# -- 2. lease is server-side PX --------------------------------------------------


def test_lease_is_server_side_expiry_and_value_is_only_the_token(r: redis.Redis, name: str) -> None:
    lock = DistributedLock(r, name, timeout=2.5)
    assert lock.acquire()
    ttl = r.pttl(lock.keys.lock)
    assert 2000 < ttl <= 2500
    assert r.get(lock.keys.lock).decode() == lock.token  # no client timestamp stored
    lock.release()


def test_lock_expires_without_release(r: redis.Redis, name: str) -> None:
    lock = DistributedLock(r, name, timeout=0.15)
    assert lock.acquire()
    time.sleep(0.25)
    assert not lock.is_locked_by_anyone()
    assert lock.lost  # lease ran out on the local clock
    with pytest.raises(LockLost):
        lock.ensure_held()


# -- 3. fencing --------------------------------------------------------------------


def test_fence_strictly_increases_across_owners(r: redis.Redis, name: str) -> None:
    fences = []
    for _ in range(5):
        for _owner in range(2):
            lock = DistributedLock(r, name)
            assert lock.acquire()
            fences.append(lock.fence)
            lock.release()
    assert fences == sorted(fences) and len(set(fences)) == len(fences)
    # The counter outlives the lock (no expiry), so fences never go backwards.
    assert r.ttl(DistributedLock(r, name).keys.fence) == -1


def test_fence_increases_after_expiry_takeover(r: redis.Redis, name: str) -> None:
    first = DistributedLock(r, name, timeout=0.1)
    first.acquire()
    time.sleep(0.2)
    second = DistributedLock(r, name)
    second.acquire()
    assert second.fence > first.fence
    second.release()


# -- 4. waiting ------------------------------------------------------------------


def test_waiter_is_woken_by_release_not_by_retry_delay(r: redis.Redis, name: str) -> None:
    holder = DistributedLock(r, name, timeout=30)
    holder.acquire()
    waiter = DistributedLock(r, name, timeout=5, retry_delay=20, blocking_timeout=25)
    threading.Timer(0.3, holder.release).start()
    started = time.monotonic()
    assert waiter.acquire()
    waited = time.monotonic() - started
    # Woken by the release at ~0.3 s, not by the 20 s retry delay nor the 30 s lease.
    assert waited < 5, waited
    waiter.release()


def test_waiter_is_woken_by_expiry_without_release(r: redis.Redis, name: str) -> None:
    holder = DistributedLock(r, name, timeout=0.5)
    holder.acquire()  # never released: the holder "crashed"
    waiter = DistributedLock(r, name, retry_delay=20, blocking_timeout=25)
    started = time.monotonic()
    assert waiter.acquire()
    assert time.monotonic() - started < 10  # waited for the remaining lease, not 20 s
    assert waiter.fence > holder.fence
    waiter.release()


def test_release_between_failed_attempt_and_subscribe_is_not_missed(
    r: redis.Redis, name: str, monkeypatch: pytest.MonkeyPatch, fresh_notifiers: None
) -> None:
    holder = DistributedLock(r, name, timeout=30)
    holder.acquire()
    original = ReleaseNotifier._subscribe

    def release_first(self: ReleaseNotifier, channel: str) -> None:
        holder.release()  # the release lands before the waiter's SUBSCRIBE
        original(self, channel)

    monkeypatch.setattr(ReleaseNotifier, "_subscribe", release_first)
    waiter = DistributedLock(r, name, retry_delay=20, blocking_timeout=3)
    assert waiter.acquire()  # the attempt after subscribing sees the lock free
    waiter.release()


def test_handover_before_the_waiter_registered_is_not_missed(
    r: redis.Redis, name: str, monkeypatch: pytest.MonkeyPatch, fresh_notifiers: None
) -> None:
    # The process's inbox is already subscribed (a first wait), so the waiter makes
    # no extra attempt after queueing; the handover lands after its queueing attempt
    # but before it registered its token with the notifier.
    warm_up(r, name)
    notifier = notifier_for(r)
    holder = DistributedLock(r, name, timeout=30)
    holder.acquire()
    original = DistributedLock._performers["call"]

    def attempt_then_release(self: DistributedLock, step: Any, *rest: Any) -> Any:
        reply = original(self, step, *rest)
        if self is waiter and JOIN in step.args:
            seen = notifier.messages
            holder.release()
            deadline = time.monotonic() + 5
            while notifier.messages == seen and time.monotonic() < deadline:
                time.sleep(0.001)  # the reader thread has the handover before the waiter registers
        return reply

    monkeypatch.setitem(DistributedLock._performers, "call", attempt_then_release)
    waiter = DistributedLock(r, name, retry_delay=20, blocking_timeout=30)
    started = time.monotonic()
    assert waiter.acquire()
    assert time.monotonic() - started < 5  # woken by the handover, not by its 20 s timer
    waiter.release()


def warm_up(client: redis.Redis, name: str) -> None:
    """One wait on ``name``, so this process's inbox is subscribed and live."""
    holder = DistributedLock(client, name, timeout=30)
    holder.acquire()
    waiter = DistributedLock(client, name, retry_delay=20, blocking_timeout=10)
    releaser = threading.Timer(0.2, holder.release)
    releaser.start()
    assert waiter.acquire()
    waiter.release()
    releaser.join()


def test_a_waiting_acquire_costs_two_round_trips_once_the_inbox_is_live(
    name: str, redis_url: str, fresh_notifiers: None
) -> None:
    client = CountingRedis.from_url(redis_url)
    warm_up(client, name)
    holder = DistributedLock(client, name, timeout=30)
    holder.acquire()
    waiter = DistributedLock(client, name, retry_delay=20, blocking_timeout=10)
    releaser = threading.Timer(0.3, holder.release)
    client.commands = []
    releaser.start()
    assert waiter.acquire()
    releaser.join()
    # the queueing attempt, the holder's release, the winning attempt: no SUBSCRIBE,
    # no re-attempt after subscribing
    assert client.commands == ["EVALSHA"] * 3
    waiter.release()


def test_blocking_false_is_exactly_one_attempt(name: str, redis_url: str) -> None:
    client = CountingRedis.from_url(redis_url)
    holder = DistributedLock(client, name)
    holder.acquire()
    client.round_trips = 0
    contender = DistributedLock(client, name, retry_times=5, blocking_timeout=5)
    assert contender.acquire(blocking=False) is False
    assert client.round_trips == 1
    holder.release()


def test_retry_times_bounds_attempts(r: redis.Redis, name: str) -> None:
    holder = DistributedLock(r, name, timeout=30)
    holder.acquire()
    contender = DistributedLock(r, name, retry_times=3, retry_delay=0.05)
    started = time.monotonic()
    assert contender.acquire() is False
    assert time.monotonic() - started < 5
    holder.release()


def test_blocking_timeout_caps_total_wait(r: redis.Redis, name: str) -> None:
    holder = DistributedLock(r, name, timeout=30)
    holder.acquire()
    contender = DistributedLock(r, name, retry_delay=0.05, blocking_timeout=0.4)
    started = time.monotonic()
    assert contender.acquire() is False
    waited = time.monotonic() - started
    assert 0.35 <= waited < 5
    holder.release()


def test_waiters_share_one_subscription_connection(redis_url: str, name: str, fresh_notifiers: None) -> None:
    client = redis.Redis.from_url(redis_url)
    holder = DistributedLock(client, name, timeout=30)
    holder.acquire()
    fences: list[int] = []

    def take_and_release() -> None:
        lock = DistributedLock(client, name, blocking_timeout=20, timeout=5)
        assert lock.acquire()
        assert lock.fence is not None
        fences.append(lock.fence)
        lock.release()

    waiters = [threading.Thread(target=take_and_release) for _ in range(6)]
    for thread in waiters:
        thread.start()
    time.sleep(0.5)
    notifier = notifier_for(client)
    inbox = notifier.inbox(holder.options.prefix)
    assert client.pubsub_numsub(inbox.channel)[0][1] == 1  # one subscriber, not six
    assert client.zcard(holder.keys.waiters) == 6
    holder.release()
    for thread in waiters:
        thread.join(20)
    assert len(set(fences)) == 6
    assert notifier.messages == 6  # one wake-up message per handover, nothing else


def test_context_manager_raises_lock_not_acquired(r: redis.Redis, name: str) -> None:
    holder = DistributedLock(r, name)
    holder.acquire()
    with pytest.raises(LockNotAcquired) as info, DistributedLock(r, name):
        pass
    assert isinstance(info.value, RuntimeError)  # so `except RuntimeError` keeps working
    assert name in str(info.value)
    holder.release()


def test_context_manager_releases_on_exception(r: redis.Redis, name: str) -> None:
    lock = DistributedLock(r, name)
    with pytest.raises(ZeroDivisionError), lock:
        1 / 0  # noqa: B018
    assert not lock.is_locked_by_anyone()


# -- extend ----------------------------------------------------------------------


def test_extend_adds_and_replaces(r: redis.Redis, name: str) -> None:
    lock = DistributedLock(r, name, timeout=2)
    lock.acquire()
    assert lock.extend(3)
    assert 4000 < r.pttl(lock.keys.lock) <= 5000
    assert lock.extend(1, replace=True)
    assert 500 < r.pttl(lock.keys.lock) <= 1000
    lock.release()


def test_extend_is_capped_by_max_lease(r: redis.Redis, name: str) -> None:
    lock = DistributedLock(r, name, timeout=2, max_lease=5)
    lock.acquire()
    for _ in range(10):
        assert lock.extend(2)
    assert r.pttl(lock.keys.lock) <= 5000
    lock.release()


def test_extend_of_unheld_lock_is_false(r: redis.Redis, name: str) -> None:
    assert DistributedLock(r, name).extend(5) is False


# -- 5. renewal ------------------------------------------------------------------


def test_auto_renewal_holds_three_times_past_timeout(r: redis.Redis, name: str) -> None:
    lock = DistributedLock(r, name, timeout=0.6, auto_renewal=True)
    lock.acquire()
    time.sleep(1.9)  # > 3x the lease
    assert lock.is_locked_by_me()
    assert not lock.lost
    lock.ensure_held()
    assert r.pttl(lock.keys.lock) <= 600  # renewal never grows the lease
    other = DistributedLock(r, name)
    assert other.acquire(blocking=False) is False
    assert lock.release()


def test_renewal_does_not_shorten_an_extended_lease(r: redis.Redis, name: str) -> None:
    lock = DistributedLock(r, name, timeout=0.6, auto_renewal=True)
    lock.acquire()
    lock.extend(10)
    time.sleep(0.8)
    assert r.pttl(lock.keys.lock) > 5000
    lock.release()


def test_lost_when_key_deleted_behind_holder(r: redis.Redis, name: str) -> None:
    calls: list[DistributedLock] = []
    lost_event = threading.Event()

    def on_lost(lock: DistributedLock) -> None:
        calls.append(lock)
        lost_event.set()

    lock = DistributedLock(r, name, timeout=0.9, auto_renewal=True, on_lost=on_lost)
    lock.acquire()
    r.delete(lock.keys.lock)
    assert lost_event.wait(2)  # found at the next renewal (every 0.3 s)
    assert calls == [lock]
    assert lock.lost
    with pytest.raises(LockLost, match="lost"):
        lock.ensure_held()
    assert lock.release() is False


def test_lost_when_key_taken_by_another_owner(r: redis.Redis, name: str) -> None:
    lost_event = threading.Event()
    lock = DistributedLock(r, name, timeout=0.9, auto_renewal=True, on_lost=lambda _l: lost_event.set())
    lock.acquire()
    r.set(lock.keys.lock, "somebody-else", px=5000)
    assert lost_event.wait(2)
    assert lock.release() is False
    assert r.get(lock.keys.lock) == b"somebody-else"


def test_on_lost_for_unrenewed_lock_when_lease_runs_out(r: redis.Redis, name: str) -> None:
    lost_event = threading.Event()
    lock = DistributedLock(r, name, timeout=0.3, on_lost=lambda _l: lost_event.set())
    lock.acquire()
    assert lost_event.wait(2)
    assert lock.lost


def test_one_watchdog_thread_renews_many_locks_in_one_round_trip_per_interval(
    redis_url: str, name: str
) -> None:
    client = CountingRedis.from_url(redis_url)
    locks = [DistributedLock(client, f"{name}-{i}", timeout=0.9, auto_renewal=True) for i in range(50)]
    for lock in locks:
        lock.acquire()
    client.round_trips = 0
    time.sleep(1.0)  # ~3 renewal intervals of 0.3 s
    renew_trips = client.round_trips
    watchdogs = [t for t in threading.enumerate() if t.name == "celery-dlock-watchdog"]
    assert len(watchdogs) == 1
    assert 1 <= renew_trips <= 5, renew_trips  # not 50 per interval
    assert all(lock.is_locked_by_me() for lock in locks)
    for lock in locks:
        lock.release()
    assert get_watchdog().tracked_count() == 0


def test_renewal_stops_before_release(redis_url: str, name: str) -> None:
    client = CountingRedis.from_url(redis_url)
    lock = DistributedLock(client, name, timeout=0.3, auto_renewal=True)
    lock.acquire()
    time.sleep(0.35)
    lock.release()
    client.round_trips = 0
    time.sleep(0.5)  # several renewal intervals
    assert client.round_trips == 0  # no renewal after release
    assert get_watchdog().tracked_count() == 0


@pytest.mark.slow
def test_lost_when_redis_is_stopped(own_redis) -> None:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(own_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    lost_at: list[float] = []
    lock = DistributedLock(
        client,
        "survivor",
        timeout=1.5,
        auto_renewal=True,
        on_lost=lambda _l: lost_at.append(time.monotonic()),
    )
    acquired_at = time.monotonic()
    lock.acquire()
    own_redis.kill()
    killed_at = time.monotonic()
    deadline = time.monotonic() + 5
    while not lost_at and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lost_at, "holder was never told"
    # Told no later than the lease could have run out on the server.
    assert lost_at[0] <= max(acquired_at, killed_at) + 1.5 + 0.05
    with pytest.raises(LockLost):
        lock.ensure_held()
    with pytest.raises(LockBackendUnavailable):
        lock.release()


# -- 6. keys -----------------------------------------------------------------------


def test_all_keys_share_one_cluster_slot_and_prefix(r: redis.Redis, name: str) -> None:
    lock = DistributedLock(r, name, prefix="myapp:locks:")
    keys = lock.keys
    assert keys.lock.startswith("myapp:locks:")
    assert len({key_slot(k.encode()) for k in (keys.lock, keys.fence, keys.waiters)}) == 1
    lock.acquire()
    assert r.exists(keys.lock) and r.exists(keys.fence)
    lock.release()


# -- 7. cost -----------------------------------------------------------------------


def test_uncontended_acquire_and_release_are_one_round_trip_each(redis_url: str, name: str) -> None:
    client = CountingRedis.from_url(redis_url)
    lock = DistributedLock(client, name)
    lock.acquire()  # loads the script once (EVALSHA -> NOSCRIPT -> EVAL) if needed
    lock.release()
    client.commands.clear()
    client.round_trips = 0
    lock.acquire()
    assert client.round_trips == 1, client.commands
    lock.release()
    assert client.round_trips == 2, client.commands


# -- unreachable server -------------------------------------------------------------


def test_unreachable_redis_raises_naming_the_server() -> None:
    from celery_dlock.embedded import free_port

    port = free_port()
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    lock = DistributedLock(client, "nowhere")
    with pytest.raises(LockBackendUnavailable, match=f"127.0.0.1:{port}"):
        lock.acquire()
    assert lock.token is None


# -- hooks for layers built on the lock (the Celery layer uses them) ---------------


class OwnedLock(DistributedLock):
    def make_token(self) -> str:
        return super().make_token() + "|worker-7"


def test_make_token_hook_read_holder_and_release_by_suffix(r: redis.Redis, name: str) -> None:
    from celery_dlock.lock import release_by_token_suffix

    lock = OwnedLock(r, name)
    assert lock.acquire()
    holder = DistributedLock(r, name).read_holder()
    assert holder == lock.token and holder.endswith("|worker-7") and len(holder) > 32
    assert release_by_token_suffix(r, lock.keys, "|worker-8") is False  # someone else
    other = DistributedLock(r, name)
    other._token = "|worker-7"  # the owner part alone is not the token
    assert other.release() is False
    assert lock.is_locked_by_me()
    assert release_by_token_suffix(r, lock.keys, "|worker-7") is True
    assert DistributedLock(r, name).read_holder() is None
    with pytest.raises(ValueError, match="suffix"):
        release_by_token_suffix(r, lock.keys, "")


def test_release_by_suffix_hands_over_to_the_longest_waiter(r: redis.Redis, name: str) -> None:
    from celery_dlock.lock import release_by_token_suffix

    lock = OwnedLock(r, name, timeout=30)
    lock.acquire()
    waiter = DistributedLock(r, name, retry_delay=20, blocking_timeout=10)
    threading.Timer(0.3, lambda: release_by_token_suffix(r, lock.keys, "|worker-7")).start()
    started = time.monotonic()
    assert waiter.acquire()  # woken by the handover, not by its 20 s retry delay
    assert time.monotonic() - started < 5
    waiter.release()


def test_extension_keys_share_the_hash_tag(name: str) -> None:
    from celery_dlock.keys import LockKeys

    keys = LockKeys.for_name(name)
    extra = keys.extension("queued")
    assert key_slot(extra.encode()) == key_slot(keys.lock.encode())
    assert extra not in (keys.lock, keys.fence, keys.waiters)


# -- handover ------------------------------------------------------------------------


class Releaser(threading.Thread):
    """Releases ``holder`` as soon as ``count`` waiters are queued behind it."""

    def __init__(self, client: redis.Redis, holder: DistributedLock, count: int) -> None:
        super().__init__()
        self.client, self.holder, self.count = client, holder, count
        self.released_at: float | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 10
        while self.client.zcard(self.holder.keys.waiters) < self.count and time.monotonic() < deadline:
            time.sleep(0.001)
        self.released_at = time.monotonic()
        self.holder.release()


def release_once_queued(client: redis.Redis, holder: DistributedLock, count: int = 1) -> Releaser:
    """Release ``holder`` as soon as ``count`` waiters are queued behind it."""
    releaser = Releaser(client, holder, count)
    releaser.start()
    return releaser


def test_a_handover_is_confirmed_with_one_attempt_that_sets_the_full_lease(
    name: str, redis_url: str, fresh_notifiers: None
) -> None:
    client = CountingRedis.from_url(redis_url)
    warm_up(client, name)
    holder = DistributedLock(client, name, timeout=30)
    holder.acquire()
    waiter = DistributedLock(client, name, timeout=5, retry_delay=20, blocking_timeout=10)
    client.commands = []
    releaser = release_once_queued(client, holder)
    assert waiter.acquire()
    confirmed_at = time.monotonic()
    releaser.join()
    # the queued attempt, the release and the confirming attempt (ZCARD: the test's polling)
    assert [c for c in client.commands if c != "ZCARD"] == ["EVALSHA", "EVALSHA", "EVALSHA"]
    pttl = client.pttl(waiter.keys.lock)
    assert pttl > 5000 - 100  # the waiter's own lease, not the hand-over's short one
    assert waiter.trusted_until - confirmed_at <= pttl / 1000
    # Nothing renews a lock without auto_renewal: it keeps the lease it was returned with.
    time.sleep(HANDOFF_WINDOW_MS / 1000 + 0.2)
    assert waiter.is_locked_by_me() and not waiter.lost
    assert client.pttl(waiter.keys.lock) < pttl
    assert waiter.release()
    assert not client.exists(waiter.keys.lock)


def test_a_waiter_that_died_in_the_queue_holds_up_the_lock_at_most_the_handoff_window(
    r: redis.Redis, name: str
) -> None:
    holder = DistributedLock(r, name, timeout=30)
    holder.acquire()
    # A waiter whose process is gone: queued first, on an inbox nobody reads.
    dead = member_prefix(inbox_channel("dlock:", "0" * 16)) + b"dead-token"
    r.zadd(holder.keys.waiters, {dead: 1})
    waiter = DistributedLock(r, name, blocking_timeout=10)  # the default retry_delay, 0.1 s
    releaser = release_once_queued(r, holder, count=2)
    assert waiter.acquire()
    acquired_at = time.monotonic()
    releaser.join()
    # The documented bound (docs/lock.md): the handoff window plus the next waiter's
    # retry_delay, here with 0.2 s for the round trips and the threads.
    assert releaser.released_at is not None
    assert acquired_at - releaser.released_at < HANDOFF_WINDOW_MS / 1000 + 0.1 + 0.2
    assert waiter.release()


def test_a_release_never_hands_the_lock_to_the_releasers_own_stale_queue_entry(
    r: redis.Redis, name: str
) -> None:
    # A retried 'join' request can leave the holder's own token queued after its first
    # execution took the lock; releasing must free the lock, not hand it to itself.
    holder = DistributedLock(r, name, timeout=30)
    holder.acquire()
    assert holder.token is not None
    own = member_prefix(inbox_channel("dlock:", "0" * 16)) + holder.token.encode()
    r.zadd(holder.keys.waiters, {own: 1})
    assert holder.release()
    assert not r.exists(holder.keys.lock)
    assert r.zcard(holder.keys.waiters) == 0


def test_a_handover_received_before_a_failed_attempt_is_never_adopted(
    redis_url: str, name: str, fresh_notifiers: None
) -> None:
    # The waiter's attempt fails with a connection error just after a release handed it
    # the lock (and the notifier read the handover). The failed attempt's clean-up frees
    # that lock, so adopting the earlier handover would make two holders.
    holder = DistributedLock(redis.Redis.from_url(redis_url), name, timeout=10)
    assert holder.acquire()

    class BlippingRedis(redis.Redis):
        blipped = False

        def execute_command(self, *args: Any, **options: Any) -> Any:
            if not BlippingRedis.blipped and args[0] == "EVALSHA" and WAIT in args:
                BlippingRedis.blipped = True
                holder.release()  # hands the lock to the waiter, publishes the handover
                time.sleep(0.05)  # the notifier thread reads it meanwhile
                raise redis.ConnectionError("simulated: the reply was lost")
            return super().execute_command(*args, **options)

    waiter = DistributedLock(
        BlippingRedis.from_url(redis_url), name, timeout=10, retry_delay=0.2, blocking_timeout=5
    )
    assert waiter.acquire()
    assert BlippingRedis.blipped
    assert waiter.is_locked_by_me()
    other = DistributedLock(redis.Redis.from_url(redis_url), name, timeout=10)
    assert not other.acquire(blocking=False)
    assert waiter.release()


def test_a_handover_during_a_silent_reconnect_of_the_inbox_wakes_the_waiter(
    redis_url: str, name: str, fresh_notifiers: None
) -> None:
    # redis-py (with its default retries, no socket timeout) reconnects and resubscribes
    # a dropped pub/sub connection by itself, raising nothing; a handover published while
    # it was down is lost, so the resubscription must wake the waiters to look again.
    r = redis.Redis.from_url(redis_url)
    warm_up(r, name)
    notifier = notifier_for(r)
    local_port = notifier._pubsub.connection._sock.getsockname()[1]
    inbox_client = next(c for c in r.client_list(_type="pubsub") if c["addr"].endswith(f":{local_port}"))
    holder = DistributedLock(r, name, timeout=10)
    assert holder.acquire()
    waiter = DistributedLock(r, name, timeout=10, retry_delay=5, blocking_timeout=10)
    took: list[float] = []

    def wait() -> None:
        started = time.monotonic()
        assert waiter.acquire()
        took.append(time.monotonic() - started)

    thread = threading.Thread(target=wait)
    thread.start()
    deadline = time.monotonic() + 5
    while r.zcard(holder.keys.waiters) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert holder.token is not None
    pipe = r.pipeline(transaction=True)  # drop the inbox connection and release at once
    pipe.execute_command("CLIENT", "KILL", "ID", inbox_client["id"])
    pipe.execute_command(*holder._release_script.evalsha, holder.token)
    pipe.execute()
    thread.join(10)
    assert took and took[0] < 2.5  # not its 5 s retry_delay
    assert waiter.release()


def test_a_retried_queueing_attempt_that_took_the_lock_leaves_no_queue_entry(
    r: redis.Redis, name: str, monkeypatch: pytest.MonkeyPatch, fresh_notifiers: None
) -> None:
    # As if the first execution of this 'join' request had queued the waiter and its
    # reply was lost; the re-sent request finds the lock free and takes it.
    waiter = DistributedLock(r, name, timeout=10, blocking_timeout=5)
    monkeypatch.setattr(waiter, "make_token", lambda: "retried-token")
    member = notifier_for(r).inbox(waiter.options.prefix).member("retried-token")
    r.zadd(waiter.keys.waiters, {member: 1})
    assert waiter.acquire()
    assert r.zcard(waiter.keys.waiters) == 0
    assert waiter.release()


def test_release_by_suffix_also_removes_that_owners_queue_entries(r: redis.Redis, name: str) -> None:
    # A Celery pool process killed while *waiting* for the lock: the worker's main
    # process frees it by suffix, which must also take it out of the queue, or a later
    # release would hand the lock to it.
    from celery_dlock.lock import release_by_token_suffix

    holder = DistributedLock(r, name, timeout=30)
    holder.acquire()
    dead = member_prefix(inbox_channel("dlock:", "0" * 16)) + b"0123abcd|worker-9"
    alive = member_prefix(inbox_channel("dlock:", "1" * 16)) + b"4567abcd|worker-10"
    r.zadd(holder.keys.waiters, {dead: 1, alive: 2})
    assert release_by_token_suffix(r, holder.keys, "|worker-9") is False  # the lock is not its
    assert r.zrange(holder.keys.waiters, 0, -1) == [alive]
    assert holder.is_locked_by_me()
    assert holder.release()
