"""Publish-time dedup never swallows legitimate work: a task re-publishing itself from its
run, and a message due later than now, are published even while the holder runs."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.celery.apps.common import close_gate, open_gate, read_started, record_list, records
from tests.celery.conftest import load_app, start_worker
from tests.celery.helpers import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def republish(celery_env: dict[str, str]) -> Iterator[ModuleType]:
    module = load_app("republish")
    worker = start_worker(module, concurrency=2)
    try:
        yield module
    finally:
        worker.stop()


@pytest.mark.parametrize("countdown", [0.0, 0.2], ids=["at-once", "countdown"])
def test_a_task_that_republishes_itself_keeps_going(
    republish: ModuleType, tag: str, countdown: float
) -> None:
    republish.poll.delay(tag, 3, countdown)

    def runs() -> list[bytes]:
        return records().lrange(record_list(tag), 0, -1)

    wait_until(lambda: len(runs()) >= 4, 30, what="4 runs of the polling loop")
    assert len(set(runs())) == 4  # four different messages, each ran once


def test_a_message_due_later_is_published_while_the_holder_runs(republish: ModuleType, tag: str) -> None:
    close_gate(tag)
    holder = republish.held.delay(tag)
    wait_until(lambda: read_started(tag), 20, what="the holder started")
    now_duplicate = republish.held.delay(tag)
    later = republish.held.apply_async((tag,), countdown=1)
    assert now_duplicate.id == holder.id  # a duplicate of the running call: its result
    assert later.id != holder.id  # due after it: published
    open_gate(tag)
    assert holder.get(timeout=20)
    assert later.get(timeout=20)["task_id"] == later.id
