"""Handover notes: a holder leaves a note with its release; the next holder reads it with its acquisition.

Both happen inside the scripts that release and acquire, so a note always
describes the last holder that released (never one that lost the lock) and
costs no extra round trip.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest
import redis
import redis.asyncio
from redis.cluster import key_slot

from celery_dlock import DistributedLock
from celery_dlock.asyncio import DistributedLock as AsyncDistributedLock
from tests.support.counting import CountingRedis
from tests.support.protocols import protocols_and_paths

# Every client made from redis_url here speaks RESP2 in one run, RESP3 in the other.
redis_url = protocols_and_paths


def test_the_next_holder_reads_the_note_of_the_last_release(r: redis.Redis, name: str) -> None:
    first = DistributedLock(r, name, note_ttl=60)
    assert first.acquire()
    assert first.note is None  # nobody left one yet
    assert first.release(note="offset=42")
    second = DistributedLock(r, name, note_ttl=60)
    assert second.acquire()
    assert second.note == "offset=42"
    assert second.release()  # no note given: the old one stays
    third = DistributedLock(r, name, note_ttl=60)
    assert third.acquire() and third.note == "offset=42"
    third.release(note="offset=43")
    assert 0 < r.pttl(first.keys.note) <= 60_000


def test_a_note_expires_after_note_ttl(r: redis.Redis, name: str) -> None:
    lock = DistributedLock(r, name, note_ttl=0.3)
    lock.acquire()
    lock.release(note="short-lived")
    time.sleep(0.5)
    later = DistributedLock(r, name, note_ttl=0.3)
    later.acquire()
    assert later.note is None
    later.release()


def test_a_holder_that_lost_its_lock_leaves_no_note(r: redis.Redis, name: str) -> None:
    stale = DistributedLock(r, name, timeout=0.2, note_ttl=60)
    stale.acquire()
    time.sleep(0.35)  # its lease ran out
    successor = DistributedLock(r, name, note_ttl=60)
    assert successor.acquire()
    assert stale.release(note="from a holder that lost it") is False
    assert r.get(stale.keys.note) is None
    successor.release(note="ok")
    assert r.get(stale.keys.note) == b"ok"


def test_the_note_travels_with_a_handover_to_a_waiter(r: redis.Redis, name: str) -> None:
    holder = DistributedLock(r, name, timeout=30, note_ttl=60)
    holder.acquire()
    waiter = DistributedLock(r, name, retry_delay=20, blocking_timeout=10, note_ttl=60)
    threading.Timer(0.3, lambda: holder.release(note="handed over")).start()
    assert waiter.acquire()  # woken by the handover
    assert waiter.note == "handed over"
    waiter.release()


def test_notes_cost_no_extra_round_trip(redis_url: str, name: str) -> None:
    client = CountingRedis.from_url(redis_url)
    lock = DistributedLock(client, name, note_ttl=60)
    lock.acquire()
    lock.release(note="warm-up")  # loads the scripts if needed
    client.round_trips = 0
    lock.acquire()
    assert lock.note == "warm-up"
    assert client.round_trips == 1
    lock.release(note="again")
    assert client.round_trips == 2


def test_the_note_key_shares_the_lock_hash_tag(name: str) -> None:
    keys = DistributedLock(redis.Redis(), name, note_ttl=1).keys
    assert key_slot(keys.note.encode()) == key_slot(keys.lock.encode())
    assert keys.note not in (keys.lock, keys.fence, keys.waiters)


@pytest.mark.parametrize(
    "note_ttl, error, message",
    [
        (0, ValueError, "note_ttl must be > 0 seconds, got 0"),
        (-1, ValueError, "note_ttl must be > 0 seconds, got -1"),
        (math.nan, ValueError, "note_ttl .*finite.* nan"),
        ("60", TypeError, "note_ttl must be a number of seconds.*str: '60'"),
        (True, TypeError, "note_ttl .*bool: True"),
    ],
)
def test_bad_note_ttl_is_rejected(
    r: redis.Redis, name: str, note_ttl: object, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        DistributedLock(r, name, note_ttl=note_ttl)  # type: ignore[arg-type]


def test_bad_note_is_rejected_and_the_lock_stays_held(r: redis.Redis, name: str) -> None:
    plain = DistributedLock(r, name)
    plain.acquire()
    with pytest.raises(ValueError, match="note_ttl"):
        plain.release(note="no place to keep it")  # notes are off for this lock
    assert plain.is_locked_by_me()
    plain.release()
    noted = DistributedLock(r, name, note_ttl=60)
    noted.acquire()
    with pytest.raises(TypeError, match="note must be a str or None, got int: 5"):
        noted.release(note=5)  # type: ignore[arg-type]
    assert noted.is_locked_by_me()
    noted.release()


def test_asyncio_notes_mirror_the_sync_ones(redis_url: str, name: str) -> None:
    async def main() -> tuple[str | None, str | None, bool]:
        client = redis.asyncio.Redis.from_url(redis_url)
        first = AsyncDistributedLock(client, name, note_ttl=60)
        await first.acquire()
        before = first.note
        await first.release(note="from asyncio")
        second = AsyncDistributedLock(client, name, note_ttl=60)
        await second.acquire()
        after = second.note
        stale = AsyncDistributedLock(client, name + ":stale", timeout=0.2, note_ttl=60)
        await stale.acquire()
        await asyncio.sleep(0.35)
        lost_release = await stale.release(note="lost")
        await second.release()
        await client.aclose()
        return before, after, lost_release

    before, after, lost_release = asyncio.run(main())
    assert before is None and after == "from asyncio" and lost_release is False


def test_the_documented_watermark_example(r: redis.Redis, name: str) -> None:
    def run_job() -> int:
        lock = DistributedLock(r, name, note_ttl=86400)
        with lock:
            start = int(lock.note or 0)
            end = start + 10
            lock.release(note=str(end))  # the next holder starts here
        return start

    assert [run_job() for _ in range(3)] == [0, 10, 20]
    assert DistributedLock(r, name).read_holder() is None


def test_a_note_reads_back_the_same_whatever_the_client_encoding(r: redis.Redis, redis_url: str) -> None:
    """Notes are stored as UTF-8: a latin-1 client reads back what it (or a UTF-8 client) wrote."""
    import uuid

    name = f"encoded-{uuid.uuid4().hex}"
    latin = redis.Redis.from_url(redis_url, encoding="latin-1")
    for writer in (latin, r):
        first = DistributedLock(writer, name, note_ttl=5)
        assert first.acquire() and first.release(note="n\u00f6te \u2192 \u00e9t\u00e9")
        for reader in (latin, r):
            second = DistributedLock(reader, name, note_ttl=5)
            assert second.acquire()
            assert second.note == "n\u00f6te \u2192 \u00e9t\u00e9"
            assert second.release()
    latin.close()


@pytest.mark.parametrize("no_note", [None, False], ids=["nil", "resp3-false"])
def test_no_note_reads_as_none_however_the_server_says_it(r: redis.Redis, name: str, no_note: object) -> None:
    # A script's missing value is nil to a RESP2 client; some servers send a RESP3 client false.
    lock = DistributedLock(r, name, note_ttl=60)
    token = lock.make_token()
    assert lock._take_reply([7, no_note], token, 0.0).acquired
    assert lock.note is None and lock.fence == 7
