"""A lock retry keeps the message intact: custom headers, priority, expires, link and
link_error survive the re-queue."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.celery.apps.common import close_gate, open_gate, record_list, records
from tests.celery.conftest import load_app, start_worker
from tests.celery.helpers import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def retrykeeps(celery_env: dict[str, str]) -> Iterator[ModuleType]:
    module = load_app("retrykeeps")
    worker = start_worker(module, concurrency=2)
    try:
        yield module
    finally:
        worker.stop()


def runs(tag: str) -> list[dict[str, object]]:
    return [json.loads(x) for x in records().lrange(record_list(tag), 0, -1)]


def test_a_lock_retry_keeps_headers_priority_expiry_and_links(retrykeeps: ModuleType, tag: str) -> None:
    close_gate(tag)
    holder = retrykeeps.keeps.delay(tag, "holder")
    wait_until(lambda: runs(tag), 20, what="the holder started")
    contender = retrykeeps.keeps.apply_async(
        (tag, "contender"),
        headers={"x_trace": "trace-42"},
        priority=7,
        expires=300,
        link=retrykeeps.after.s(tag),
        link_error=retrykeeps.after.s(tag),
    )
    time.sleep(1.0)  # the holder holds the lock: the contender is re-queued by lock retries
    open_gate(tag)
    assert holder.get(timeout=20) == "holder"
    assert contender.get(timeout=30) == "contender"
    [ran] = [r for r in runs(tag) if r["role"] == "contender"]
    assert ran["id"] == contender.id
    assert ran["trace"] == "trace-42", ran
    assert ran["priority"] == 7, ran
    assert ran["expires"] is not None, ran
    assert ran["callbacks"] == 1 and ran["errbacks"] == 1, ran
    wait_until(lambda: records().lrange(f"{record_list(tag)}:after", 0, -1), 20, what="the link")
    assert [json.loads(x) for x in records().lrange(f"{record_list(tag)}:after", 0, -1)] == ["contender"]
