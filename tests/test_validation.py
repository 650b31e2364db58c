"""Bad arguments: a clear error naming the parameter and the value, and nothing locked."""

from __future__ import annotations

import math
from typing import Any

import pytest
import redis

from celery_dlock import DistributedLock

BAD_OPTIONS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"lock_name": ""}, ValueError, "lock_name.*''"),
    ({"lock_name": 42}, TypeError, "lock_name.*42"),
    ({"lock_name": None}, TypeError, "lock_name.*None"),
    ({"lock_name": "x" * 5000}, ValueError, "lock_name.*at most 1024"),
    ({"lock_name": "a{b}c"}, ValueError, "lock_name.*hash tag.*'a{b}c'"),
    ({"timeout": 0}, ValueError, "timeout.*0"),
    ({"timeout": -5}, ValueError, "timeout.*-5"),
    ({"timeout": math.nan}, ValueError, "timeout.*nan"),
    ({"timeout": math.inf}, ValueError, "timeout.*inf"),
    ({"timeout": "30"}, TypeError, "timeout.*'30'"),
    ({"timeout": True}, TypeError, "timeout.*True"),
    ({"timeout": 0.0001}, ValueError, "timeout.*0.0001"),
    ({"retry_times": -1}, ValueError, "retry_times.*-1"),
    ({"retry_times": 1.5}, TypeError, "retry_times.*1.5"),
    ({"retry_delay": -0.1}, ValueError, "retry_delay.*-0.1"),
    ({"auto_renewal": "yes"}, TypeError, "auto_renewal.*'yes'"),
    ({"timeout": 10, "renewal_interval": 10}, ValueError, "renewal_interval.*90 % of timeout.*got 10"),
    ({"timeout": 10, "renewal_interval": 9.5}, ValueError, "renewal_interval.*90 % of timeout.*got 9.5"),
    ({"timeout": 10, "renewal_interval": 0}, ValueError, "renewal_interval.*0"),
    ({"blocking_timeout": -1}, ValueError, "blocking_timeout.*-1"),
    ({"blocking_timeout": math.nan}, ValueError, "blocking_timeout.*nan"),
    ({"on_lost": "callback"}, TypeError, "on_lost.*'callback'"),
    ({"prefix": "a{"}, ValueError, "prefix.*'a{'"),
    ({"prefix": 3}, TypeError, "prefix.*3"),
    ({"timeout": 10, "max_lease": 5}, ValueError, "max_lease.*5"),
]


def test_a_renewal_interval_of_90_percent_of_the_timeout_is_accepted(r: redis.Redis, name: str) -> None:
    assert DistributedLock(r, name, timeout=10, renewal_interval=9).options.renewal_interval == 9


@pytest.mark.parametrize("options,error,message", BAD_OPTIONS)
def test_bad_lock_options(
    r: redis.Redis, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    options = dict(options)
    lock_name = options.pop("lock_name", "valid-name")
    keys_before = set(r.keys("dlock:*"))
    with pytest.raises(error, match=message):
        DistributedLock(r, lock_name, **options)
    assert set(r.keys("dlock:*")) - keys_before == set()  # nothing was locked (others' keys may expire)


def test_bad_client() -> None:
    with pytest.raises(TypeError, match="redis must be"):
        DistributedLock("redis://localhost", "x")  # type: ignore[arg-type]


def test_async_client_in_sync_lock() -> None:
    import redis.asyncio

    with pytest.raises(TypeError, match="celery_dlock.asyncio.DistributedLock"):
        DistributedLock(redis.asyncio.Redis(), "x")


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda lock: lock.acquire(blocking="no"), TypeError, "blocking.*'no'"),
        (lambda lock: lock.extend(-1), ValueError, "additional_time.*-1"),
        (lambda lock: lock.extend(math.nan), ValueError, "additional_time.*nan"),
        (lambda lock: lock.extend(1, replace="yes"), TypeError, "replace.*'yes'"),
    ],
)
def test_bad_method_arguments(
    r: redis.Redis, name: str, call: Any, error: type[Exception], message: str
) -> None:
    lock = DistributedLock(r, name)
    with pytest.raises(error, match=message):
        call(lock)
    assert not lock.is_locked_by_anyone()


@pytest.mark.parametrize("options,error,message", BAD_OPTIONS)
def test_bad_asyncio_lock_options(
    r: redis.Redis, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    import redis.asyncio

    from celery_dlock.asyncio import DistributedLock as AsyncLock

    options = dict(options)
    lock_name = options.pop("lock_name", "valid-name")
    keys_before = set(r.keys("dlock:*"))
    with pytest.raises(error, match=message):
        AsyncLock(redis.asyncio.Redis(), lock_name, **options)
    assert set(r.keys("dlock:*")) - keys_before == set()  # nothing written (others' keys may expire)


@pytest.mark.parametrize(
    "url,error,message",
    [
        ("http://localhost:6379", ValueError, "url.*'http://localhost:6379'"),
        ("localhost:6379", ValueError, "url.*'localhost:6379'"),
        (6379, TypeError, "url.*6379"),
    ],
)
def test_bad_urls(url: Any, error: type[Exception], message: str) -> None:
    from celery_dlock import get_redis
    from celery_dlock.asyncio import get_redis as get_async_redis

    with pytest.raises(error, match=message):
        get_redis(url)
    with pytest.raises(error, match=message):
        get_async_redis(url)


def test_bad_env_port(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery_dlock import get_redis

    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("REDIS_PORT", "sixtythree")
    with pytest.raises(ValueError, match="REDIS_PORT.*'sixtythree'"):
        get_redis()


def test_unreachable_host_names_it() -> None:
    from celery_dlock import LockBackendUnavailable

    client = redis.Redis(host="no-such-host.invalid", port=6390, socket_connect_timeout=0.5)
    with pytest.raises(LockBackendUnavailable, match="no-such-host.invalid:6390"):
        DistributedLock(client, "x").acquire()


@pytest.mark.parametrize(
    "template,error,message",
    [
        ("order:{customer}", ValueError, "'customer'"),
        ("order:{0}", ValueError, "must name arguments"),
        ("order:{", ValueError, "malformed"),
        ("order:{}", ValueError, "must name arguments"),
    ],
)
def test_bad_name_templates(template: str, error: type[Exception], message: str) -> None:
    from celery_dlock import distributed_lock_decorator

    with pytest.raises(error, match=message):

        @distributed_lock_decorator(template)
        def process(order_id: int) -> None: ...


def test_template_value_with_braces_is_refused_and_nothing_locked(r: redis.Redis) -> None:
    from celery_dlock import distributed_lock_decorator

    @distributed_lock_decorator("order:{order_id}", redis=r)
    def process(order_id: str) -> None: ...

    keys_before = set(r.keys("dlock:*"))
    with pytest.raises(ValueError, match="hash tag.*'order:a}b'"):
        process("a}b")
    assert set(r.keys("dlock:*")) - keys_before == set()  # nothing written (others' keys may expire)


def test_decorator_name_of_wrong_type() -> None:
    from celery_dlock import distributed_lock_decorator

    with pytest.raises(TypeError, match="name must be a str.*42"):
        distributed_lock_decorator(42)


def test_remembered_checks_never_accept_a_value_of_another_type(r: redis.Redis) -> None:
    """Checked settings are remembered by value *and* type: 1 passing never lets True through."""
    DistributedLock(r, "typed", timeout=1, auto_renewal=True)
    with pytest.raises(TypeError, match="timeout"):
        DistributedLock(r, "typed", timeout=True, auto_renewal=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="auto_renewal"):
        DistributedLock(r, "typed", timeout=1, auto_renewal=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"timeout.*\[1\]"):
        DistributedLock(r, "typed", timeout=[1])  # type: ignore[arg-type]


def test_options_and_keys_built_per_lock_equal_what_their_constructors_make() -> None:
    """LockOptions.build and LockKeys.for_name fill the frozen dataclasses directly (speed):
    every field must be set, to the value the constructor would get."""
    import dataclasses

    from celery_dlock.keys import LockKeys
    from celery_dlock.options import LockOptions

    def on_lost(lock: object) -> None:
        pass

    built = LockOptions.build("n", timeout=3, auto_renewal=True, on_lost=on_lost, note_ttl=5, max_lease=9)
    fields = {f.name: getattr(built, f.name) for f in dataclasses.fields(LockOptions)}
    assert set(vars(built)) == set(fields)
    assert built == LockOptions(**fields)
    assert (built.name, built.timeout_ms, built.on_lost, built.note_ttl) == ("n", 3000, on_lost, 5.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.timeout = 1  # type: ignore[misc]

    keys = LockKeys.for_name("job", "p:")
    expected = LockKeys(
        lock="p:{job}",
        fence="p:{job}:fence",
        waiters="p:{job}:waiters",
        note="p:{job}:note",
        released="p:{job}:released",
        acquire_keys=("p:{job}", "p:{job}:fence", "p:{job}:waiters"),
        release_keys=("p:{job}", "p:{job}:waiters", "p:{job}:fence", "p:{job}:released"),
    )
    assert keys == expected and set(vars(keys)) == {f.name for f in dataclasses.fields(LockKeys)}
