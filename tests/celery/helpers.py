"""Assertions and waits shared by the worker tests."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def send_concurrently(task: Any, count: int, *args: Any) -> list[Any]:
    """``task.delay(*args)`` ``count`` times at once, from ``count`` threads; the AsyncResults."""
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: task.delay(*args), range(count)))


def outcomes(results: Iterable[Any], timeout: float = 60.0) -> list[Any]:
    """Each AsyncResult's value, or the exception its get() raised (within one shared deadline)."""
    deadline = time.monotonic() + timeout
    collected: list[Any] = []
    for result in results:
        try:
            collected.append(result.get(timeout=max(0.1, deadline - time.monotonic()), propagate=True))
        except Exception as exc:
            collected.append(exc)
    return collected


def assert_no_overlap(records: list[dict[str, Any]]) -> None:
    """No two recorded runs overlap in time, and fences grow in the order the runs happened."""
    ordered = sorted(records, key=lambda r: r["start"])
    for before, after in itertools.pairwise(ordered):
        assert before["end"] <= after["start"], f"runs overlap: {before} and {after}"
        if before.get("fence") is not None and after.get("fence") is not None:
            assert before["fence"] < after["fence"], f"fence went backwards: {before} then {after}"


def overlaps(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def wait_until(condition: Callable[[], T], timeout: float, interval: float = 0.02, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)
