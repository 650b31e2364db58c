"""The script channel: the lock's scripts over kept connections, with redis-py's guarantees kept.

Each test breaks one of the things ``execute_command`` would have handled (a
connection the server closed while idle, one killed under load, an error reply,
an interrupted read, a fork) and checks that the lock still gets the right reply.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_dlock import DistributedLock
from celery_dlock.channel import IDLE_CHECK_AFTER, script_channel
from celery_dlock.embedded import RedisServer
from tests.support.counting import CountingRedis
from tests.support.proxy import ChaosProxy


def kept_connection_id(client: redis.Redis) -> int:
    """CLIENT ID of the connection the channel would use next."""
    channel = script_channel(client)
    assert channel is not None
    return int(channel.execute("CLIENT", "ID"))


def kill_client(admin: redis.Redis, client_id: int) -> None:
    admin.execute_command("CLIENT", "KILL", "ID", client_id)


def test_the_lock_scripts_reuse_one_kept_connection(redis_url: str, name: str) -> None:
    client = redis.Redis.from_url(redis_url)
    kept = kept_connection_id(client)
    for _ in range(20):
        lock = DistributedLock(client, name)
        assert lock.acquire() and lock.release()
    assert kept_connection_id(client) == kept
    client.close()


def test_a_connection_the_server_closed_while_idle_is_replaced(redis_url: str, name: str) -> None:
    """With retries turned off, only the idle check stands between a dead connection and an error."""
    admin = redis.Redis.from_url(redis_url)
    client = redis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 0))
    lock = DistributedLock(client, name)
    assert lock.acquire() and lock.release()
    kill_client(admin, kept_connection_id(client))
    time.sleep(IDLE_CHECK_AFTER + 0.2)
    assert lock.acquire(), "the dead kept connection was used"
    assert admin.get(lock.keys.lock) == lock.token.encode()
    assert lock.release()
    client.close()
    admin.close()


def test_a_connection_killed_under_load_is_retried_by_the_client_policy(redis_url: str, name: str) -> None:
    admin = redis.Redis.from_url(redis_url)
    client = redis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 2))
    lock = DistributedLock(client, name)
    assert lock.acquire() and lock.release()
    kill_client(admin, kept_connection_id(client))
    assert lock.acquire()  # at once: no idle check, the retry policy reconnects
    assert lock.release()
    assert not admin.exists(lock.keys.lock)
    client.close()
    admin.close()


def test_an_error_reply_leaves_the_connection_clean(own_redis: RedisServer) -> None:
    client = redis.Redis.from_url(own_redis.url)
    lock = DistributedLock(client, "flushed")
    assert lock.acquire() and lock.release()
    kept = kept_connection_id(client)
    client.script_flush()  # the next EVALSHA answers NOSCRIPT; the lock falls back to EVAL
    assert lock.acquire() and lock.release()
    assert kept_connection_id(client) == kept
    client.close()


class Interrupted(Exception):
    pass


def test_an_interrupted_read_never_leaves_its_reply_for_the_next_command(own_redis: RedisServer) -> None:
    proxy = ChaosProxy(own_redis.port).start()
    previous = signal.getsignal(signal.SIGALRM)
    try:
        client = redis.Redis.from_url(proxy.url, socket_timeout=5)
        lock = DistributedLock(client, "interrupted")
        assert lock.acquire() and lock.release()

        def interrupt(*_: Any) -> None:
            raise Interrupted()

        signal.signal(signal.SIGALRM, interrupt)
        proxy.latency = 0.3
        signal.setitimer(signal.ITIMER_REAL, 0.2)  # while the acquire waits for its reply
        with pytest.raises(Interrupted):
            lock.acquire()
        signal.setitimer(signal.ITIMER_REAL, 0)
        proxy.latency = 0
        channel = script_channel(client)
        assert channel is not None
        for word in ("one", "two", "three"):
            assert channel.execute("ECHO", word) == word.encode()
        client.close()
    finally:
        signal.signal(signal.SIGALRM, previous)
        proxy.stop()


def _use_in_child(url: str, name: str, queue: Any) -> None:
    client = _shared["client"]
    lock = DistributedLock(client, name)
    ok = all(lock.acquire() and lock.release() for _ in range(10))
    queue.put((ok, kept_connection_id(client)))


_shared: dict[str, Any] = {}


@pytest.mark.slow
def test_a_forked_child_takes_its_own_connections(redis_url: str, name: str) -> None:
    client = redis.Redis.from_url(redis_url)
    _shared["client"] = client
    lock = DistributedLock(client, name)
    assert lock.acquire() and lock.release()
    parent_kept = kept_connection_id(client)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_use_in_child, args=(redis_url, name, queue))
    child.start()
    ok, child_kept = queue.get(timeout=30)
    child.join(30)
    assert ok and child.exitcode == 0
    assert child_kept != parent_kept
    assert lock.acquire() and lock.release()  # the parent's connection still works
    assert kept_connection_id(client) == parent_kept
    client.close()


@pytest.mark.parametrize(
    "make",
    [
        lambda url: CountingRedis.from_url(url),  # overrides execute_command: its counts must see us
        lambda url: redis.Redis.from_url(url, single_connection_client=True),
        lambda url: redis.Redis.from_url(url, protocol=3),
    ],
    ids=["execute_command-overridden", "single-connection", "resp3"],
)
def test_clients_it_does_not_understand_keep_execute_command(redis_url: str, name: str, make: Any) -> None:
    client = make(redis_url)
    assert script_channel(client) is None
    lock = DistributedLock(client, name)
    assert lock.acquire() and lock.release()
    if isinstance(client, CountingRedis):
        assert client.commands.count("EVALSHA") == 2
    client.close()


def test_commands_are_packed_as_redis_py_packs_them() -> None:
    from redis.connection import PythonRespSerializer

    from celery_dlock.channel import pack_command

    encoder = redis.Redis().get_encoder()
    serializer = PythonRespSerializer(6000, encoder.encode)
    command = ("EVALSHA", b"sha", b"3", b"key", "t\u00f6ken", 1500, 2.5, -3, b"", "")
    command += (bytearray(b"x"), "x" * 10000)
    assert pack_command(command, "utf-8", "strict") == b"".join(serializer.pack(*command))
    assert pack_command(("SET", "\u00e9"), "latin-1", "strict") == b"*2\r\n$3\r\nSET\r\n$1\r\n\xe9\r\n"
    for bad in (True, None, [1], object()):
        with pytest.raises(redis.DataError, match="Invalid input of type"):
            pack_command(("SET", bad), "utf-8", "strict")
