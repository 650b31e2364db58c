"""How LockedScheduler names a scheduled tick, and how it validates its settings (no Redis needed)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from celery import Celery
from celery.beat import ScheduleEntry
from celery.schedules import crontab, schedule

from celery_dlock.beat import (
    TICK_TTL_MARGIN,
    AlignedInterval,
    LockedScheduler,
    Tick,
    aligned_is_due,
    beat_lock_name,
    is_interval,
    latest_fire,
    scheduled_tick,
    tick_key,
)

UTC = timezone.utc


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("ticks", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.update(timezone="UTC", enable_utc=True, dlock_redis_url="redis://127.0.0.1:1/0")
    yield app
    app.close()


def at(text: str, tz: Any = UTC) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=tz)


def entry(app: Celery, sched: Any, last_run_at: datetime, name: str = "job") -> ScheduleEntry:
    return ScheduleEntry(name=name, task="t", schedule=sched, last_run_at=last_run_at, app=app)


# -- interval entries: Celery's timing, the run itself is claimed ----------------------


def test_an_interval_run_is_claimed_at_the_time_it_runs_against_the_entrys_interval(app: Celery) -> None:
    now = at("2024-05-01T12:00:07.400000")
    every_5 = schedule(timedelta(seconds=5), app=app)
    tick = scheduled_tick(entry(app, every_5, at("2024-05-01T12:00:02.100000")), now)
    ttl = 2 * timedelta(seconds=5) + TICK_TTL_MARGIN
    assert tick == Tick("job", now, ttl, run_every=timedelta(seconds=5))
    assert tick.label == "2024-05-01T12:00:07.400000Z"
    assert tick.micros == int(now.timestamp() * 1_000_000)


# -- interval entries with dlock_beat_align_intervals: aligned on the epoch ------------


def test_interval_ticks_are_aligned_on_the_epoch_whatever_last_run_at_is(app: Celery) -> None:
    now = at("2024-05-01T12:00:07.400000")
    every_5 = AlignedInterval.of(schedule(timedelta(seconds=5), app=app))
    fresh = entry(app, every_5, at("2024-05-01T12:00:04.900000"))
    stale = entry(app, every_5, at("2024-04-01T00:00:00"))  # a standby that never ran it
    a, b = scheduled_tick(fresh, now), scheduled_tick(stale, now)
    assert a == b == Tick("job", at("2024-05-01T12:00:05"), 2 * timedelta(seconds=5) + TICK_TTL_MARGIN)
    assert a.label == "2024-05-01T12:00:05Z"


def test_aligned_is_due_when_the_clock_enters_a_later_slot(app: Celery) -> None:
    every_10 = schedule(10, app=app)
    # Last run in the slot [12:00:00, 12:00:10): not due before 12:00:10, due from then on.
    due, wait = aligned_is_due(every_10, at("2024-05-01T12:00:00.500000"), at("2024-05-01T12:00:09.250000"))
    assert (due, wait) == (False, 0.75)
    due, wait = aligned_is_due(every_10, at("2024-05-01T12:00:00.500000"), at("2024-05-01T12:00:10"))
    assert (due, wait) == (True, 10.0)
    # Many slots missed: due once (no backfill), next check at the next slot start.
    due, wait = aligned_is_due(every_10, at("2024-05-01T08:00:00"), at("2024-05-01T12:00:03"))
    assert (due, wait) == (True, 7.0)
    # last_run_at in the future (clock stepped back): not due now, due at the next slot.
    due, wait = aligned_is_due(every_10, at("2024-05-01T13:00:00"), at("2024-05-01T12:00:03"))
    assert (due, wait) == (False, 7.0)


def test_subsecond_intervals_and_naive_datetimes(app: Celery) -> None:
    half = AlignedInterval.of(schedule(0.5, app=app))
    tick = scheduled_tick(entry(app, half, datetime(2024, 5, 1)), datetime(2024, 5, 1, 12, 0, 1, 700000))
    assert tick.label == "2024-05-01T12:00:01.500000Z"


def test_which_schedules_are_intervals(app: Celery) -> None:
    class Custom(schedule):  # type: ignore[misc]
        def is_due(self, last_run_at: datetime) -> Any:
            return super().is_due(last_run_at)

    assert is_interval(schedule(1, app=app))
    assert is_interval(schedule(timedelta(hours=1), relative=True, app=app))
    assert is_interval(AlignedInterval.of(schedule(1, app=app)))
    assert not is_interval(schedule(0, app=app))
    assert not is_interval(Custom(1, app=app))
    assert not is_interval(crontab(app=app))


# -- calendar entries: the latest fire time at or before now ------------------------


def fixed(app: Celery, now: datetime, **fields: Any) -> crontab:
    return crontab(nowfun=lambda: now, app=app, **fields)


def test_crontab_tick_is_the_latest_fire_time_for_fresh_and_stale_entries(app: Celery) -> None:
    now = at("2024-05-01T12:07:31")
    quarter = fixed(app, now, minute="*/15")
    fresh = entry(app, quarter, at("2024-05-01T11:45:00.300000"))
    stale = entry(app, quarter, at("2024-04-20T03:00:00"))
    a, b = scheduled_tick(fresh, now), scheduled_tick(stale, now)
    assert a == b
    assert a.label == "2024-05-01T12:00:00Z"
    assert a.ttl == 2 * timedelta(minutes=15) + TICK_TTL_MARGIN


def test_crontab_exactly_at_a_fire_time_and_weekly(app: Celery) -> None:
    now = at("2024-05-01T12:00:00")  # a Wednesday
    assert latest_fire(fixed(app, now, minute="*/15"), now) == (now, at("2024-05-01T12:15:00"))
    weekly = fixed(app, now, minute=0, hour=9, day_of_week="mon")
    assert latest_fire(weekly, now) == (at("2024-04-29T09:00:00"), at("2024-05-06T09:00:00"))


def test_crontab_in_the_apps_timezone(app: Celery) -> None:
    app.conf.timezone = "Europe/Berlin"
    berlin = ZoneInfo("Europe/Berlin")
    now = datetime(2024, 7, 2, 10, 0, tzinfo=berlin)
    daily = fixed(app, now, minute=30, hour=4)
    tick = scheduled_tick(entry(app, daily, now - timedelta(days=3)), now)
    assert tick.label == "2024-07-02T02:30:00Z"  # 04:30 CEST


def test_tick_keys_share_the_leader_hash_tag_and_hash_long_names() -> None:
    tick = Tick("odd {name}", at("2024-05-01T12:00:00"), timedelta(seconds=61))
    assert tick_key("p:{beat:x}", tick) == "p:{beat:x}:tick:odd {name}:2024-05-01T12:00:00Z"
    assert tick.ttl_ms == 61_000
    long_key = tick_key("p:{beat:x}", Tick("n" * 500, at("2024-05-01T12:00:00"), timedelta(1)))
    assert long_key.startswith("p:{beat:x}:tick:sha256-") and len(long_key) < 150


# -- settings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "lease,error",
    [
        ("30", TypeError),
        (True, TypeError),
        (None, None),
        (0, ValueError),
        (-5, ValueError),
        (0.5, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (10**6, ValueError),
    ],
)
def test_dlock_beat_lease_is_validated(app: Celery, tmp_path: Path, lease: Any, error: Any) -> None:
    app.conf.dlock_beat_lease = lease
    if error is None:
        assert LockedScheduler(app=app, schedule_filename=str(tmp_path / "s"), lazy=True).lease == 30
        return
    with pytest.raises(error, match="dlock_beat_lease"):
        LockedScheduler(app=app, schedule_filename=str(tmp_path / "s"), lazy=True)


def test_lock_name_setting_and_default(app: Celery) -> None:
    assert beat_lock_name(app) == "beat:ticks"
    app.conf.dlock_beat_lock_name = "prod-beat"
    assert beat_lock_name(app) == "prod-beat"
    for bad, error in (("a{b}", ValueError), ("", ValueError), (5, TypeError)):
        app.conf.dlock_beat_lock_name = bad
        with pytest.raises(error, match="dlock_beat_lock_name"):
            beat_lock_name(app)


def test_loop_interval_is_capped_to_a_third_of_the_lease_without_touching_redis(
    app: Celery, tmp_path: Path
) -> None:
    # dlock_redis_url points at a closed port: constructing (lazy or not) must not connect.
    app.conf.update(dlock_beat_lease=30, beat_max_loop_interval=300)
    lazy = LockedScheduler(app=app, schedule_filename=str(tmp_path / "s"), lazy=True)
    assert lazy.max_interval == 10
    app.conf.beat_max_loop_interval = 2
    real = LockedScheduler(app=app, schedule_filename=str(tmp_path / "s"))
    try:
        assert real.max_interval == 2
        assert not real.is_leader
        assert "leader lease -> dlock:{beat:ticks} (30s" in real.info
    finally:
        real.close()


def test_malformed_lock_store_url_fails_at_construction(app: Celery, tmp_path: Path) -> None:
    app.conf.dlock_redis_url = "http://127.0.0.1:6379"
    with pytest.raises(ValueError, match="dlock_redis_url"):
        LockedScheduler(app=app, schedule_filename=str(tmp_path / "s"), lazy=True)
