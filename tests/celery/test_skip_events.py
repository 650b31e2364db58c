"""A skipped run is visible and consistent everywhere: exactly one terminal Celery event,
agreeing with its stored state (checked with a real event receiver), for both
``lock_skip_state`` values; ``link_error`` runs for a skip stored as failure."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from celery.exceptions import TaskRevokedError

from celery_dlock.celery import TaskSkipped
from tests.celery.apps.common import close_gate, open_gate, read_started, records
from tests.celery.conftest import load_app, start_worker
from tests.celery.helpers import wait_until

TERMINAL = {"task-succeeded", "task-failed", "task-revoked", "task-rejected", "task-retried"}

pytestmark = pytest.mark.slow


class EventLog:
    """Every task event the worker sends, read by Celery's own event receiver in a thread."""

    def __init__(self, app: Any) -> None:
        self.events: list[dict[str, Any]] = []
        self._connection = app.connection_for_read()
        self._receiver = app.events.Receiver(self._connection, handlers={"*": self.events.append})
        self._thread = threading.Thread(target=self._receiver.capture, kwargs={"wakeup": False}, daemon=True)

    def start(self) -> EventLog:
        self._thread.start()
        time.sleep(1.0)  # its queue is bound before anything is sent
        return self

    def stop(self) -> None:
        self._receiver.should_stop = True
        self._thread.join(10)
        self._connection.release()

    def terminal(self, task_id: str) -> list[str]:
        return [e["type"] for e in self.events if e.get("uuid") == task_id and e["type"] in TERMINAL]


@pytest.fixture(scope="module")
def skipevents(celery_env: dict[str, str]) -> Iterator[ModuleType]:
    module = load_app("skipevents")
    worker = start_worker(module, concurrency=2, extra_args=["-E"])
    try:
        yield module
    finally:
        worker.stop()


@pytest.mark.parametrize("state", ["failure", "revoked"])
def test_a_skip_sends_one_terminal_event_agreeing_with_its_stored_state(
    skipevents: ModuleType, tag: str, state: str
) -> None:
    task = skipevents.as_failure if state == "failure" else skipevents.as_revoked
    log = EventLog(skipevents.app).start()
    try:
        close_gate(tag)
        holder = task.delay(tag)
        wait_until(lambda: read_started(tag), 20, what="the holder started")
        skipped = task.apply_async((tag,), link_error=skipevents.on_error.s(tag))
        wait_until(lambda: skipped.ready(), 20, what="the skip")
        open_gate(tag)
        assert holder.get(timeout=20)
        wait_until(lambda: log.terminal(holder.id) and log.terminal(skipped.id), 20, what="terminal events")
        time.sleep(0.5)  # nothing more arrives
    finally:
        log.stop()
    assert log.terminal(holder.id) == ["task-succeeded"]
    if state == "failure":
        assert skipped.state == "FAILURE"
        assert log.terminal(skipped.id) == ["task-failed"]
        with pytest.raises(TaskSkipped):
            skipped.get(timeout=5)
        wait_until(lambda: records().lrange(f"errback:{tag}", 0, -1), 20, what="link_error")
        assert [x.decode() for x in records().lrange(f"errback:{tag}", 0, -1)] == [skipped.id]
    else:
        assert skipped.state == "REVOKED"
        assert log.terminal(skipped.id) == ["task-revoked"]
        with pytest.raises(TaskRevokedError):
            skipped.get(timeout=5)


def test_what_a_skipped_member_does_to_a_chain_a_group_and_a_chord(skipevents: ModuleType, tag: str) -> None:
    from celery import chain, chord, group
    from celery.exceptions import ChordError

    close_gate(tag)
    holder = skipevents.as_failure.delay(tag)
    wait_until(lambda: read_started(tag), 20, what="the holder started")
    # A chain stops at the skipped link: what follows never runs.
    stopped = chain(skipevents.as_failure.si(tag), skipevents.mark.si(tag, "after-skip")).apply_async()
    wait_until(lambda: stopped.parent.ready(), 20, what="the skipped link")
    assert stopped.parent.state == "FAILURE"
    # A group holds the skip as a failed member beside the others.
    members = group(skipevents.as_failure.si(tag), skipevents.mark.si(tag, "beside")).apply_async()
    values = members.get(timeout=20, propagate=False)
    assert isinstance(values[0], TaskSkipped) and values[1] == "beside"
    # A chord counts it as a failed header task: the body does not run, the chord fails.
    joined = chord([skipevents.as_failure.si(tag), skipevents.mark.si(tag, "header")])(
        skipevents.gather.s(tag)
    )
    with pytest.raises((ChordError, TaskSkipped)):
        joined.get(timeout=20)
    open_gate(tag)
    assert holder.get(timeout=20)
    time.sleep(0.5)
    ran = [x.decode() for x in records().lrange(f"ran:{tag}", 0, -1)]
    assert "after-skip" not in ran and "chord-body" not in ran
    assert sorted(ran) == ["beside", "header"]
