"""Every lock under test behind one tiny interface: ``acquire() -> bool`` and ``release()``.

Each adapter uses its library the way that library's documentation shows (its own
blocking acquire, its own defaults such as redis-py's 0.1 s polling), only through the
installed package. The "floor" is the simplest correct lock there is: ``SET key token NX
PX`` plus a compare-and-delete script via EVALSHA; no correct lock can do much better
uncontended. Under contention the floor polls every 1 ms (more commands than anyone).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FLOOR_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
FLOOR_POLL = 0.001


@dataclass(frozen=True)
class Params:
    ttl: float = 10.0  # lease / expiry in seconds
    blocking_timeout: float = 60.0


class FloorLock:
    def __init__(self, client: Any, name: str, p: Params) -> None:
        self.client = client
        self.key = name
        self.ttl_ms = int(p.ttl * 1000)
        self.blocking_timeout = p.blocking_timeout
        self.sha = client.script_load(FLOOR_RELEASE)
        self.token: str | None = None

    def acquire(self) -> bool:
        token = os.urandom(16).hex()
        deadline = time.monotonic() + self.blocking_timeout
        while not self.client.set(self.key, token, nx=True, px=self.ttl_ms):
            if time.monotonic() >= deadline:
                return False
            time.sleep(FLOOR_POLL)
        self.token = token
        return True

    def release(self) -> None:
        self.client.evalsha(self.sha, 1, self.key, self.token)
        self.token = None


class AsyncFloorLock:
    def __init__(self, client: Any, name: str, p: Params) -> None:
        self.client = client
        self.key = name
        self.ttl_ms = int(p.ttl * 1000)
        self.blocking_timeout = p.blocking_timeout
        self.sha: str | None = None
        self.token: str | None = None

    async def acquire(self) -> bool:
        if self.sha is None:
            self.sha = await self.client.script_load(FLOOR_RELEASE)
        token = os.urandom(16).hex()
        deadline = time.monotonic() + self.blocking_timeout
        while not await self.client.set(self.key, token, nx=True, px=self.ttl_ms):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(FLOOR_POLL)
        self.token = token
        return True

    async def release(self) -> None:
        await self.client.evalsha(self.sha, 1, self.key, self.token)
        self.token = None


class _Wrapped:
    """Adapts a library lock object whose acquire/release need arguments."""

    def __init__(self, acquire: Callable[[], Any], release: Callable[[], Any]) -> None:
        self.acquire = acquire
        self.release = release


def _celery_dlock(client: Any, name: str, p: Params) -> Any:
    from celery_dlock import DistributedLock

    return DistributedLock(client, name, timeout=p.ttl, blocking_timeout=p.blocking_timeout)


def _redis_py(client: Any, name: str, p: Params) -> Any:
    # Redis.lock(): blocking acquire polls every sleep=0.1 s (its default).
    return client.lock(name, timeout=p.ttl, blocking_timeout=p.blocking_timeout)


def _python_redis_lock(client: Any, name: str, p: Params) -> Any:
    import redis_lock

    lock = redis_lock.Lock(client, name, expire=int(p.ttl))
    # Its blocking acquire waits on BLPOP of a signal list (timeout = expire); a
    # blocking timeout may not exceed expire in this library, so none is passed.
    return _Wrapped(lambda: lock.acquire(blocking=True), lock.release)


def _pottery(client: Any, name: str, p: Params) -> Any:
    from pottery import Redlock

    lock = Redlock(key=name, masters={client}, auto_release_time=p.ttl)
    return _Wrapped(lambda: lock.acquire(blocking=True, timeout=p.blocking_timeout), lock.release)


def _async_celery_dlock(client: Any, name: str, p: Params) -> Any:
    from celery_dlock.asyncio import DistributedLock

    return DistributedLock(client, name, timeout=p.ttl, blocking_timeout=p.blocking_timeout)


def _async_redis_py(client: Any, name: str, p: Params) -> Any:
    return client.lock(name, timeout=p.ttl, blocking_timeout=p.blocking_timeout)


@dataclass(frozen=True)
class Library:
    key: str
    label: str
    modules: tuple[str, ...]  # imports that must work
    package: str | None  # the pip distribution (None: part of celery-dlock's own deps)
    make: Callable[[Any, str, Params], Any]
    is_async: bool = False
    note: str = ""


SYNC_LIBRARIES: tuple[Library, ...] = (
    Library("floor", "floor (SET NX + EVALSHA)", ("redis",), None, FloorLock,
            note="raw SET NX PX + compare-and-delete; 1 ms polling when blocked"),
    Library("celery-dlock", "celery-dlock", ("celery_dlock",), None, _celery_dlock,
            note="DistributedLock(blocking_timeout=...), pub/sub wake-up"),
    Library("redis-py", "redis-py Lock", ("redis",), "redis", _redis_py,
            note="Redis.lock(), default sleep=0.1 s polling"),
    Library("python-redis-lock", "python-redis-lock", ("redis_lock",), "python-redis-lock",
            _python_redis_lock, note="redis_lock.Lock, BLPOP signal-list wake-up"),
    Library("pottery", "pottery Redlock", ("pottery",), "pottery", _pottery,
            note="Redlock with one master; randomised retry sleep"),
)

ASYNC_LIBRARIES: tuple[Library, ...] = (
    Library("floor-async", "floor asyncio (SET NX + EVALSHA)", ("redis.asyncio",), None, AsyncFloorLock,
            is_async=True, note="1 ms polling when blocked"),
    Library("celery-dlock-async", "celery-dlock asyncio", ("celery_dlock.asyncio",), None,
            _async_celery_dlock, is_async=True, note="per-loop pub/sub notifier"),
    Library("redis-py-async", "redis-py asyncio Lock", ("redis.asyncio",), "redis", _async_redis_py,
            is_async=True, note="default sleep=0.1 s polling"),
)

ALL_LIBRARIES = {lib.key: lib for lib in SYNC_LIBRARIES + ASYNC_LIBRARIES}

# Filled by run.py when it builds the benchmark venv: {package: "ok" | error text}.
INSTALL_STATUS = Path(__file__).resolve().parent.parent / ".venv" / "install-status.json"


def install_failures() -> dict[str, str]:
    try:
        status = json.loads(INSTALL_STATUS.read_text())
    except (OSError, ValueError):
        return {}
    return {pkg: msg for pkg, msg in status.items() if msg != "ok"}


def availability(modules: tuple[str, ...], package: str | None = None) -> str | None:
    """None when usable here, else why not (install failure or import error)."""
    failed = install_failures()
    if package and package in failed:
        return f"{package} could not be installed: {failed[package]}"
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            return f"cannot import {module}: {exc!r}"
    return None
