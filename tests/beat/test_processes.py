"""Real ``celery beat`` processes (subprocesses, stopped and killed by PID) and a real solo worker.

The worker runs ``tests.beat.record``, which appends (entry, scheduled tick, leader
fence) of every execution to a Redis list, so the tests count executions, not log lines.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_dlock.embedded import RedisServer
from tests.beat.harness import BeatCluster, duplicates, run_gaps, tick_seconds, tick_time

LEASE = 3.0
# The acceptance scenario: two beat processes for 60 s with a 1 s interval entry.
ACCEPTANCE_SECONDS = 60.0
BECAME_LEADER = "beat: became leader"
STANDING_BY = "beat: standing by"
LOST = "beat: lost leadership"


@pytest.fixture
def cluster(redis_url: str, tmp_path: Path) -> Iterator[BeatCluster]:
    cluster = BeatCluster(redis_url, tmp_path, lease=LEASE)
    yield cluster
    cluster.close()


def no_crash(*logs: str) -> None:
    for text in logs:
        assert "Traceback" not in text and "CRITICAL" not in text, text[-3000:]


@pytest.mark.slow
def test_two_beats_for_60s_publish_each_tick_once_and_hand_over_within_one_lease(
    cluster: BeatCluster,
) -> None:
    # Epoch-aligned ticks (dlock_beat_align_intervals): every second of the run is a tick
    # that must be published exactly once.
    worker = cluster.worker()
    a = cluster.beat("beat-a", align=True)
    a.wait_for(BECAME_LEADER, timeout=20)
    b = cluster.beat("beat-b", align=True)
    b.wait_for(STANDING_BY, timeout=20)
    start = time.time()
    third = ACCEPTANCE_SECONDS / 3

    # 1. SIGKILL the leader: no release, the standby must wait for the lease to run out.
    time.sleep(max(0.0, start + third - time.time()))
    killed_at = time.time()
    a.signal(signal.SIGKILL)
    b_leads_at = b.wait_for(BECAME_LEADER, timeout=LEASE + 5)
    crash_handover = b_leads_at - killed_at

    # 2. The killed beat comes back (same, stale schedule file) as a standby.
    a2 = cluster.beat("beat-a2", schedule_file="beat-a-schedule", align=True)
    a2.wait_for(STANDING_BY, timeout=20)

    # 3. Clean shutdown of the leader: it releases the lease, the standby is woken at once.
    time.sleep(max(0.0, start + 2 * third - time.time()))
    stopped_at = time.time()
    assert b.stop() == 0
    a2_leads_at = a2.wait_for(BECAME_LEADER, timeout=LEASE + 5)
    clean_handover = a2_leads_at - stopped_at

    time.sleep(max(0.0, start + ACCEPTANCE_SECONDS - time.time()))
    end = time.time()
    assert a2.alive()
    assert a2.stop() == 0
    cluster.drain()
    worker.stop()

    runs = [e for e in cluster.executions() if e["entry"] == "every-second"]
    ticks = sorted(tick_seconds(e["tick"]) for e in runs)
    expected = set(range(int(start) + 1, int(end)))
    missing = sorted(expected - set(ticks))
    crash_window = set(range(int(killed_at), int(b_leads_at) + 2))
    clean_window = set(range(int(stopped_at), int(a2_leads_at) + 2))
    print(
        f"\nbeat acceptance: {len(runs)} executions over {end - start:.1f} s, "
        f"{len(duplicates(runs))} duplicate ticks, missing {missing}; "
        f"handover after SIGKILL {crash_handover:.2f} s, after clean stop {clean_handover:.2f} s"
    )
    assert duplicates(runs) == {}, "a scheduled tick was published more than once"
    assert crash_handover <= LEASE + 0.5
    assert clean_handover <= 1.0
    # Gaps only inside the handover windows, and at most one lease long.
    assert set(missing) <= crash_window | clean_window, missing
    assert len(missing) <= LEASE + 1
    assert len(set(ticks) & expected) >= len(expected) - LEASE - 1
    # One publisher at a time: each leadership term's fence covers a contiguous run of ticks.
    fences = [e["fence"] for e in sorted(runs, key=lambda e: tick_seconds(e["tick"]))]
    assert fences == sorted(fences) and len(set(fences)) == 3, fences
    # The restarted beat's stale schedule named the last tick of the stopped leader the
    # same way, so that tick was skipped, not published twice.
    assert a2.count(LOST) == 0 and b.count(LOST) == 0
    no_crash(a2.text(), b.text())


SCHEDULERS = {
    "PersistentScheduler": "celery_dlock.beat:LockedScheduler",
    "django-celery-beat": "celery_dlock.beat:LockedDatabaseScheduler",
    "RedBeat": "celery_dlock.beat:LockedRedBeatScheduler",
}


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", list(SCHEDULERS), ids=list(SCHEDULERS))
def test_each_scheduler_keeps_celerys_interval_timing_and_runs_each_interval_once_across_a_leader_kill(
    cluster: BeatCluster, scheduler: str
) -> None:
    # Two beats on the same scheduler class, a 1 s interval entry on Celery's own timing;
    # the leader is SIGKILLed. The runs the leaders claimed are never less than the interval
    # apart (the last run is shared in Redis), keep the 1 s rhythm before and after, and
    # resume within one lease.
    if scheduler == "django-celery-beat":
        cluster.migrate_django()
    worker = cluster.worker()
    a = cluster.beat("beat-a", scheduler=SCHEDULERS[scheduler])
    a.wait_for(BECAME_LEADER, timeout=30)
    b = cluster.beat("beat-b", scheduler=SCHEDULERS[scheduler])
    b.wait_for(STANDING_BY, timeout=30)
    time.sleep(6)
    a.signal(signal.SIGKILL)
    b.wait_for(BECAME_LEADER, timeout=LEASE + 5)
    time.sleep(6)
    assert b.stop() == 0
    cluster.drain()
    worker.stop()

    runs = [e for e in cluster.executions() if e["entry"] == "every-second"]
    gaps = run_gaps(runs, "every-second")
    print(f"\n{scheduler}: {len(runs)} runs, gaps min {min(gaps):.3f} s, max {max(gaps):.3f} s")
    assert len(runs) >= 8
    assert min(gaps) >= 1.0 - 1e-6, "an entry ran twice within its interval"
    assert sorted(gaps)[-2] <= 1.6, "the rhythm broke outside the handover"  # all but the handover gap
    assert max(gaps) <= LEASE + 2.0
    fences = [e["fence"] for e in sorted(runs, key=lambda e: tick_time(e["tick"]))]
    assert fences == sorted(fences) and len(set(fences)) == 2, fences
    no_crash(b.text())


@pytest.mark.slow
def test_leader_whose_lease_is_deleted_or_taken_over_stops_publishing_without_crashing(
    cluster: BeatCluster,
) -> None:
    worker = cluster.worker()
    beat = cluster.beat("beat")
    beat.wait_for(BECAME_LEADER, timeout=20)
    client = cluster.client

    # The lease key vanishes (e.g. deleted by hand): the leader notices at its next claim or
    # renewal, steps down, and takes the free lease again with a new fence.
    time.sleep(1.5)
    client.delete(cluster.lock_key)
    beat.wait_for(LOST, timeout=LEASE)
    beat.wait_for(BECAME_LEADER, timeout=LEASE + 2, occurrences=2)

    # Another owner takes the lease over for 2 leases: nothing is published meanwhile.
    time.sleep(1.5)
    taken_at = time.time()
    client.set(cluster.lock_key, "intruder", px=int(2 * LEASE * 1000))
    beat.wait_for(LOST, timeout=LEASE, occurrences=2)
    back_at = beat.wait_for(BECAME_LEADER, timeout=3 * LEASE, occurrences=3)
    assert back_at - taken_at >= 2 * LEASE - 0.5
    time.sleep(2.5)
    assert beat.alive()
    assert beat.stop() == 0
    cluster.drain()
    worker.stop()

    runs = cluster.executions()
    assert duplicates(runs) == {}
    # The intruder holds the lease from taken_at for 2 leases (server-side), so no tick may
    # run from 1 s after the take-over (a tick on its way then) until that ends. The window
    # comes from the server's lease, not from when this test saw "became leader" in the log,
    # which a loaded machine can show late.
    during = [e for e in runs if taken_at + 1 < e["ran_at"] < taken_at + 2 * LEASE - 0.2]
    assert during == [], "a leader whose lease was taken over kept publishing"
    after = [e for e in runs if tick_seconds(e["tick"]) > back_at]
    assert len(after) >= 1, "publishing did not resume after the lease came back"
    assert len({e["fence"] for e in runs}) == 3
    no_crash(beat.text())


@pytest.mark.slow
def test_standby_started_while_leader_runs_does_not_hang_and_lease_outlives_long_loop_interval(
    cluster: BeatCluster,
) -> None:
    # Only an hourly entry and beat_max_loop_interval = 300 s (100x the 3 s lease): the leader
    # must still renew, because LockedScheduler caps beat's sleep to a third of the lease.
    leader = cluster.beat("leader", schedule="slow")
    leader.wait_for(BECAME_LEADER, timeout=20)
    client = cluster.client
    token = client.get(cluster.lock_key)
    assert token is not None
    deadline = time.monotonic() + 3 * LEASE
    while time.monotonic() < deadline:
        assert client.get(cluster.lock_key) == token, "the leader lease expired or changed hands"
        time.sleep(0.1)

    started = time.time()
    standby = cluster.beat("standby", schedule="slow")
    standby.wait_for("beat: Starting...", timeout=20)
    standby.wait_for(STANDING_BY, timeout=LEASE + 2)
    assert time.time() - started < 15
    time.sleep(LEASE)
    assert standby.alive() and client.get(cluster.lock_key) == token

    stop_at = time.monotonic()
    assert standby.stop() == 0
    assert time.monotonic() - stop_at < 3, "a standby did not exit promptly on SIGTERM"
    assert leader.stop() == 0
    assert client.exists(cluster.lock_key) == 0, "a clean shutdown must release the lease"
    assert standby.count(BECAME_LEADER) == 0
    no_crash(leader.text(), standby.text())


@pytest.mark.slow
def test_lock_store_down_stops_publishing_without_crashing_and_leadership_resumes(
    redis_url: str, own_redis: RedisServer, tmp_path: Path
) -> None:
    # Broker on the shared server, leader lease and tick claims on a server we can kill.
    cluster = BeatCluster(redis_url, tmp_path, lease=LEASE, lock_url=own_redis.url)
    try:
        worker = cluster.worker()
        beat = cluster.beat("beat")
        beat.wait_for(BECAME_LEADER, timeout=20)
        time.sleep(1.5)
        down_at = time.time()
        own_redis.kill()
        beat.wait_for(LOST, timeout=LEASE + 2)  # its lease ran out on its own clock
        beat.wait_for("cannot reach Redis", timeout=LEASE)
        time.sleep(LEASE)
        assert beat.alive()
        own_redis.start()  # same port, empty dataset
        up_at = time.time()
        beat.wait_for(BECAME_LEADER, timeout=LEASE + 3, occurrences=2)
        time.sleep(2.5)
        assert beat.stop() == 0
        cluster.drain()
        worker.stop()
        runs = cluster.executions()
        assert duplicates(runs) == {}
        assert [e for e in runs if down_at + 1 < tick_seconds(e["tick"]) < up_at - 1] == []
        assert [e for e in runs if tick_seconds(e["tick"]) > up_at]
        no_crash(beat.text())
    finally:
        cluster.close()
