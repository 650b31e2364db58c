"""Server settings that break leases: an evicting maxmemory-policy is reported once per
client, and a server that refuses CONFIG is not an error. Sentinel clients of different
masters never share a notifier."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis
import redis.asyncio
from redis.sentinel import Sentinel

from celery_dlock import DistributedLock
from celery_dlock.asyncio import DistributedLock as AsyncLock
from celery_dlock.connection import notifier_key
from celery_dlock.embedded import RedisServer

pytestmark = pytest.mark.slow  # each test starts a redis-server of its own


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return [m for m in messages if "maxmemory" in m]


def wait_for_warning(caplog: pytest.LogCaptureFixture) -> list[str]:
    deadline = time.monotonic() + 5
    while not warnings_of(caplog) and time.monotonic() < deadline:
        time.sleep(0.02)
    return warnings_of(caplog)


def test_an_evicting_policy_is_reported_once_per_client(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="celery_dlock")
    with RedisServer(extra_args=["--maxmemory-policy", "allkeys-lru"]) as server:
        client = redis.Redis.from_url(server.url)
        for _ in range(3):
            with DistributedLock(client, "evictable", timeout=5):
                pass
        [warning] = wait_for_warning(caplog)
        assert "allkeys-lru" in warning and "noeviction" in warning and str(server.port) in warning
        time.sleep(0.2)
        assert len(warnings_of(caplog)) == 1


def test_noeviction_is_not_reported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="celery_dlock")
    with RedisServer(extra_args=["--maxmemory-policy", "noeviction"]) as server:
        with DistributedLock(redis.Redis.from_url(server.url), "safe", timeout=5):
            pass
        time.sleep(0.3)
        assert warnings_of(caplog) == []


def test_a_server_that_refuses_config_still_gives_locks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="celery_dlock")
    refusing = ["--maxmemory-policy", "allkeys-lru", "--rename-command", "CONFIG", ""]
    with RedisServer(extra_args=refusing) as server:
        client = redis.Redis.from_url(server.url)
        with DistributedLock(client, "managed", timeout=5) as lock:
            assert lock.is_locked_by_me()

        def noted() -> bool:
            return any("not checked" in r.getMessage() for r in caplog.records)

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not noted():
            time.sleep(0.02)
        assert noted()
        assert warnings_of(caplog) == []


def test_an_asyncio_client_is_checked_too(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="celery_dlock")
    with RedisServer(extra_args=["--maxmemory-policy", "volatile-ttl"]) as server:

        async def main() -> None:
            client = redis.asyncio.Redis.from_url(server.url)
            async with AsyncLock(client, "evictable", timeout=5):
                pass
            await asyncio.sleep(0.3)
            await client.aclose()

        asyncio.run(main())
        [warning] = warnings_of(caplog)
        assert "volatile-ttl" in warning


def test_sentinel_clients_of_different_masters_never_share_a_notifier() -> None:
    sentinel = Sentinel([("127.0.0.1", 1)])  # nothing is contacted to make the clients
    first, second = sentinel.master_for("orders"), sentinel.master_for("billing")
    assert notifier_key(first) != notifier_key(second)
    assert notifier_key(first) == notifier_key(sentinel.master_for("orders"))
