"""The script channel: the lock's scripts without execute_command, with redis-py's guarantees kept.

Each test breaks one of the things ``execute_command`` would have handled (pool
limits, a pool shared by short-lived clients, a connection the server closed,
one killed under load, an error reply, an interrupted read, a fork, a client
encoding, a tracing wrapper) and checks that the lock still gets the right reply.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import threading
import uuid
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_dlock import DistributedLock
from celery_dlock.channel import dedicate_connection, script_channel
from celery_dlock.connection import first_sight
from celery_dlock.embedded import RedisServer
from celery_dlock.errors import LockBackendUnavailable
from tests.support.counting import CountingRedis
from tests.support.proxy import ChaosProxy

# These tests are about the channel itself. Where this redis-py's internals do not fit it,
# the lock sends its scripts through execute_command (tests/test_versions.py checks which).
pytestmark = pytest.mark.skipif(
    script_channel(redis.Redis()) is None,
    reason=f"redis-py {redis.__version__}: the lock's scripts go through execute_command, not the channel",
)


def next_connection_id(client: redis.Redis) -> int:
    """CLIENT ID of the pool connection the channel would use next."""
    channel = script_channel(client)
    assert channel is not None
    return int(channel.execute("CLIENT", "ID"))


def kill_client(admin: redis.Redis, client_id: int) -> None:
    admin.execute_command("CLIENT", "KILL", "ID", client_id)


def test_a_pool_of_one_connection_serves_the_lock_and_the_body(redis_url: str, name: str) -> None:
    """The channel borrows and gives back, like execute_command: it never keeps a pool's connection."""
    pool = redis.BlockingConnectionPool.from_url(redis_url, max_connections=1, timeout=2)
    client = redis.Redis(connection_pool=pool)
    for round_ in range(5):
        lock = DistributedLock(client, name, auto_renewal=True)
        assert lock.acquire()
        assert client.set(f"{name}:body", round_)  # would wait 2 s and fail if the lock kept it
        assert lock.release()
    client.close()


def test_short_lived_clients_sharing_a_pool_leave_no_connection_behind(redis_url: str, name: str) -> None:
    pool = redis.ConnectionPool.from_url(redis_url, max_connections=3)
    for _ in range(20):  # redis-py's pattern: a client per request on a shared pool
        client = redis.Redis(connection_pool=pool)
        lock = DistributedLock(client, name)
        assert lock.acquire() and lock.release()
        del client, lock
    assert redis.Redis(connection_pool=pool).ping()
    pool.disconnect()


@pytest.mark.parametrize("dedicated", [False, True], ids=["pool", "dedicated"])
def test_a_connection_the_server_closed_is_replaced_without_a_retry(
    redis_url: str, name: str, dedicated: bool
) -> None:
    """With retries turned off, only the readiness check (the pool's at checkout, the channel's
    before every use of a dedicated connection) stands between a dead connection and an error
    (a Sentinel failover kills every client connection like this)."""
    admin = redis.Redis.from_url(redis_url)
    client = redis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 0))
    if dedicated:
        dedicate_connection(client)
    lock = DistributedLock(client, name)
    assert lock.acquire() and lock.release()
    kill_client(admin, next_connection_id(client))
    assert lock.acquire(), "the dead connection was used"
    assert admin.get(lock.keys.lock) == lock.token.encode()
    assert lock.release()
    client.close()
    admin.close()


def test_an_error_reply_leaves_the_connection_clean(own_redis: RedisServer) -> None:
    client = redis.Redis.from_url(own_redis.url)
    lock = DistributedLock(client, "flushed")
    assert lock.acquire() and lock.release()
    kept = next_connection_id(client)
    client.script_flush()  # the next EVALSHA answers NOSCRIPT; the lock falls back to EVAL
    assert lock.acquire() and lock.release()
    assert next_connection_id(client) == kept
    client.close()


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("dedicated", [False, True], ids=["pool", "dedicated"])
def test_an_interrupted_read_never_leaves_its_reply_for_the_next_command(
    own_redis: RedisServer, dedicated: bool
) -> None:
    proxy = ChaosProxy(own_redis.port).start()
    previous = signal.getsignal(signal.SIGALRM)
    try:
        client = redis.Redis.from_url(proxy.url, socket_timeout=5)
        if dedicated:
            dedicate_connection(client)
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
    queue.put((ok, next_connection_id(client)))


_shared: dict[str, Any] = {}


@pytest.mark.slow
@pytest.mark.parametrize("dedicated", [False, True], ids=["pool", "dedicated"])
def test_a_forked_child_takes_its_own_connections(redis_url: str, name: str, dedicated: bool) -> None:
    client = redis.Redis.from_url(redis_url)
    if dedicated:
        dedicate_connection(client)
    _shared["client"] = client
    lock = DistributedLock(client, name)
    assert lock.acquire() and lock.release()
    parent_kept = next_connection_id(client)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_use_in_child, args=(redis_url, name, queue))
    child.start()
    ok, child_kept = queue.get(timeout=30)
    child.join(30)
    assert ok and child.exitcode == 0
    assert child_kept != parent_kept
    assert lock.acquire() and lock.release()  # the parent's connection still works
    assert next_connection_id(client) == parent_kept
    client.close()


@pytest.mark.parametrize(
    "make",
    [
        lambda url: CountingRedis.from_url(url),  # overrides execute_command: its counts must see us
    ],
    ids=["execute_command-overridden"],
)
def test_clients_it_does_not_understand_keep_execute_command(redis_url: str, name: str, make: Any) -> None:
    client = make(redis_url)
    assert script_channel(client) is None
    lock = DistributedLock(client, name)
    assert lock.acquire() and lock.release()
    if isinstance(client, CountingRedis):
        assert client.commands.count("EVALSHA") == 2
    client.close()


def test_a_single_connection_client_is_served_on_its_own_connection(redis_url: str, name: str) -> None:
    """No pool checkout: the scripts run on the client's one connection (the Celery layer's clients)."""
    tag = f"dlock-single-{uuid.uuid4().hex[:12]}"
    client = redis.Redis.from_url(redis_url, single_connection_client=True, client_name=tag)
    admin = redis.Redis.from_url(redis_url)
    if getattr(client, "single_connection_lock", None) is None:
        # A redis-py that does not guard its one connection with a lock the channel could share.
        assert script_channel(client) is None
        lock = DistributedLock(client, name)
        assert lock.acquire() and lock.release()
        client.close()
        admin.close()
        return
    assert script_channel(client) is not None
    own_id = int(client.execute_command("CLIENT", "ID"))
    assert next_connection_id(client) == own_id
    for _ in range(3):
        lock = DistributedLock(client, name, auto_renewal=True)
        assert lock.acquire() and lock.release()
    assert [c["name"] for c in admin.client_list()].count(tag) == 1  # the pool opened no other
    # Closed, the client gives its connection back to the pool: from then on the
    # channel borrows from the pool like execute_command, never the given-back one.
    client.close()
    assert client.connection is None
    lock = DistributedLock(client, name)
    assert lock.acquire() and lock.release()
    client.connection_pool.disconnect()
    admin.close()


@pytest.mark.parametrize("kind", ["single-connection", "dedicated"])
def test_threads_take_turns_on_a_kept_connection(redis_url: str, name: str, kind: str) -> None:
    """Its lock keeps one thread's command and reply together: no thread reads another's reply."""
    client = redis.Redis.from_url(redis_url, single_connection_client=kind == "single-connection")
    if kind == "single-connection" and getattr(client, "single_connection_lock", None) is None:
        pytest.skip(f"redis-py {redis.__version__}'s single-connection client is not thread-safe")
    if kind == "dedicated":
        dedicate_connection(client)
    errors: list[BaseException] = []
    fences: list[int] = []

    def work(index: int) -> None:
        try:
            for round_ in range(100):
                lock = DistributedLock(client, f"{name}:{index}", note_ttl=10)
                assert lock.acquire() is True
                assert isinstance(lock.fence, int) and lock.fence == round_ + 1
                fences.append(lock.fence)
                assert lock.release(note=f"{index}:{round_}") is True
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(fences) == 600
    client.close()


class CountingPool(redis.ConnectionPool):
    checkouts = 0

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        self.checkouts += 1
        return super().get_connection(*args, **kwargs)


def test_a_dedicated_client_checks_out_one_connection_for_all_its_scripts(redis_url: str, name: str) -> None:
    pool = CountingPool.from_url(redis_url)
    client = redis.Redis(connection_pool=pool)
    dedicate_connection(client)
    first_sight(client)  # its server counts as checked: no CONFIG GET borrowing a connection
    for _ in range(5):
        lock = DistributedLock(client, name, auto_renewal=True)
        assert lock.acquire() and lock.extend(5) and lock.release()
    assert pool.checkouts == 1
    assert client.get(f"{name}:other") is None  # other commands: the pool, as usual
    assert pool.checkouts == 2
    pool.disconnect()


def test_a_dedicated_connection_is_taken_at_the_first_script(own_redis: RedisServer, name: str) -> None:
    """Not when the client is made: an unreachable Redis is an error of a lock command."""
    own_redis.kill()
    try:
        client = redis.Redis.from_url(own_redis.url, socket_connect_timeout=1)
        dedicate_connection(client)  # nothing to connect to, and no error
        lock = DistributedLock(client, name)
        with pytest.raises(LockBackendUnavailable):
            lock.acquire()
    finally:
        own_redis.start()
    assert lock.acquire() and lock.release()
    client.close()


def _interrupt_the_next_read() -> None:
    """Raise in the caller just before redis-py starts reading a reply (after the send), as a
    signal handler's exception can (Celery's soft time limit, KeyboardInterrupt)."""

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        code = frame.f_code
        if event == "call" and code.co_name == "read_response" and code.co_filename == connection_file:
            sys.settrace(None)
            raise Interrupted("between the send and the read")
        return None

    connection_file = redis.connection.__file__
    sys.settrace(tracer)


@pytest.mark.parametrize("dedicated", [False, True], ids=["pool", "dedicated"])
def test_a_reply_left_unread_by_an_interruption_is_never_read_by_the_next_command(
    redis_url: str, name: str, dedicated: bool
) -> None:
    """An integer reply read out of turn would mean "acquired": here, of a lock someone else holds."""
    client = redis.Redis.from_url(redis_url)
    if dedicated:
        dedicate_connection(client)
    other = redis.Redis.from_url(redis_url)
    theirs = DistributedLock(other, f"{name}:b", timeout=30)
    assert theirs.acquire(blocking=False)
    warm = DistributedLock(client, f"{name}:warm")
    assert warm.acquire() and warm.release()
    first = DistributedLock(client, f"{name}:a")
    _interrupt_the_next_read()
    try:
        with pytest.raises(Interrupted):
            first.acquire(blocking=False)
    finally:
        sys.settrace(None)
    assert DistributedLock(client, f"{name}:b", timeout=30).acquire(blocking=False) is False
    assert theirs.is_locked_by_me()
    assert DistributedLock(client, f"{name}:c").acquire(blocking=False) is True
    client.close()
    other.close()


SLOW_SCRIPT = (
    "local t = redis.call('TIME'); local s = t[1] * 1e6 + t[2]; "
    "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - s > 300000; return 'slow'"
)


def test_a_signal_handler_using_the_dedicated_connection_meanwhile_gets_its_own_reply(
    redis_url: str,
) -> None:
    """Re-entered while it waits for a reply, the channel borrows from the pool instead."""
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    dedicate_connection(client)
    channel = script_channel(client)
    assert channel is not None
    got: dict[str, Any] = {}

    def handler(*_: Any) -> None:
        got["handler"] = channel.execute("ECHO", "from the handler")

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        got["main"] = channel.execute("EVAL", SLOW_SCRIPT, 0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert got == {"handler": b"from the handler", "main": b"slow"}
    client.close()


@pytest.mark.parametrize(
    "make",
    [
        # dedicated, its one connection would leave none for the body's SET
        lambda url: redis.Redis.from_url(url + "?max_connections=1"),
        lambda url: redis.Redis(
            connection_pool=redis.BlockingConnectionPool.from_url(url, max_connections=20)
        ),
    ],
    ids=["few-connections", "blocking-pool"],
)
def test_small_or_blocking_pools_are_never_dedicated(redis_url: str, name: str, make: Any) -> None:
    client = make(redis_url)
    dedicate_connection(client)
    channel = script_channel(client)
    assert channel is not None and channel._dedicated_lock is None
    lock = DistributedLock(client, name)
    assert lock.acquire() and client.set(f"{name}:body", 1) and lock.release()
    client.close()


def test_a_tracing_wrapper_on_redis_py_keeps_seeing_the_lock_commands(
    redis_url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tracing libraries (ddtrace, OpenTelemetry, Sentry) wrap Redis.execute_command on the class."""
    import functools

    seen: list[str] = []
    original = redis.Redis.execute_command

    @functools.wraps(original)
    def traced(self: redis.Redis, *args: Any, **options: Any) -> Any:
        seen.append(str(args[0]))
        return original(self, *args, **options)

    monkeypatch.setattr(redis.Redis, "execute_command", traced)
    client = redis.Redis.from_url(redis_url)
    lock = DistributedLock(client, name)
    assert lock.acquire() and lock.release()
    assert seen.count("EVALSHA") == 2
    client.close()


@pytest.mark.parametrize("options", [{"protocol": 3}, {"protocol": 2}, {"encoding": "utf-16"}])
def test_the_lock_works_over_the_channel_whatever_the_protocol_or_encoding(
    own_redis: RedisServer, name: str, options: dict[str, Any]
) -> None:
    """RESP3 replies; and even a client encoding that is not ASCII-compatible, which the lock as a
    whole does not support (docs/lock.md), still gets the command name and the script source as
    UTF-8, as redis-py sends them: a plain acquire and release work."""
    client = redis.Redis.from_url(own_redis.url, **options)
    assert script_channel(client) is not None
    client.script_flush()  # our own server: the first call must EVAL the source
    first, second = DistributedLock(client, name), DistributedLock(client, name)
    assert first.acquire()
    fence = first.fence
    assert fence is not None
    assert not second.acquire(blocking=False)
    assert first.release()
    assert second.acquire() and second.fence == fence + 1
    assert second.release()
    client.close()


def test_commands_are_packed_as_redis_py_packs_them() -> None:
    from redis.connection import PythonRespSerializer

    from celery_dlock.channel import pack_command

    encoder = redis.Redis().get_encoder()
    serializer = PythonRespSerializer(6000, encoder.encode)
    command = ("EVALSHA", b"sha", b"3", b"key", "t\u00f6ken", 1500, 2.5, -3, b"", "")
    command += ("x" * 10000,)
    try:
        encoder.encode(bytearray(b"x"))
        command += (bytearray(b"x"),)  # a type some redis-py versions accept (6.x refuses it)
    except redis.DataError:
        pass
    assert pack_command(command, "utf-8", "strict") == b"".join(serializer.pack(*command))
    assert pack_command(("SET", "\u00e9"), "latin-1", "strict") == b"*2\r\n$3\r\nSET\r\n$1\r\n\xe9\r\n"
    for bad in (True, None, [1], object()):
        with pytest.raises(redis.DataError, match="Invalid input of type"):
            pack_command(("SET", bad), "utf-8", "strict")


class ConnectionWithoutReadTimeout(redis.Connection):
    """A connection class whose can_read() takes no timeout (redis-py's own code never passes one)."""

    def can_read(self) -> bool:  # type: ignore[override]
        return bool(super().can_read())


def test_where_redis_py_internals_differ_the_lock_uses_execute_command(
    redis_url: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="celery_dlock")
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=ConnectionWithoutReadTimeout)
    client = redis.Redis(connection_pool=pool)
    assert script_channel(client) is None
    said = [r.getMessage() for r in caplog.records]
    assert any("execute_command" in line and "can_read" in line for line in said), said
    lock = DistributedLock(client, name, timeout=5, auto_renewal=True)
    assert lock.acquire() and lock.is_locked_by_me() and lock.extend(5) and lock.release()
    assert script_channel(redis.Redis.from_url(redis_url)) is not None  # redis-py's own classes fit


class PoolNamingTheCommand(redis.ConnectionPool):
    """A pool whose get_connection() requires a command name, as redis-py's did before 5.3."""

    names: list[str]

    def get_connection(self, command_name: str, *keys: Any, **options: Any) -> Any:  # type: ignore[override]
        self.names = [*getattr(self, "names", []), command_name]
        try:
            return super().get_connection()
        except TypeError:  # this redis-py's own pool wants the name too
            return super().get_connection(command_name)


def test_a_pool_that_wants_a_command_name_gets_one_and_keeps_the_channel(redis_url: str, name: str) -> None:
    pool = PoolNamingTheCommand.from_url(redis_url)
    client = redis.Redis(connection_pool=pool)
    assert script_channel(client) is not None
    lock = DistributedLock(client, name, timeout=5, auto_renewal=True)
    assert lock.acquire() and lock.extend(5) and lock.release()
    assert pool.names and set(pool.names) == {"EVALSHA"}
    pool.disconnect()
