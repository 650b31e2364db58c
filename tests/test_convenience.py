"""distributed_lock(), distributed_lock_decorator and get_redis()."""

from __future__ import annotations

import threading

import pytest
import redis

from celery_dlock import (
    DistributedLock,
    LockNotAcquired,
    distributed_lock,
    distributed_lock_decorator,
    get_redis,
)
from tests.support.protocols import protocols_and_paths

# Every client made from redis_url here speaks RESP2 in one run, RESP3 in the other.
redis_url = protocols_and_paths


def test_distributed_lock_context_manager(r: redis.Redis, name: str) -> None:
    with distributed_lock(name, redis=r, timeout=5) as lock:
        assert lock.is_locked_by_me()
        with pytest.raises(LockNotAcquired), distributed_lock(name, redis=r):
            pass
    assert not lock.is_locked_by_anyone()


def test_distributed_lock_uses_default_client_from_env(
    redis_url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    with distributed_lock(name) as lock:
        assert redis.Redis.from_url(redis_url).exists(lock.keys.lock)


def test_get_redis_from_host_port_env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("REDIS_HOST", "127.0.0.1")
    monkeypatch.setenv("REDIS_PORT", str(port))
    monkeypatch.setenv("REDIS_DB", "3")
    client = get_redis()
    assert client.ping()
    assert client.connection_pool.connection_kwargs["db"] == 3


def test_get_redis_rejects_bad_url() -> None:
    with pytest.raises(ValueError, match="url.*'http://nope'"):
        get_redis("http://nope")


def test_decorator_bare_called_and_named(
    r: redis.Redis, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    seen: list[bool] = []

    @distributed_lock_decorator
    def bare() -> str:
        seen.append(
            DistributedLock(
                r, f"{__name__}.test_decorator_bare_called_and_named.<locals>.bare"
            ).is_locked_by_anyone()
        )
        return "bare"

    @distributed_lock_decorator()
    def called() -> str:
        return "called"

    @distributed_lock_decorator("fixed-name", redis=r, timeout=60, auto_renewal=True)
    def named() -> bool:
        return DistributedLock(r, "fixed-name").is_locked_by_anyone()

    assert bare() == "bare" and seen == [True]
    assert called() == "called"
    assert named() is True
    assert bare.__name__ == "bare"


def test_decorator_template_over_arguments(r: redis.Redis) -> None:
    held: list[str] = []

    @distributed_lock_decorator("order:{order_id}:{kind}", redis=r)
    def process(order_id: int, kind: str = "full") -> None:
        for candidate in ("order:7:full", "order:7:partial"):
            if DistributedLock(r, candidate).is_locked_by_anyone():
                held.append(candidate)

    process(7)
    process(order_id=7, kind="partial")
    assert held == ["order:7:full", "order:7:partial"]


def test_decorator_serializes_same_arguments(r: redis.Redis) -> None:
    active = {"now": 0, "max": 0}
    guard = threading.Lock()

    @distributed_lock_decorator("job:{n}", redis=r, blocking_timeout=10)
    def job(n: int) -> None:
        with guard:
            active["now"] += 1
            active["max"] = max(active["max"], active["now"])
        threading.Event().wait(0.05)
        with guard:
            active["now"] -= 1

    threads = [threading.Thread(target=job, args=(1,)) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert active["max"] == 1


def test_decorator_template_with_unknown_argument_fails_at_decoration() -> None:
    with pytest.raises(ValueError, match="'customer'"):

        @distributed_lock_decorator("order:{customer}")
        def process(order_id: int) -> None: ...


def test_decorator_rejects_bad_options_at_decoration() -> None:
    with pytest.raises(ValueError, match="timeout"):
        distributed_lock_decorator("x", timeout=-1)
