"""P1 (and the P1 half of P6): uncontended acquire+release pairs on one client.

Per library: pairs per second (median over repetitions; the libraries take turns
inside each repetition so drifting machine load hits all of them alike), Redis
commands per pair (``INFO commandstats`` deltas), and client round trips per
acquire and per release (requests written on the socket, counted on a separate
short run with a counting connection class so the timed runs use stock clients).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from . import server
from .locks import Library, Params
from .stats import median

PARAMS = Params(ttl=10.0, blocking_timeout=5.0)


def _timed_sync(lock: Any, seconds: float) -> tuple[int, float]:
    pairs = 0
    start = time.perf_counter()
    end = start + seconds
    now = start
    while now < end:
        if not lock.acquire():
            raise RuntimeError("uncontended acquire failed")
        lock.release()
        pairs += 1
        now = time.perf_counter()
    return pairs, now - start


async def _timed_async(lock: Any, seconds: float) -> tuple[int, float]:
    pairs = 0
    start = time.perf_counter()
    end = start + seconds
    now = start
    while now < end:
        if not await lock.acquire():
            raise RuntimeError("uncontended acquire failed")
        await lock.release()
        pairs += 1
        now = time.perf_counter()
    return pairs, now - start


Measurement = tuple[int, float, int, float, float]


def _measure_once(lib: Library, url: str, name: str, seconds: float, warmup: int) -> Measurement:
    """(pairs, elapsed, server commands, client CPU seconds, server CPU seconds) for one timed run."""
    admin = server.sync_client(url)
    try:
        if lib.is_async:

            async def go() -> Measurement:
                client = server.async_client(url)
                try:
                    lock = lib.make(client, name, PARAMS)
                    for _ in range(warmup):
                        await lock.acquire()
                        await lock.release()
                    before, scpu = server.commandstats(admin), server.server_cpu(admin)
                    cpu = time.process_time()
                    pairs, elapsed = await _timed_async(lock, seconds)
                    cpu = time.process_time() - cpu
                    scpu = server.server_cpu(admin) - scpu
                    after = server.commandstats(admin)
                    return pairs, elapsed, sum(server.command_delta(before, after).values()), cpu, scpu
                finally:
                    await client.aclose()

            return asyncio.run(go())
        client = server.sync_client(url)
        try:
            lock = lib.make(client, name, PARAMS)
            for _ in range(warmup):
                lock.acquire()
                lock.release()
            before, scpu = server.commandstats(admin), server.server_cpu(admin)
            cpu = time.process_time()
            pairs, elapsed = _timed_sync(lock, seconds)
            cpu = time.process_time() - cpu
            scpu = server.server_cpu(admin) - scpu
            after = server.commandstats(admin)
            return pairs, elapsed, sum(server.command_delta(before, after).values()), cpu, scpu
        finally:
            client.close()
    finally:
        admin.close()


def _census(lib: Library, url: str, name: str, pairs: int) -> dict[str, float]:
    """Mean round trips per acquire and per release, and the server commands behind them."""
    admin = server.sync_client(url)

    async def go_async() -> tuple[int, int, dict[str, int]]:
        client = server.async_client(url, counting=True)
        try:
            lock = lib.make(client, name, PARAMS)
            for _ in range(5):
                await lock.acquire()
                await lock.release()
            acq = rel = 0
            before = server.commandstats(admin)
            for _ in range(pairs):
                t = server.RoundTrips.value()
                await lock.acquire()
                u = server.RoundTrips.value()
                await lock.release()
                acq += u - t
                rel += server.RoundTrips.value() - u
            return acq, rel, server.command_delta(before, server.commandstats(admin))
        finally:
            await client.aclose()

    try:
        if lib.is_async:
            acq, rel, delta = asyncio.run(go_async())
        else:
            client = server.sync_client(url, counting=True)
            try:
                lock = lib.make(client, name, PARAMS)
                for _ in range(5):
                    lock.acquire()
                    lock.release()
                acq = rel = 0
                before = server.commandstats(admin)
                for _ in range(pairs):
                    t = server.RoundTrips.value()
                    lock.acquire()
                    u = server.RoundTrips.value()
                    lock.release()
                    acq += u - t
                    rel += server.RoundTrips.value() - u
                delta = server.command_delta(before, server.commandstats(admin))
            finally:
                client.close()
    finally:
        admin.close()
    return {
        "round_trips_per_acquire": acq / pairs,
        "round_trips_per_release": rel / pairs,
        "commands_by_name_per_pair": {k: v / pairs for k, v in sorted(delta.items())},
    }


def run(
    url: str, libraries: list[Library], prefix: str, reps: int, seconds: float, census_pairs: int = 200
) -> dict[str, Any]:
    rates: dict[str, list[float]] = {lib.key: [] for lib in libraries}
    commands: dict[str, list[float]] = {lib.key: [] for lib in libraries}
    cpu_us: dict[str, list[float]] = {lib.key: [] for lib in libraries}
    server_us: dict[str, list[float]] = {lib.key: [] for lib in libraries}
    for rep in range(reps):
        order = libraries[rep % len(libraries):] + libraries[: rep % len(libraries)]
        for lib in order:
            name = f"{prefix}p1:{lib.key}"
            pairs, elapsed, cmds, cpu, scpu = _measure_once(
                lib, url, name, seconds, warmup=50 if rep == 0 else 10
            )
            rates[lib.key].append(pairs / elapsed)
            commands[lib.key].append(cmds / pairs)
            cpu_us[lib.key].append(cpu / pairs * 1e6)
            server_us[lib.key].append(scpu / pairs * 1e6)
    out: dict[str, Any] = {}
    for lib in libraries:
        census = _census(lib, url, f"{prefix}p1c:{lib.key}", census_pairs)
        out[lib.key] = {
            "label": lib.label,
            "pairs_per_s": median(rates[lib.key]),
            "pairs_per_s_reps": rates[lib.key],
            "commands_per_pair": median(commands[lib.key]),
            # Client-side CPU per pair (this process): steadier than pairs/s on a shared machine.
            "client_cpu_us_per_pair": median(cpu_us[lib.key]),
            "server_cpu_us_per_pair": median(server_us[lib.key]),
            "wall_us_per_pair": 1e6 / (median(rates[lib.key]) or 1.0),
            **census,
        }
    return out


def per_rep_ratio(a: list[float], b: list[float]) -> float | None:
    """Median over repetitions of a[i] / b[i]: both ran back to back in repetition i, so
    a drift of machine load between repetitions cancels out."""
    return median([x / y for x, y in zip(a, b, strict=False) if y])


def add_ratios(results: dict[str, Any], floor_key: str, other_key: str | None = None) -> None:
    floor = results.get(floor_key, {}).get("pairs_per_s_reps")
    for entry in results.values():
        entry["ratio_to_floor"] = per_rep_ratio(entry["pairs_per_s_reps"], floor) if floor else None
    other = results.get(other_key or "", {}).get("pairs_per_s_reps")
    if other:
        for entry in results.values():
            entry[f"ratio_to_{other_key}"] = per_rep_ratio(entry["pairs_per_s_reps"], other)
