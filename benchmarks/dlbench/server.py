"""The private redis-server of a benchmark run, server-side command counts, client-side round trips.

Every run starts its own ``redis-server`` on a free port (never the shared 6379) and never
sends FLUSHALL/FLUSHDB anywhere: lock names carry a per-run prefix instead.
"""

from __future__ import annotations

import itertools
import os
import platform
import subprocess
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.connection
import redis.connection

from celery_dlock.embedded import RedisServer

# Commands the harness itself sends while measuring; never charged to a library.
HARNESS_COMMANDS = frozenset({"info", "ping", "config|resetstat", "client|setinfo", "hello", "select"})


def start_server() -> RedisServer:
    # maxclients: python-redis-lock opens a connection per renewal thread.
    return RedisServer(extra_args=["--maxclients", "20000"]).start()


def commandstats(client: redis.Redis) -> dict[str, int]:
    """``INFO commandstats`` as {command: calls}."""
    raw = client.info("commandstats")
    out: dict[str, int] = {}
    for key, value in raw.items():
        name = key.removeprefix("cmdstat_")
        out[name] = int(value["calls"]) if isinstance(value, dict) else 0
    return out


def server_cpu(client: redis.Redis) -> float:
    """CPU seconds the redis-server process has used (``INFO cpu``, user + system)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def command_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Calls per command between two snapshots, without the harness' own commands."""
    delta = {}
    for name, calls in after.items():
        if name in HARNESS_COMMANDS:
            continue
        diff = calls - before.get(name, 0)
        if diff:
            delta[name] = diff
    return delta


class RoundTrips:
    """A process-wide count of requests written to Redis (a pipeline is one write, one round trip)."""

    _counter = itertools.count()

    @classmethod
    def bump(cls) -> None:
        next(cls._counter)

    @classmethod
    def value(cls) -> int:
        # itertools.count has no peek; copy its state through repr ("count(N)").
        return int(repr(cls._counter)[6:-1])


def _is_handshake(command: Any) -> bool:
    """Connection set-up (HELLO, CLIENT SETINFO, SELECT...) is not a lock's round trip."""
    head = command if isinstance(command, (bytes, str)) else (command[0] if command else b"")
    head = head.encode() if isinstance(head, str) else bytes(head[:64])
    return any(word in head.upper() for word in (b"SETINFO", b"HELLO", b"\r\nSELECT\r\n", b"AUTH"))


class CountingConnection(redis.connection.Connection):
    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not _is_handshake(command):
            RoundTrips.bump()
        super().send_packed_command(command, check_health)


class AsyncCountingConnection(redis.asyncio.connection.Connection):
    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not _is_handshake(command):
            RoundTrips.bump()
        await super().send_packed_command(command, check_health)


def sync_client(url: str, counting: bool = False, **kwargs: Any) -> redis.Redis:
    if counting:
        pool = redis.ConnectionPool.from_url(url, connection_class=CountingConnection, **kwargs)
        return redis.Redis(connection_pool=pool)
    return redis.Redis.from_url(url, **kwargs)


def async_client(url: str, counting: bool = False) -> redis.asyncio.Redis:
    if counting:
        pool = redis.asyncio.ConnectionPool.from_url(url, connection_class=AsyncCountingConnection)
        return redis.asyncio.Redis(connection_pool=pool)
    return redis.asyncio.Redis.from_url(url)


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except Exception as exc:
        return f"unknown ({exc})"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(server: RedisServer) -> dict[str, Any]:
    client = redis.Redis.from_url(server.url)
    try:
        redis_version = client.info("server")["redis_version"]
    finally:
        client.close()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "redis_server": redis_version,
        "redis_server_binary": server.binary,
        "redis_py": redis.__version__,
        "kernel": platform.release(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_accounting() -> tuple[float, float]:
    """(CPU seconds used by the whole machine, CPU seconds used by this process and its reaped children).

    The difference over a run is what other processes (other people's test runs) took
    from the same cores while we measured.
    """
    import resource

    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    machine = (user + nice + system + irq + softirq + steal) / tick
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        own += usage.ru_utime + usage.ru_stime
    return machine, own
