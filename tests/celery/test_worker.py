"""LockedTask in a real prefork worker on a Redis broker: policies, keys, renewal, retry, dedup."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from types import ModuleType
from typing import Any

import pytest
from celery.exceptions import TimeoutError as CeleryTimeout

from celery_dlock import LockNotAcquired
from celery_dlock.celery import TaskSkipped
from celery_dlock.keys import LockKeys
from tests.celery.apps.common import close_gate, open_gate, read_records, read_started, records
from tests.celery.conftest import load_app, start_worker
from tests.celery.helpers import assert_no_overlap, outcomes, overlaps, send_concurrently, wait_until


@pytest.fixture(scope="module")
def basic(celery_env: dict[str, str]) -> Iterator[ModuleType]:
    module = load_app("basic")
    worker = start_worker(module, concurrency=2)
    module.worker = worker
    try:
        yield module
    finally:
        worker.stop()


def events(module: ModuleType, key: str) -> dict[str, int]:
    raw = records().hgetall(module.events_key(key))
    return {k.decode(): int(v) for k, v in raw.items()}


@pytest.mark.slow
def test_skip_20_concurrent_sends_of_a_slow_call_run_exactly_once(basic: ModuleType, tag: str) -> None:
    close_gate(tag)  # the first run holds its lock until all 20 were handled
    results = send_concurrently(basic.skip_task, 20, tag, 0.1)
    wait_until(lambda: sum(r.ready() for r in results) == 19, 60, interval=0.05, what="19 skips")
    open_gate(tag)
    values = outcomes(results, timeout=60)

    ran = read_records(tag)
    assert len(ran) == 1, ran
    holder = ran[0]["task_id"]
    successes = [v for v in values if isinstance(v, dict)]
    skipped = [v for v in values if isinstance(v, TaskSkipped)]
    assert len(successes) == 1 and successes[0]["task_id"] == holder
    assert len(skipped) == 19, values
    # The skip is visible: FAILURE with TaskSkipped naming the holder, never a silent SUCCESS.
    assert {exc.holder for exc in skipped} == {holder}
    assert all(exc.key == ran[0]["key"] for exc in skipped)
    assert sorted(r.state for r in results) == ["FAILURE"] * 19 + ["SUCCESS"]
    # The worker sent our signals: 19 skips, one acquisition, one release.
    counts = wait_until(lambda: (e := events(basic, ran[0]["key"])).get("released") and e, 10)
    assert counts == {"contended:skip": 19, "acquired": 1, "released": 1}
    assert not records().exists(LockKeys.for_name(ran[0]["key"], basic.app.conf.dlock_prefix).lock)


@pytest.mark.slow
def test_retry_20_concurrent_sends_all_run_never_overlapping(basic: ModuleType, tag: str) -> None:
    results = send_concurrently(basic.retry_task, 20, tag, 0.2)
    values = outcomes(results, timeout=120)
    assert all(isinstance(v, dict) for v in values), [v for v in values if not isinstance(v, dict)]
    ran = read_records(tag)
    assert len(ran) == 20
    assert {r["task_id"] for r in ran} == {r.id for r in results}
    assert_no_overlap(ran)
    counts = events(basic, ran[0]["key"])
    assert counts["acquired"] == 20 and counts.get("contended:retry", 0) >= 1


@pytest.mark.slow
def test_wait_20_concurrent_sends_all_run_never_overlapping(basic: ModuleType, tag: str) -> None:
    results = send_concurrently(basic.wait_task, 20, tag, 0.2)
    values = outcomes(results, timeout=120)
    assert all(isinstance(v, dict) for v in values), [v for v in values if not isinstance(v, dict)]
    ran = read_records(tag)
    assert len(ran) == 20
    assert_no_overlap(ran)
    assert events(basic, ran[0]["key"]).get("contended:wait", 0) >= 1


def test_fail_policy_fails_at_once_with_lock_not_acquired(basic: ModuleType, tag: str) -> None:
    close_gate(tag)
    first = basic.fail_task.delay(tag, 0.0)
    wait_until(lambda: read_started(tag), 10)
    second = basic.fail_task.delay(tag, 0.0)
    with pytest.raises(LockNotAcquired) as failure:
        second.get(timeout=20)  # while the holder still waits at its gate
    assert not first.ready()
    assert not isinstance(failure.value, TaskSkipped)
    assert second.state == "FAILURE"
    open_gate(tag)
    assert first.get(timeout=10)["task_id"] == first.id


def test_retry_gives_up_after_lock_max_retries(basic: ModuleType, tag: str) -> None:
    holder = basic.retry_few.delay(tag, 2.0)
    wait_until(lambda: records().llen(f"{basic.RUN}:started:{tag}"), 10)
    late = basic.retry_few.delay(tag, 2.0)  # 2 lock retries of 0.05 s and 0.1 s: gone in ~0.2 s
    with pytest.raises(LockNotAcquired, match="gave up after 2 lock retries") as failure:
        late.get(timeout=10)
    assert holder.id in str(failure.value)
    assert holder.get(timeout=10)["task_id"] == holder.id
    assert len(read_records(tag)) == 1


def test_wait_falls_back_to_retry_and_then_runs(basic: ModuleType, tag: str) -> None:
    holder = basic.wait_then_retry.delay(tag, 1.0)
    wait_until(lambda: records().llen(f"{basic.RUN}:started:{tag}"), 10)
    late = basic.wait_then_retry.delay(tag, 1.0)  # waits 0.2 s, then lock retries
    assert late.get(timeout=20)["task_id"] == late.id
    holder.get(timeout=10)
    ran = read_records(tag)
    assert len(ran) == 2
    assert_no_overlap(ran)
    key = basic.wait_then_retry.lock_name_for(tag, 1.0)
    counts = events(basic, key)
    assert counts.get("contended:wait", 0) >= 1 and counts.get("contended:retry", 0) >= 1


def test_different_arguments_run_concurrently_same_arguments_do_not(basic: ModuleType, tag: str) -> None:
    different = [basic.order_task.delay(tag, 1, 1.0), basic.order_task.delay(tag, 2, 1.0)]
    outcomes(different, timeout=30)
    one, two = read_records(tag)
    assert one["key"] != two["key"]
    assert overlaps(one, two), "different orders were serialized by one lock"

    same_tag = uuid.uuid4().hex
    same = [basic.order_task.delay(same_tag, 7, 0.6), basic.order_task.delay(same_tag, 7, 0.6)]
    assert all(isinstance(v, dict) for v in outcomes(same, timeout=30))
    ran = read_records(same_tag)
    assert len(ran) == 2 and ran[0]["key"] == ran[1]["key"] == f"order:{same_tag}:7"
    assert_no_overlap(ran)


UUID_VALUE = uuid.UUID("12345678-1234-5678-1234-567812345678")
AWARE = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))


@pytest.mark.parametrize(
    "value",
    [
        (1, 2, ("x", (3,))),
        UUID_VALUE,
        AWARE,
        dt.datetime(2024, 5, 1, 12, 30, 15, 123456),
        dt.date(2024, 5, 1),
        Decimal("12.50"),
        {"b": (1, 2), "a": {"n": Decimal("1.1")}},
        {1: "int key"},
        None,
    ],
    ids=["tuples", "uuid", "aware-dt", "naive-dt", "date", "decimal", "nested", "int-key", "none"],
)
def test_publisher_and_worker_compute_the_same_key(basic: ModuleType, tag: str, value: Any) -> None:
    task = basic.key_of_call
    expected = task.lock_name_for(tag, value)
    calls = [
        task.apply_async((tag, value)),
        task.apply_async((), {"tag": tag, "value": value}),  # keyword instead of positional
        task.apply_async((tag, value, ("a", 1))),  # the default, given explicitly
        task.apply_async((tag,), {"value": value, "note": "n"}),
    ]
    assert outcomes(calls, timeout=30) == [expected] * 4
    assert "{" not in expected and tag not in expected  # hashed: argument values never in key names


def test_listed_arguments_key_ignores_other_arguments(basic: ModuleType, tag: str) -> None:
    task = basic.key_of_listed
    calls = [task.delay(tag, (1, UUID_VALUE), ignored=1), task.delay(tag, [1, str(UUID_VALUE)], ignored=2)]
    assert outcomes(calls, timeout=30) == [task.lock_name_for(tag, (1, UUID_VALUE))] * 2


@pytest.mark.slow
def test_task_running_3x_its_lock_timeout_keeps_its_lock(basic: ModuleType, tag: str) -> None:
    # Queued for 1 s first: the lease starts when the run starts, not at publish.
    running = basic.long_task.apply_async((tag, 3.5), countdown=1.0)  # lock_timeout=1
    key = basic.long_task.lock_name_for(tag, 3.5)
    lock_key = LockKeys.for_name(key, basic.app.conf.dlock_prefix).lock
    wait_until(lambda: records().exists(lock_key), 10)
    time.sleep(1.6)  # past the first lease: only renewal keeps it
    duplicate = basic.long_task.delay(tag, 3.5)
    with pytest.raises(TaskSkipped) as skipped:
        duplicate.get(timeout=10)
    assert skipped.value.holder == running.id
    value = running.get(timeout=15)
    assert value["end"] - value["start"] >= 3.4
    assert min(value["ttls"]) > 0, "the lease ran out while the task ran"
    assert value["ttls"][0] > 500  # a fresh lease at the start of the run
    # The result is stored before the release (see runner), so allow a moment.
    wait_until(lambda: not records().exists(lock_key), 5)


@pytest.mark.slow
def test_self_retry_inside_a_locked_task_retries_and_runs(basic: ModuleType, tag: str) -> None:
    # Three calls contend, so lock retries happen; each also calls self.retry() once
    # with max_retries=1: if lock retries consumed max_retries, it would fail.
    results = [basic.self_retrying.delay(tag, 0.3) for _ in range(3)]
    values = outcomes(results, timeout=60)
    assert all(isinstance(v, dict) and v["retries"] == 1 for v in values), values
    ran = read_records(tag)
    assert sorted((r["task_id"], r["retries"]) for r in ran) == sorted(
        (r.id, n) for r in results for n in (0, 1)
    )
    assert_no_overlap(ran)


def test_dedup_on_publish_returns_the_existing_result(basic: ModuleType, tag: str) -> None:
    task = basic.dedup_task
    keys = LockKeys.for_name(task.lock_name_for(tag, 0.0), basic.app.conf.dlock_prefix)
    close_gate(tag)
    first = task.apply_async((tag, 0.0), countdown=0.5)
    queued_duplicate = task.delay(tag, 0.0)
    assert queued_duplicate.id == first.id  # queued: same AsyncResult, nothing enqueued
    wait_until(lambda: read_started(tag), 10)
    assert not records().exists(keys.extension("queued"))  # the marker was handed over to the run lock
    running_duplicate = task.apply_async(args=(tag,), kwargs={"seconds": 0.0})
    assert running_duplicate.id == first.id  # running: same AsyncResult
    open_gate(tag)
    assert first.get(timeout=15)["task_id"] == first.id
    assert len(read_records(tag)) == 1
    # Once done, the same call publishes again.
    wait_until(lambda: not records().exists(keys.lock), 5)
    again = task.delay(tag, 0.0)
    assert again.id != first.id and again.get(timeout=15)["task_id"] == again.id


def test_send_task_bypasses_dedup_but_the_run_lock_still_protects(basic: ModuleType, tag: str) -> None:
    task = basic.dedup_task
    close_gate(tag)
    first = task.delay(tag, 0.0)
    wait_until(lambda: read_started(tag), 10)
    sent = basic.app.send_task(task.name, (tag, 0.0))
    assert sent.id != first.id
    with pytest.raises(TaskSkipped) as skipped:
        sent.get(timeout=20)
    assert skipped.value.holder == first.id
    open_gate(tag)
    first.get(timeout=10)
    assert len(read_records(tag)) == 1


def test_dedup_and_self_retry_the_retry_is_not_dropped(basic: ModuleType, tag: str) -> None:
    task = basic.dedup_self_retrying
    result = task.delay(tag, 0.2)
    value = result.get(timeout=20)
    assert value["retries"] == 1 and value["task_id"] == result.id
    # While the retry was queued, publishing the same call returned the same id.
    assert [r["retries"] for r in read_records(tag)] == [0, 1]


def test_revoked_and_expired_messages_leave_no_marker_or_lock(basic: ModuleType, tag: str) -> None:
    task = basic.dedup_task
    keys = LockKeys.for_name(task.lock_name_for(tag, 0.1), basic.app.conf.dlock_prefix)
    marker = keys.extension("queued")

    revoked = task.apply_async((tag, 0.1), countdown=1.5)
    assert records().get(marker) == revoked.id.encode()
    revoked.revoke()
    wait_until(lambda: revoked.state == "REVOKED", 15)
    wait_until(lambda: not records().exists(marker), 5, what="marker of the revoked message")

    expired = task.apply_async((tag, 0.1), countdown=1.0, expires=0.5)
    assert expired.id != revoked.id
    wait_until(lambda: expired.state == "REVOKED", 15)
    wait_until(lambda: not records().exists(marker), 5, what="marker of the expired message")
    assert not records().exists(keys.lock)
    assert read_records(tag) == []
    fresh = task.delay(tag, 0.1)
    assert fresh.id not in (revoked.id, expired.id) and fresh.get(timeout=10)["task_id"] == fresh.id


def test_skipped_result_get_returns_promptly_and_leaves_the_holders_lock(basic: ModuleType, tag: str) -> None:
    close_gate(tag)
    holder = basic.skip_task.delay(tag, 0.0)
    wait_until(lambda: read_started(tag), 10)
    key = LockKeys.for_name(basic.skip_task.lock_name_for(tag, 0.0), basic.app.conf.dlock_prefix).lock
    token = records().get(key)
    duplicate = basic.skip_task.delay(tag, 0.0)
    try:
        duplicate.get(timeout=20)  # the holder waits at its gate: get() must not wait for it
    except TaskSkipped:
        pass
    except CeleryTimeout:
        pytest.fail("get() on a skipped duplicate hung")
    assert not holder.ready()
    assert records().get(key) == token  # the skipped duplicate did not touch the holder's lock
    open_gate(tag)
    holder.get(timeout=10)


@pytest.mark.parametrize("how", ["ignore", "reject"])
def test_lock_is_released_when_the_task_ends_with_ignore_or_reject(
    basic: ModuleType, tag: str, how: str
) -> None:
    key = LockKeys.for_name(basic.ends_with.lock_name_for(tag, how), basic.app.conf.dlock_prefix).lock
    result = basic.ends_with.delay(tag, how)
    wait_until(lambda: read_records(tag), 10)
    wait_until(lambda: not records().exists(key), 5, what="release after " + how)  # 30 s lease
    again = basic.ends_with.delay(tag, how)
    wait_until(lambda: len(read_records(tag)) == 2, 10, what="the next run")
    assert again.id != result.id


def test_canvas_members_are_protected_by_the_run_lock(basic: ModuleType, tag: str) -> None:
    from celery import group

    close_gate(tag)
    job = group(basic.skip_task.s(tag, 0.0) for _ in range(3)).apply_async()
    wait_until(lambda: sum(r.ready() for r in job.results) == 2, 30, what="2 skips")
    open_gate(tag)
    values = job.join(timeout=30, propagate=False)
    assert len(read_records(tag)) == 1
    assert sum(isinstance(v, TaskSkipped) for v in values) == 2
