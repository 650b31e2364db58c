"""Fenced writes: storage that refuses writes from holders whose lock was taken over.

A lease cannot stop a holder that was paused (GC, SIGSTOP, swap) past its lease
from writing late. Fencing can: every acquisition gets a larger ``lock.fence``;
the storage remembers the highest fence that wrote and refuses lower ones.

``fenced_set`` does this for a value kept in Redis (a hash with fields
``value`` and ``fence``), atomically in one script. For other stores, apply the
same rule there (e.g. ``UPDATE ... WHERE fence <= :fence``).
"""

from __future__ import annotations

from typing import Any

from celery_dlock.lock import run_script
from celery_dlock.scripts import FENCED_SET


def check_fence(fence: object) -> int:
    if isinstance(fence, bool) or not isinstance(fence, int):
        raise TypeError(f"fence must be an int (a lock's fence), got {type(fence).__name__}: {fence!r}")
    if fence < 0:
        raise ValueError(f"fence must be >= 0, got {fence!r}")
    return fence


def check_key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise (TypeError if not isinstance(key, str) else ValueError)(
            f"key must be a non-empty str, got {type(key).__name__}: {key!r}"
        )
    return key


def fenced_set(redis: Any, key: str, value: str | bytes | int | float, fence: int | None) -> bool:
    """Write ``value`` to ``key`` unless a write with a larger fence already happened.

    Returns True if written, False if refused (the caller's lock was taken over:
    someone with a newer fence wrote since). Equal fences may write again.
    """
    check_key(key)
    if fence is None:
        raise ValueError("fence is None: fenced_set needs the fence of a held lock (lock.fence)")
    check_fence(fence)
    written, _highest = run_script(redis, FENCED_SET, [key], [fence, value])
    return bool(written)


def fenced_get(redis: Any, key: str) -> tuple[bytes | str | None, int | None]:
    """The value at ``key`` and the fence that wrote it (``(None, None)`` if never written)."""
    check_key(key)
    value, fence = redis.hmget(key, ["value", "fence"])
    return value, (int(fence) if fence is not None else None)


__all__ = ["fenced_get", "fenced_set"]
