"""LockedScheduler objects driven tick by tick in this process, on real Redis (lock store and broker).

Publishing is real: messages land in a Redis broker list, counted with LLEN and read
back to check their headers. Several scheduler objects stand for several beat processes.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.schedules import crontab

from celery_dlock.beat import LockedScheduler, scheduled_tick

UTC = timezone.utc
LEASE = 3.0


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    prefix = f"dlock-beat-inproc-{uuid.uuid4().hex[:12]}:"
    app = Celery("inproc", broker=redis_url, set_as_current=False)
    app.conf.update(
        timezone="UTC",
        enable_utc=True,
        dlock_redis_url=redis_url,
        dlock_prefix=prefix,
        dlock_beat_lease=LEASE,
        task_default_queue=f"{prefix}queue",
        beat_schedule={},
        result_expires=None,  # no celery.backend_cleanup entry
    )
    yield app
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
    app.close()


@pytest.fixture
def make(app: Celery, tmp_path: Path) -> Iterator[Callable[..., LockedScheduler]]:
    made: list[LockedScheduler] = []

    def make(name: str, last_run_at: datetime | None = None) -> LockedScheduler:
        sched = LockedScheduler(app=app, schedule_filename=str(tmp_path / name))
        assert set(sched.schedule) == set(app.conf.beat_schedule)
        if last_run_at is not None:
            for entry in sched.schedule.values():
                entry.last_run_at = last_run_at
        made.append(sched)
        return sched

    yield make
    for sched in made:
        sched.close()


def queue(app: Celery) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(app.conf.dlock_redis_url)
    try:
        return [json.loads(raw) for raw in client.lrange(app.conf.task_default_queue, 0, -1)]
    finally:
        client.close()


def lock_key(app: Celery) -> str:
    return f"{app.conf.dlock_prefix}{{beat:inproc}}"


def celery_marks_beat_messages() -> bool:
    """Whether this Celery's beat adds its ``celery_beat_task`` header (5.6 and later)."""
    import inspect

    import celery.beat

    return "celery_beat_task" in inspect.getsource(celery.beat)


def now() -> datetime:
    return datetime.now(UTC)


@pytest.mark.parametrize(
    "sched, align",
    [(timedelta(days=1), True), (crontab(minute=0, hour=4), False)],
    ids=["daily-interval-aligned", "daily-crontab"],
)
def test_new_leader_with_stale_state_skips_the_tick_the_old_leader_published(
    app: Celery,
    make: Callable[..., LockedScheduler],
    caplog: pytest.LogCaptureFixture,
    sched: Any,
    align: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="celery_dlock.beat")
    app.conf.dlock_beat_align_intervals = align
    app.conf.beat_schedule = {"daily": {"task": "reports.daily", "schedule": sched}}
    first = make("first", last_run_at=now() - timedelta(days=2))
    assert first.tick() == 0  # became leader and published the due tick
    assert first.is_leader
    messages = queue(app)
    assert len(messages) == 1
    headers = messages[0]["headers"]
    expected = scheduled_tick(first.schedule["daily"], now())
    if headers["dlock_beat_tick"] != expected.label:
        pytest.skip("the daily tick changed during the test (run at midnight / 04:00 UTC)")
    assert headers["dlock_beat_entry"] == "daily"
    assert headers["dlock_beat_fence"] == first.fence
    if celery_marks_beat_messages():
        assert headers["celery_beat_task"] is True  # Celery's own header is kept

    first.close()  # clean shutdown: the lease is released at once
    second = make("second", last_run_at=now() - timedelta(days=5))  # never ran it: due at once
    assert second.tick() == 0
    assert second.is_leader and second.fence is not None and second.fence > headers["dlock_beat_fence"]
    assert len(queue(app)) == 1, "the new leader published a tick that was already published"
    assert f"skipped duplicate tick of 'daily' scheduled at {expected.label}" in caplog.text
    # The skipped tick counts as run: the entry is not retried on the next ticks.
    assert second.tick() > 0
    assert len(queue(app)) == 1


# -- interval entries keep Celery's timing ---------------------------------------------------


def test_an_interval_entry_keeps_celerys_timing_not_midnight_utc(
    app: Celery, make: Callable[..., LockedScheduler]
) -> None:
    # A daily entry last run 1 h ago is next due 23 h from now (Celery's own timing),
    # not at the next midnight UTC.
    app.conf.beat_schedule = {"daily": {"task": "reports.daily", "schedule": timedelta(days=1)}}
    current = now()
    midnight = current.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    until_midnight = midnight - current
    offset = timedelta(hours=1)
    if abs(until_midnight - (timedelta(days=1) - offset)) < timedelta(minutes=30):
        offset = timedelta(hours=5)  # the two would agree now: tell them apart another way
    leader = make("leader", last_run_at=current - offset)
    leader.tick()
    assert leader.is_leader and queue(app) == []
    due, next_check = leader.is_due(leader.schedule["daily"])
    assert not due
    expected = (current - offset + timedelta(days=1) - now()).total_seconds()
    assert abs(next_check - expected) < 5, (next_check, expected, until_midnight.total_seconds())


def test_a_new_leader_continues_an_interval_entry_from_its_last_run_in_redis(
    app: Celery, make: Callable[..., LockedScheduler]
) -> None:
    app.conf.beat_schedule = {"hourly": {"task": "reports.hourly", "schedule": 3600.0}}
    first = make("first", last_run_at=now() - timedelta(hours=2))
    assert first.tick() == 0  # leads and publishes the due run
    published = queue(app)
    assert [m["headers"]["dlock_beat_entry"] for m in published] == ["hourly"]
    ran_at = datetime.fromisoformat(published[0]["headers"]["dlock_beat_tick"].replace("Z", "+00:00"))
    first.close()
    second = make("second", last_run_at=now() - timedelta(hours=5))  # stale: due at once by itself
    second.tick()
    assert second.is_leader
    assert len(queue(app)) == 1, "the new leader ran the entry again within its interval"
    entry = second.schedule["hourly"]
    assert abs((entry.last_run_at - ran_at).total_seconds()) < 0.001
    due, next_check = second.is_due(entry)
    assert not due and 3590 < next_check <= 3600  # an hour after the first leader's run


def test_a_claim_refused_because_another_beat_just_ran_the_interval_entry_moves_its_next_run(
    app: Celery, make: Callable[..., LockedScheduler], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="celery_dlock.beat")
    app.conf.beat_schedule = {"hourly": {"task": "reports.hourly", "schedule": 3600.0}}
    leader = make("leader")
    leader.tick()
    assert leader.is_leader
    # Another beat ran the entry 10 minutes ago (this one never heard of it).
    other_run = now() - timedelta(minutes=10)
    micros = int(other_run.timestamp() * 1_000_000)
    client = redis.Redis.from_url(redis_url)
    client.set(f"{lock_key(app)}:last:hourly", f"{micros} fence 1 elsewhere:1", px=60_000)
    client.close()
    leader.schedule["hourly"].last_run_at = now() - timedelta(hours=3)
    leader._heap = None
    assert leader.tick() == 0
    assert queue(app) == []
    assert "skipped a run of 'hourly'" in caplog.text and "elsewhere:1" in caplog.text
    due, next_check = leader.is_due(leader.schedule["hourly"])
    assert not due and 2990 < next_check <= 3000  # an hour after the other beat's run


def test_claim_by_a_deposed_leader_is_refused_and_it_steps_down_without_raising(
    app: Celery, make: Callable[..., LockedScheduler], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="celery_dlock.beat")
    app.conf.beat_schedule = {"hourly": {"task": "reports.hourly", "schedule": 3600.0}}
    leader = make("leader")
    assert leader.tick() > 0  # leads; nothing due yet
    assert leader.is_leader
    old_fence = leader.fence
    client = redis.Redis.from_url(redis_url)
    client.set(lock_key(app), "intruder", px=2000)  # another owner takes the lease over

    leader.schedule["hourly"].last_run_at = now() - timedelta(hours=3)
    leader._heap = None
    assert leader.tick() == 0  # the due entry's claim is refused server-side
    assert not leader.is_leader
    assert queue(app) == []
    assert "lost leadership" in caplog.text
    assert client.get(lock_key(app)) == b"intruder"  # the step-down did not delete it

    assert leader.tick() == 0  # standby: waits one slice (lease/3) for the lease, no error
    assert not leader.is_leader
    client.delete(lock_key(app))
    leader.tick()
    assert leader.is_leader and leader.fence is not None and leader.fence > (old_fence or 0)
    client.close()


def test_renewal_keeps_the_lease_and_notices_a_takeover(
    app: Celery, make: Callable[..., LockedScheduler], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="celery_dlock.beat")
    app.conf.beat_schedule = {"hourly": {"task": "reports.hourly", "schedule": 3600.0}}
    leader = make("leader")
    wait = leader.tick()
    assert leader.is_leader
    assert 0 < wait <= LEASE / 3  # beat wakes before the renewal is due
    client = redis.Redis.from_url(redis_url)
    leader._next_renewal = 0.0  # renewal due now
    leader.tick()
    assert leader.is_leader
    assert client.pttl(lock_key(app)) > (LEASE - 0.5) * 1000
    client.set(lock_key(app), "intruder", px=2000)
    leader._next_renewal = 0.0
    leader.tick()
    assert not leader.is_leader
    assert "lost leadership" in caplog.text and "renewal found the lease expired" in caplog.text
    client.close()


def test_standby_does_not_publish_and_takes_over_when_the_leader_closes(
    app: Celery, make: Callable[..., LockedScheduler]
) -> None:
    app.conf.beat_schedule = {"often": {"task": "reports.often", "schedule": 3600.0}}
    leader = make("leader")
    standby = make("standby", last_run_at=now() - timedelta(days=1))  # would be due at once
    leader.tick()
    assert leader.is_leader
    assert standby.tick() == 0  # one wait slice, then back to beat's loop
    assert not standby.is_leader
    assert queue(app) == []
    leader.close()
    standby.tick()
    assert standby.is_leader
    assert [m["headers"]["dlock_beat_entry"] for m in queue(app)] == ["often"]
