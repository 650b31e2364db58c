"""Skip policy: a call requested while an identical call was queued or running is skipped.

The worker runs one task at a time (``-c 1``), so every queued duplicate is
consumed after the run it duplicates has ended and released its lock: "skip
while the lock is held" alone would run each of them again.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from celery_dlock.celery import TaskSkipped
from celery_dlock.celery.coalesce import REQUESTED_HEADER, RunNote, call_identity, stamp
from tests.celery.apps.common import read_records, read_started
from tests.celery.conftest import load_app, start_worker
from tests.celery.helpers import outcomes, send_concurrently, wait_until


@pytest.fixture(scope="module")
def coalesce(celery_env: dict[str, str]) -> Iterator[ModuleType]:
    module = load_app("coalesce")
    worker = start_worker(module, concurrency=1)
    try:
        yield module
    finally:
        worker.stop()


def test_ten_queued_duplicates_run_once(coalesce: ModuleType, tag: str) -> None:
    results = send_concurrently(coalesce.refresh, 10, tag, 0.3)
    values = outcomes(results, timeout=60)
    ran = read_records(tag)
    assert len(ran) == 1, ran
    skipped = [v for v in values if isinstance(v, TaskSkipped)]
    assert len(skipped) == 9, values
    assert {exc.holder for exc in skipped} == {ran[0]["task_id"]}
    # Consumed one after another by one process: the lock was free for most of them.
    assert any("covered by task" in str(exc) for exc in skipped), [str(exc) for exc in skipped]


def test_a_call_requested_while_the_run_ran_is_skipped_though_taken_after_it_ended(
    coalesce: ModuleType, tag: str
) -> None:
    first = coalesce.refresh.delay(tag, 0.5)
    wait_until(lambda: read_started(tag), 20, what="the first run to start")
    second = coalesce.refresh.delay(tag, 0.5)  # the same call, requested while the first runs
    values = outcomes([first, second], timeout=30)
    # One pool process: the second was taken only after the first had released its lock.
    assert [r["task_id"] for r in read_records(tag)] == [first.id]
    assert isinstance(values[1], TaskSkipped) and values[1].holder == first.id
    assert "covered by task" in str(values[1])


def test_a_call_requested_after_the_run_ended_runs_again(coalesce: ModuleType, tag: str) -> None:
    first = coalesce.refresh.delay(tag, 0.0)
    outcomes([first], timeout=30)
    second = coalesce.refresh.delay(tag, 0.0)
    outcomes([second], timeout=30)
    assert [r["task_id"] for r in read_records(tag)] == [first.id, second.id]


def test_a_failed_run_covers_nothing(coalesce: ModuleType, tag: str) -> None:
    results = send_concurrently(coalesce.fails_first_time, 3, tag, 0.2)
    values = outcomes(results, timeout=60)
    started = read_started(tag)
    assert len(started) == 2, started  # the failed run, then one that succeeds
    failed = [v for v in values if isinstance(v, RuntimeError) and not isinstance(v, TaskSkipped)]
    succeeded = [v for v in values if isinstance(v, dict)]
    skipped = [v for v in values if isinstance(v, TaskSkipped)]
    assert (len(failed), len(succeeded), len(skipped)) == (1, 1, 1), values
    assert skipped[0].holder == succeeded[0]["task_id"]


def test_a_call_due_later_is_not_covered_by_an_earlier_run(coalesce: ModuleType, tag: str) -> None:
    now = coalesce.refresh.delay(tag, 0.0)
    later = coalesce.refresh.apply_async((tag, 0.0), countdown=1.5)
    outcomes([now, later], timeout=30)
    assert [r["task_id"] for r in read_records(tag)] == [now.id, later.id]


def test_calls_that_only_share_a_lock_key_never_cover_each_other(coalesce: ModuleType, tag: str) -> None:
    # Two tasks on one key, queued together: the refund runs after the charge.
    charge = coalesce.charge.delay(tag, 7)
    refund = coalesce.refund.delay(tag, 7)
    # One task-wide key, three different users, queued together: all three run.
    notices = [coalesce.notify_user.delay(tag, user) for user in (1, 2, 3)]
    values = outcomes([charge, refund, *notices], timeout=60)
    assert all(isinstance(v, dict) for v in values), values
    ran = read_records(tag)
    assert sorted(r["op"] for r in ran if "op" in r) == ["charge", "refund"]
    assert sorted(r["user"] for r in ran if "user" in r) == [1, 2, 3]


def test_lock_skip_covered_false_runs_every_queued_duplicate(coalesce: ModuleType, tag: str) -> None:
    results = send_concurrently(coalesce.refresh_every_call, 4, tag, 0.1)
    values = outcomes(results, timeout=60)
    assert all(isinstance(v, dict) for v in values), values
    assert len(read_records(tag)) == 4


def test_the_stamp_honours_the_eta_and_notes_name_the_call() -> None:
    headers: dict[str, Any] = {}
    stamp(headers, now=1000.0)
    stamp(headers, now=2000.0)  # a stamp already set is kept
    assert headers[REQUESTED_HEADER] == 1000.0
    due_later = {"eta": "2030-01-01T00:00:00+00:00"}
    stamp(due_later, now=1000.0)
    assert due_later[REQUESTED_HEADER] == 1893456000.0
    note = RunNote(12.5, "c0ffee", "task|with|bars")
    assert RunNote.parse(note.text()) == note
    assert RunNote.parse(b"garbage") is None and RunNote.parse("nan|c|x") is None
    assert RunNote(10.0, "c", "a").covers("c", 9.5) and RunNote(10.0, "c", "a").covers("c", 10.0)
    assert not RunNote(10.0, "c", "a").covers("c", 10.5)
    assert not RunNote(10.0, "c", "a").covers("other call", 9.5)
    same = call_identity("t", (1, [2, 3]), {"x": "y"})
    assert same == call_identity("t", [1, (2, 3)], {"x": "y"}) is not None
    assert call_identity("t", (1,), {}) != call_identity("u", (1,), {})
    assert call_identity("t", (object(),), {}) is None  # no stable form: never covered
