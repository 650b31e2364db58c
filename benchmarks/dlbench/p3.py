"""P3: hold 1, 100 and 1,000 auto-renewed locks with a 3 s lease.

Each (library, count) runs in its own forked process so its thread count is its own:
the child acquires the locks, then holds them for the measured window while the
parent snapshots ``INFO commandstats`` around it (only renewals run in that window),
then the child checks every lock (still ours in Redis and not flagged lost) and
releases them. Round trips are counted client-side (requests written on a socket).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import server
from .locks import availability

LEASE = 3.0


@dataclass(frozen=True)
class RenewingLibrary:
    key: str
    label: str
    modules: tuple[str, ...]
    package: str | None
    renewal_interval: float  # what the library does with a 3 s lease
    make: Callable[[Any, str], Any]
    still_ours: Callable[[Any], bool]


def _dlock_make(client: Any, name: str) -> Any:
    from celery_dlock import DistributedLock

    return DistributedLock(client, name, timeout=LEASE, auto_renewal=True)


def _dlock_ours(lock: Any) -> bool:
    return not lock.lost and lock.is_locked_by_me()


def _prl_make(client: Any, name: str) -> Any:
    import redis_lock

    return redis_lock.Lock(client, name, expire=int(LEASE), auto_renewal=True)


def _prl_ours(lock: Any) -> bool:
    owner = lock.get_owner_id()
    if isinstance(owner, bytes):
        owner = owner.decode()
    ident = lock.id.decode() if isinstance(lock.id, bytes) else lock.id
    return bool(owner == ident)


RENEWING_LIBRARIES = (
    RenewingLibrary("celery-dlock", "celery-dlock", ("celery_dlock",), None, LEASE / 3,
                    _dlock_make, _dlock_ours),
    RenewingLibrary("python-redis-lock", "python-redis-lock", ("redis_lock",), "python-redis-lock",
                    LEASE * 2 / 3, _prl_make, _prl_ours),
)

NO_RENEWAL = {
    "redis-py": "no auto-renewal (only manual extend()/reacquire())",
    "pottery": "no auto-renewal (only manual extend(), at most num_extensions times)",
    "floor": "no auto-renewal by design",
}


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


class _Problems(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.examples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(f"{record.name}: {record.getMessage()[:200]}")


def _child(lib: RenewingLibrary, url: str, prefix: str, count: int, ready: Any, go: Any,
           held: Any, out: Any) -> None:
    try:
        problems = _Problems()
        logging.getLogger().addHandler(problems)
        thread_errors: list[str] = []
        threading.excepthook = lambda args: thread_errors.append(repr(args.exc_value)[:200])
        base_threads = os_threads()
        client = server.sync_client(url, counting=True)
        client.ping()
        locks = [lib.make(client, f"{prefix}{i}") for i in range(count)]
        started = time.monotonic()
        for lock in locks:
            if not lock.acquire(blocking=False):
                raise RuntimeError("an uncontended P3 lock could not be acquired")
        acquire_seconds = time.monotonic() - started
        ready.put(os_threads() - base_threads)
        seconds = go.get()
        rt0 = server.RoundTrips.value()
        peak = os_threads()
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(0.5, left))
            peak = max(peak, os_threads())
        rt1 = server.RoundTrips.value()
        held.put("held")
        lost = sum(not lib.still_ours(lock) for lock in locks)
        for lock in locks:
            try:
                lock.release()
            except Exception as exc:
                thread_errors.append(f"release: {exc!r}"[:200])
        out.put({
            "threads_created": peak - base_threads,
            "acquire_seconds": acquire_seconds,
            "round_trips_per_s": (rt1 - rt0) / seconds,
            "locks_lost": lost,
            "warnings_logged": problems.count,
            "warning_examples": problems.examples,
            "thread_errors": len(thread_errors),
            "thread_error_examples": thread_errors[:3],
        })
    except BaseException:
        out.put({"error": traceback.format_exc()})


def run_once(url: str, lib: RenewingLibrary, count: int, seconds: float, prefix: str) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    ready, go, held, out = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_child, args=(lib, url, prefix, count, ready, go, held, out), daemon=True)
    proc.start()
    admin = server.sync_client(url)
    try:
        try:
            ready.get(timeout=120)
        except Exception:
            result = out.get(timeout=5)
            raise RuntimeError(result.get("error", "P3 child did not start")) from None
        before = server.commandstats(admin)
        go.put(seconds)
        held.get(timeout=seconds + 60)
        after = server.commandstats(admin)
        result: dict[str, Any] = out.get(timeout=300)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
        admin.close()
    if "error" in result:
        raise RuntimeError(f"P3 {lib.key} x{count} failed:\n{result['error']}")
    delta = server.command_delta(before, after)
    result["commands_per_s"] = sum(delta.values()) / seconds
    result["commands_by_name_per_s"] = {k: v / seconds for k, v in sorted(delta.items())}
    result["seconds"] = seconds
    result["renewal_interval_s"] = lib.renewal_interval
    result["round_trips_per_interval"] = result["round_trips_per_s"] * lib.renewal_interval
    return result


def run(url: str, counts: list[int], seconds: dict[int, float], prefix: str,
        only: set[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for lib in RENEWING_LIBRARIES:
        if only is not None and lib.key not in only:
            continue
        missing = availability(lib.modules, lib.package)
        if missing:
            out[lib.key] = {"label": lib.label, "skipped": missing}
            continue
        runs = {}
        for count in counts:
            runs[str(count)] = run_once(url, lib, count, seconds[count], f"{prefix}p3:{lib.key}:{count}:")
        out[lib.key] = {"label": lib.label, "runs": runs}
    for key, why in NO_RENEWAL.items():
        if only is None or key in only:
            out[key] = {"label": key, "skipped": why}
    return out
