"""P3: hold 1, 100 and 1,000 auto-renewed locks with a 3 s lease.

Each (library, count) runs in its own forked process so its thread count is its own:
the child acquires the locks, holds them for one lease (warm-up: the first renewals of
locks acquired at different moments, a first ``SCRIPT LOAD``), then for the measured
window while the parent snapshots ``INFO commandstats`` around it (only renewals run
then), then checks every lock (still ours in Redis and not flagged lost) and releases
them. Round trips are counted client-side (requests written on a socket), both for the
measured window (steady state) and for the whole hold including the warm-up.
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
WARMUP = LEASE


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
    """Threads of this process, without the harness' own multiprocessing queue feeders."""
    feeders = sum(t.name == "QueueFeederThread" for t in threading.enumerate())
    return len(os.listdir("/proc/self/task")) - feeders


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
           warm: Any, held: Any, out: Any) -> None:
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
        warmup, seconds = go.get()
        rt_start = server.RoundTrips.value()
        peak = os_threads()

        def hold(duration: float) -> None:
            nonlocal peak
            end = time.monotonic() + duration
            while (left := end - time.monotonic()) > 0:
                time.sleep(min(0.5, left))
                peak = max(peak, os_threads())

        hold(warmup)
        warm.put("warm")
        rt0 = server.RoundTrips.value()
        hold(seconds)
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
            "round_trips_whole_hold": rt1 - rt_start,
            "locks_lost": lost,
            "warnings_logged": problems.count,
            "warning_examples": problems.examples,
            "thread_errors": len(thread_errors),
            "thread_error_examples": thread_errors[:3],
        })
    except BaseException:
        out.put({"error": traceback.format_exc()})


def run_once(url: str, lib: RenewingLibrary, count: int, seconds: float, prefix: str,
             warmup: float = WARMUP) -> dict[str, Any]:
    """Hold ``count`` locks for ``warmup + seconds``; renewal cost is measured over the last ``seconds``."""
    ctx = mp.get_context("fork")
    ready, go, warm, held, out = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    args = (lib, url, prefix, count, ready, go, warm, held, out)
    proc = ctx.Process(target=_child, args=args, daemon=True)
    proc.start()
    admin = server.sync_client(url)
    try:
        try:
            ready.get(timeout=120)
        except Exception:
            result = out.get(timeout=5)
            raise RuntimeError(result.get("error", "P3 child did not start")) from None
        go.put((warmup, seconds))
        warm.get(timeout=warmup + 60)
        before = server.commandstats(admin)
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
    result["warmup_seconds"] = warmup
    whole = warmup + seconds
    result["round_trips_per_interval_whole_hold"] = (
        result["round_trips_whole_hold"] / whole * lib.renewal_interval
    )
    result["renewal_interval_s"] = lib.renewal_interval
    result["round_trips_per_interval"] = result["round_trips_per_s"] * lib.renewal_interval
    return result


def run(url: str, counts: list[int], seconds: dict[int, float], prefix: str,
        only: set[str] | None = None, warmup: float = WARMUP) -> dict[str, Any]:
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
            runs[str(count)] = run_once(url, lib, count, seconds[count], f"{prefix}p3:{lib.key}:{count}:",
                                        warmup)
        out[lib.key] = {"label": lib.label, "runs": runs}
    for key, why in NO_RENEWAL.items():
        if only is None or key in only:
            out[key] = {"label": key, "skipped": why}
    return out
