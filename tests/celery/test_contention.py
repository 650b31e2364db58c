"""Issue #4: the contention check through Celery - 2 prefork workers x 4 pool processes."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.celery.apps.common import records, run_id
from tests.celery.conftest import load_app, start_worker
from tests.support.observations import record

pytestmark = pytest.mark.slow
SENDS = 200


@pytest.fixture(scope="module")
def contention(celery_env: dict[str, str]) -> Iterator[ModuleType]:
    module = load_app("contention")
    workers = [start_worker(module, concurrency=4), start_worker(module, concurrency=4)]
    try:
        yield module
    finally:
        for worker in workers:
            worker.stop()


def test_two_workers_of_four_processes_never_overlap(contention: ModuleType) -> None:
    name = uuid.uuid4().hex
    started = time.monotonic()
    results = [contention.increment.delay(name) for _ in range(SENDS)]
    for result in results:
        result.get(timeout=180)
    elapsed = time.monotonic() - started
    client = records()
    assert int(client.get(f"{run_id()}:counter:{name}") or 0) == SENDS  # exact, no lost update
    rows = [raw.decode().split() for raw in client.lrange(f"{run_id()}:intervals:{name}", 0, -1)]
    intervals = sorted((float(a), float(b), int(fence), int(pid)) for a, b, fence, pid in rows)
    assert len(intervals) == SENDS
    overlaps = sum(1 for x, y in itertools.pairwise(intervals) if x[1] > y[0])
    regressions = sum(1 for x, y in itertools.pairwise(intervals) if x[2] >= y[2])
    processes = len({i[3] for i in intervals})
    record(
        "Celery contention",
        f"2 prefork workers x 4 pool processes, {SENDS} sends of one task (non-atomic counter) "
        "on one lock, policy 'wait'",
        executions=len(intervals),
        counter_total=SENDS,
        overlapping_intervals=overlaps,
        fence_regressions=regressions,
        pool_processes_that_held_it=processes,
        executions_per_s=round(SENDS / elapsed),
    )
    assert overlaps == 0 and regressions == 0
    assert processes >= 4  # really spread over several pool processes
