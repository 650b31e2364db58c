"""P2 (and the P2 half of P6): several processes (and coroutines) contending for one lock.

Every holder loops ``acquire -> hold ~1 ms -> release`` with no pause in between, from
a common start until a common stop time, recording CLOCK_MONOTONIC timestamps around
each call (see :mod:`dlbench.stats` for what is derived from them). Each library uses
its own blocking acquire. Processes are forked; every child builds its own client.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time
import traceback
from typing import Any

from . import server
from .locks import ALL_LIBRARIES, Params
from .stats import Record, analyse

HOLD = 0.001


def _wait_start(go: Any, shared: Any) -> tuple[float, float]:
    go.wait()
    start_at, stop_at = shared[0], shared[1]
    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    return start_at, stop_at


def _sync_child(lib_key: str, url: str, name: str, hold: float, ready: Any, go: Any,
                shared: Any, out: Any, max_seconds: float) -> None:
    try:
        lib = ALL_LIBRARIES[lib_key]
        client = server.sync_client(url)
        client.ping()
        lock = lib.make(client, name, Params(ttl=10.0, blocking_timeout=max_seconds))
        holder = str(os.getpid())
        records: list[Record] = []
        failures = 0
        ready.put(holder)
        _start, stop_at = _wait_start(go, shared)
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            if not lock.acquire():
                failures += 1
                continue
            t1 = time.monotonic()
            time.sleep(hold)
            t2 = time.monotonic()
            lock.release()
            t3 = time.monotonic()
            records.append((holder, t0, t1, t2, t3))
        out.put({"holders": [holder], "records": records, "failures": failures})
    except BaseException:
        out.put({"error": traceback.format_exc()})


def _async_child(lib_key: str, url: str, name: str, hold: float, coros: int, ready: Any, go: Any,
                 shared: Any, out: Any, max_seconds: float) -> None:
    async def main() -> dict[str, Any]:
        lib = ALL_LIBRARIES[lib_key]
        client = server.async_client(url)
        await client.ping()
        params = Params(ttl=10.0, blocking_timeout=max_seconds)
        records: list[Record] = []
        failures = 0
        holders = [f"{os.getpid()}:{i}" for i in range(coros)]

        async def loop(holder: str, stop_at: float) -> None:
            nonlocal failures
            lock = lib.make(client, name, params)
            while time.monotonic() < stop_at:
                t0 = time.monotonic()
                if not await lock.acquire():
                    failures += 1
                    continue
                t1 = time.monotonic()
                await asyncio.sleep(hold)
                t2 = time.monotonic()
                await lock.release()
                t3 = time.monotonic()
                records.append((holder, t0, t1, t2, t3))

        ready.put(os.getpid())
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        start_at, stop_at = shared[0], shared[1]
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        await asyncio.gather(*(loop(h, stop_at) for h in holders))
        await client.aclose()
        return {"holders": holders, "records": records, "failures": failures}

    try:
        out.put(asyncio.run(main()))
    except BaseException:
        out.put({"error": traceback.format_exc()})


def run_once(url: str, lib_key: str, name: str, procs: int, seconds: float,
             coros: int = 0, hold: float = HOLD) -> dict[str, Any]:
    """One contention run; ``coros`` > 0 runs that many coroutines per process (asyncio)."""
    ctx = mp.get_context("fork")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    shared = ctx.Array("d", 2)
    max_seconds = seconds + 60
    children = []
    for _ in range(procs):
        if coros:
            args: tuple[Any, ...] = (lib_key, url, name, hold, coros, ready, go, shared, out, max_seconds)
            target: Any = _async_child
        else:
            args = (lib_key, url, name, hold, ready, go, shared, out, max_seconds)
            target = _sync_child
        proc = ctx.Process(target=target, args=args, daemon=True)
        proc.start()
        children.append(proc)
    admin = server.sync_client(url)
    results: list[dict[str, Any]] = []
    try:
        for _ in range(procs):
            ready.get(timeout=30)
        before = server.commandstats(admin)
        start_at = time.monotonic() + 0.05
        stop_at = start_at + seconds
        shared[0], shared[1] = start_at, stop_at
        go.set()
        for _ in range(procs):
            results.append(out.get(timeout=max_seconds + 30))
        after = server.commandstats(admin)
    finally:
        for proc in children:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        admin.close()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{lib_key}: a contention child failed:\n{errors[0]}")
    records = [rec for r in results for rec in r["records"]]
    holders = [h for r in results for h in r["holders"]]
    analysis = analyse(records, start_at, stop_at, holders)
    commands = sum(server.command_delta(before, after).values())
    analysis["commands_per_acquire"] = commands / len(records) if records else None
    analysis["failures"] = sum(r["failures"] for r in results)
    return analysis
