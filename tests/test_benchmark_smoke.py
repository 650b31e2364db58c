"""Smoke test of the benchmark suite (benchmarks/): tiny sizes, no peers installed.

Runs the core pieces of ``python benchmarks/run.py --quick`` - P1, P2, P3 and P6 -
for celery-dlock and the raw SET NX floor only (nothing beyond this repo's dev
dependencies), against a private redis-server, and checks that results are
produced and that mutual exclusion held. It never asserts anything about speed.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from celery_dlock.embedded import find_redis_server

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
LIBS = {"floor", "celery-dlock", "floor-async", "celery-dlock-async"}


@pytest.fixture(scope="module")
def bench() -> Any:
    if find_redis_server() is None:
        pytest.skip("no redis-server binary")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("dlbench.main")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_quick_benchmark_runs_and_keeps_mutual_exclusion(bench: Any, tmp_path: Path) -> None:
    config = dataclasses.replace(
        bench.QUICK,
        p1_reps=1,
        p1_seconds=0.1,
        p2_procs=(3,),
        p2_seconds=0.4,
        p3_counts=(1, 5),
        p3_seconds={1: 0.5, 5: 0.5},
        p3_warmup=0.2,
        p6_configs=((2, 2),),
    )
    results = bench.run_suite(
        config, tmp_path, phases={"P1", "P2", "P3", "P6"}, only=LIBS, chart=False, log=lambda *_: None
    )

    assert json.loads((tmp_path / "results.json").read_text())["P1"]
    assert "| celery-dlock |" in (tmp_path / "results.md").read_text()
    assert results["skipped"] == {}

    assert set(results["P1"]) == {"floor", "celery-dlock"}
    for entry in results["P1"].values():
        assert entry["pairs_per_s"] > 0
        assert entry["round_trips_per_acquire"] >= 1

    contention = {**results["P2"], **results["P6"]["P2"]}
    assert set(contention) == {"floor", "celery-dlock", "floor-async", "celery-dlock-async"}
    for lib, shapes in contention.items():
        for shape, entry in shapes.items():
            assert entry["overlaps"] == 0, (lib, shape, entry["reps"][0]["overlap_examples"])
            assert entry["failures"] == 0, (lib, shape)
            assert sum(r["acquisitions"] for r in entry["reps"]) > 0, (lib, shape)

    runs = results["P3"]["celery-dlock"]["runs"]
    assert set(runs) == {"1", "5"}
    assert all(run["locks_lost"] == 0 for run in runs.values())
