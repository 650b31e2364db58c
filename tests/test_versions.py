"""What this run is made of. In a matrix cell (noxfile.py sets ``DLOCK_EXPECT``), the
installed versions and the Redis server must be the ones the cell promises, so a cell
cannot pass while testing something else; every run checks that the lock's scripts take
the path this redis-py supports (see celery_dlock/channel.py)."""

from __future__ import annotations

import logging
import os
import platform
from importlib.metadata import version

import pytest
import redis

from celery_dlock import DistributedLock
from celery_dlock.channel import script_channel


def expected() -> dict[str, str]:
    text = os.environ.get("DLOCK_EXPECT", "")
    return dict(item.split("=", 1) for item in text.split())


def test_the_cell_runs_the_versions_it_promises(server_url: str) -> None:
    promised = expected()
    if not promised:
        pytest.skip("not a matrix cell (DLOCK_EXPECT unset; see noxfile.py)")
    client = redis.Redis.from_url(server_url)
    try:
        server = str(client.info("server")["redis_version"])
    finally:
        client.close()
    running = {
        "python": ".".join(platform.python_version_tuple()[:2]),
        "celery": version("celery"),
        "kombu": version("kombu"),
        "redis": version("redis"),
        "server": ".".join(server.split(".")[:2]),
    }
    print(f"\ncell: {running}")
    assert running == promised


def fast_path_expected() -> bool:
    """Every supported redis-py (5.0.8 on) passes the channel's self-check with its own
    classes; before 5.3 its pool wants a command name, which the channel gives."""
    return True


def test_the_scripts_take_the_path_this_redis_py_supports_and_the_lock_works_on_it(
    server_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="celery_dlock")
    client = redis.Redis.from_url(server_url)
    try:
        uses_channel = script_channel(client) is not None
        assert uses_channel == fast_path_expected(), (redis.__version__, caplog.text)
        lock = DistributedLock(client, "versions-path-check", timeout=5)
        assert lock.acquire(blocking=False)
        assert lock.fence is not None and lock.release()
    finally:
        client.close()
