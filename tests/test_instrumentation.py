"""A client whose execute_command is instrumented (a tracing library's wrapper, a subclass)
sees every lock command: the lock then sends its scripts through that execute_command,
never around it. Checked against the server's own count of script calls (INFO
commandstats), with spans recorded by OpenTelemetry's SDK into an in-memory exporter."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
import wrapt
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import celery_dlock.asyncio
from celery_dlock import DistributedLock
from celery_dlock.channel import script_channel
from celery_dlock.embedded import RedisServer

SCRIPT_COMMANDS = ("EVALSHA", "EVAL")


@pytest.fixture
def spans() -> Iterator[tuple[Any, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("redis-test-instrumentation"), exporter
    provider.shutdown()


def traced(tracer: Any) -> Any:
    """A wrapt wrapper that records one span per command, as redis instrumentations do."""

    @wrapt.decorator
    def wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with tracer.start_as_current_span(str(args[0]).upper()):
            return wrapped(*args, **kwargs)

    return wrapper


def traced_async(tracer: Any) -> Any:
    @wrapt.decorator
    async def wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with tracer.start_as_current_span(str(args[0]).upper()):
            return await wrapped(*args, **kwargs)

    return wrapper


def script_calls(url: str) -> int:
    """How many EVAL/EVALSHA calls the server ran (all clients)."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(int(stats.get(f"cmdstat_{name.lower()}", {}).get("calls", 0)) for name in SCRIPT_COMMANDS)


def lock_round(client: Any) -> None:
    lock = DistributedLock(client, "instrumented", timeout=5)
    assert lock.acquire(blocking=False)
    assert lock.extend(5)
    assert lock.is_locked_by_me()
    assert lock.release()


def traced_scripts(exporter: InMemorySpanExporter) -> int:
    return sum(1 for span in exporter.get_finished_spans() if span.name in SCRIPT_COMMANDS)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:  # its own server: no other client's scripts in the counts
        yield running


@pytest.mark.parametrize("how", ["class-wrapped", "instance-wrapped", "subclass-override"])
def test_every_lock_script_reaches_an_instrumented_execute_command(
    server: RedisServer, spans: tuple[Any, InMemorySpanExporter], how: str
) -> None:
    tracer, exporter = spans
    if how == "class-wrapped":  # what opentelemetry-instrumentation-redis does to redis.Redis

        class Client(redis.Redis):
            pass

        Client.execute_command = traced(tracer)(redis.Redis.execute_command)
        client: Any = Client.from_url(server.url)
    elif how == "instance-wrapped":
        client = redis.Redis.from_url(server.url)
        client.execute_command = traced(tracer)(client.execute_command)
    else:

        class Overriding(redis.Redis):
            def execute_command(self, *args: Any, **options: Any) -> Any:
                with tracer.start_as_current_span(str(args[0]).upper()):
                    return super().execute_command(*args, **options)

        client = Overriding.from_url(server.url)
    try:
        assert script_channel(client) is None  # the lock does not go around it
        before = script_calls(server.url)
        lock_round(client)
        ran = script_calls(server.url) - before
    finally:
        client.close()
    assert ran >= 3  # acquire, extend, is_locked_by_me/release: scripts
    assert traced_scripts(exporter) == ran, [s.name for s in exporter.get_finished_spans()]


def test_an_instrumented_asyncio_client_sees_every_lock_script(
    server: RedisServer, spans: tuple[Any, InMemorySpanExporter]
) -> None:
    tracer, exporter = spans

    class Client(redis.asyncio.Redis):
        pass

    Client.execute_command = traced_async(tracer)(redis.asyncio.Redis.execute_command)

    async def body() -> int:
        client = Client.from_url(server.url)
        try:
            before = script_calls(server.url)
            lock = celery_dlock.asyncio.DistributedLock(client, "instrumented-async", timeout=5)
            assert await lock.acquire(blocking=False)
            assert await lock.extend(5)
            assert await lock.release()
            return script_calls(server.url) - before
        finally:
            await client.aclose()

    ran = asyncio.run(body())
    assert ran >= 3
    assert traced_scripts(exporter) == ran


def test_a_valkey_py_client_is_refused_with_a_clear_error() -> None:
    # valkey-py raises its own exception classes (a lost script cache, a timeout), which
    # the lock cannot recognise; redis-py's clients work with Valkey servers.
    valkey_asyncio = pytest.importorskip("valkey.asyncio")
    import valkey

    with pytest.raises(TypeError, match="valkey-py clients are not supported.*redis.Redis.from_url"):
        DistributedLock(valkey.Valkey(), "v")
    with pytest.raises(TypeError, match="valkey-py clients are not supported"):
        celery_dlock.asyncio.DistributedLock(valkey_asyncio.Valkey(), "v")


@pytest.mark.slow
def test_an_instrumented_redis_cluster_client_sees_every_lock_script(
    spans: tuple[Any, InMemorySpanExporter],
) -> None:
    from redis.cluster import RedisCluster

    from tests.support.cluster import LocalCluster

    tracer, exporter = spans

    class Client(RedisCluster):
        pass

    Client.execute_command = traced(tracer)(RedisCluster.execute_command)
    cluster = LocalCluster().start()
    try:
        client = Client(host="127.0.0.1", port=cluster.startup_port)
        try:
            assert script_channel(client) is None
            before = sum(script_calls(node.url) for node in cluster.nodes)
            for index in range(6):  # names spread over the primaries
                lock = DistributedLock(client, f"instrumented-cluster-{index}", timeout=5)
                assert lock.acquire(blocking=False)
                assert lock.release()
            ran = sum(script_calls(node.url) for node in cluster.nodes) - before
        finally:
            client.close()
    finally:
        cluster.stop()
    assert ran >= 12
    assert traced_scripts(exporter) == ran
