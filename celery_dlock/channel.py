"""How the sync lock sends its scripts: straight over a connection, without execute_command.

redis-py's ``execute_command`` is correct for any command, and pays for that on
every call: a retry wrapper around a closure, observability hooks, response
callback lookup, and an encoder call per argument. For the lock's own scripts,
on a plain ``redis.Redis`` client, that was a third of the client CPU of an
acquire+release pair. A :class:`ScriptChannel` borrows a connection from the
client's own pool for each call, exactly as ``execute_command`` does (so pool
limits, the readiness check of a connection the server closed, re-authentication
on release, fork handling, TLS, timeouts and health checks stay redis-py's), then
writes the command, packed by :func:`pack_command`, and reads its reply itself:

* **Retries.** A command is retried under the connection's own retry policy,
  disconnecting before each new try, as ``execute_command`` does (the lock scripts
  are written to be safe to run twice; see ``ACQUIRE``'s "already ours" path).
* **No stale reply.** A command interrupted anywhere between its send and the end of
  its reply (a timeout, or a signal handler's exception) disconnects its connection,
  so no later command can read its reply.

A checkout from redis-py's pool costs more CPU than the lock's own work (locks,
metrics, a readiness check), and it may reconnect - under the client's own retry
policy and timeouts, which a lock operation cannot bound - so two kinds of client skip it:

* a ``single_connection_client`` is served on its own connection, under the
  client's own lock, as ``execute_command`` serves it (once closed, its commands
  go through the pool, again as redis-py does);
* every other client with a pool of at least ``MIN_POOL_FOR_DEDICATED`` connections
  (not a ``BlockingConnectionPool``, no streaming credentials) keeps one pool
  connection for the lock's scripts, taken at the first script and used by one call
  at a time, like a single-connection client that connects lazily, so that an
  unreachable Redis shows up as an error of a lock command. It goes back to the pool
  when the client is garbage-collected. Its other commands use the pool as usual.

With a deadline (every lock operation has one, see :mod:`celery_dlock.deadline`), a
reply is awaited on the caller's thread only on a connection that is connected; a call
that must connect, or borrow from the pool, runs on a helper thread and is given up at
the deadline.

A single-connection client's connection is used as redis-py uses it (a connection
the server closed fails its command, and the retry policy sends it again). A
dedicated connection gets the pool's check-out check before every use, so one the
server closed (a restart, ``CLIENT KILL``, an idle timeout) is replaced even without
retries, as a checkout would; while it is busy (another thread, or a signal handler
re-entering), a script borrows from the pool as usual.

Acquire, release and the watchdog's batched renewals all use it. Clients it does
not understand get ``None`` from :func:`script_channel` and keep using
``execute_command``: Redis Cluster, client-side caching, custom EVAL/EVALSHA
response callbacks, and any ``execute_command`` that is not redis-py's own (a
subclass's override, or a tracing library's wrapper on the class or on one client:
their instrumentation keeps seeing the lock's commands). The lock's commands do bypass redis-py 8's built-in
operation metrics.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.exceptions import DataError

from celery_dlock.deadline import call_before
from celery_dlock.errors import DeadlineExceeded

logger = logging.getLogger("celery_dlock")

_channels: weakref.WeakKeyDictionary[Any, ScriptChannel | None] = weakref.WeakKeyDictionary()


def script_channel(client: Any) -> ScriptChannel | None:
    """The channel for ``client`` (one per client, shared by its locks), or None to use execute_command."""
    try:
        return _channels[client]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable: some wrapper we do not know
        return None
    if _understood(client):
        channel: ScriptChannel | None = ScriptChannel(client, dedicated=_may_dedicate(client.connection_pool))
    else:
        channel = None
    _channels[client] = channel
    return channel


def dedicate_connection(client: Any) -> None:
    """Have the lock's scripts on ``client`` keep one connection instead of a checkout per
    script (see the module docstring; the default for the clients it applies to).

    Its pool counts the kept connection as in use until the client is garbage-collected.
    Ignored for clients the channel does not understand, a ``BlockingConnectionPool``, a
    pool of fewer than ``MIN_POOL_FOR_DEDICATED`` connections, and a streaming credential
    provider.
    """
    if _understood(client) and _may_dedicate(client.connection_pool):
        _channels[client] = ScriptChannel(client, dedicated=True)


#: A pool with fewer connections than this keeps them all for the client's other commands.
MIN_POOL_FOR_DEDICATED = 10


def _may_dedicate(pool: Any) -> bool:
    if isinstance(pool, redis.BlockingConnectionPool):  # its few connections are for everyone
        return False
    if getattr(pool, "max_connections", MIN_POOL_FOR_DEDICATED) < MIN_POOL_FOR_DEDICATED:
        return False
    # Streaming credentials re-authenticate a connection as it goes back to the pool,
    # which a kept connection never does.
    return pool.connection_kwargs.get("credential_provider") is None


def _understood(client: Any) -> bool:
    if not isinstance(client, redis.Redis):
        return False
    if not _is_redis_py_execute_command(type(client).execute_command) or "execute_command" in vars(client):
        return False  # an override or a wrapper (on the class or this client): it must see the scripts
    if client.connection is not None and getattr(client, "single_connection_lock", None) is None:
        return False  # a single-connection client from before redis-py guarded it with a lock
    if "EVALSHA" in client.response_callbacks or "EVAL" in client.response_callbacks:
        return False
    pool = client.connection_pool
    if not isinstance(pool, redis.ConnectionPool) or getattr(pool, "cache", None) is not None:
        return False
    return _internals_fit(pool)


# What the channel needs of redis-py's internals, checked at first use once per pool and
# connection class (and redis-py version, as a process has one): where it does not
# hold, the lock uses the client's public execute_command, which every version supports.
_fits: dict[tuple[type, type], bool] = {}

#: A command like the lock's (a script call with str, bytes, int and float arguments):
#: the channel must pack it exactly as the connection class itself does.
_PACKING_PROBE = ("EVALSHA", "0" * 40, 2, "dlock:{n}", "dlock:{n}:q", b"\x00tok\xff", 1500, 0.25, "caf\u00e9")


def _internals_fit(pool: Any) -> bool:
    pool_class, connection_class = type(pool), pool.connection_class
    key = (pool_class, connection_class)
    fit = _fits.get(key)
    if fit is None:
        missing = _missing_internals(pool_class, connection_class) or _packs_differently(pool)
        fit = _fits[key] = not missing
        if missing:
            logger.debug(
                "celery-dlock: redis-py %s, %s/%s: lock scripts go through execute_command (%s)",
                redis.__version__,
                pool_class.__name__,
                connection_class.__name__,
                "; ".join(missing),
            )
        else:
            logger.debug(
                "celery-dlock: redis-py %s, %s/%s: lock scripts go through the script channel",
                redis.__version__,
                pool_class.__name__,
                connection_class.__name__,
            )
    return fit


def _missing_internals(pool_class: type, connection_class: type) -> list[str]:
    """The channel's assumptions about redis-py that these classes break (empty: all hold)."""
    missing: list[str] = []

    def callable_as(cls: type, method: str, *given: str) -> bool:
        """Whether ``cls.method`` exists and takes the keyword arguments ``given``, every
        other parameter having a default."""
        function = getattr(cls, method, None)
        if not callable(function):
            return False
        try:
            parameters = list(inspect.signature(function).parameters.values())[1:]  # self
        except (TypeError, ValueError):
            return False
        names = {p.name for p in parameters}
        if any(name not in names for name in given) and not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return False
        optional = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        required = [p for p in parameters if p.default is p.empty and p.kind not in optional]
        return all(p.name in given for p in required)

    takes_no_arguments = callable_as(pool_class, "get_connection")
    if not (takes_no_arguments or callable_as(pool_class, "get_connection", "command_name")):
        missing.append("ConnectionPool.get_connection() needs arguments other than a command name")
    if not callable_as(pool_class, "release", "connection"):
        missing.append("ConnectionPool.release(connection) differs")
    for method, given in (
        ("send_packed_command", ("command", "check_health")),
        ("can_read", ("timeout",)),
        ("read_response", ()),
        ("disconnect", ()),
    ):
        if not callable_as(connection_class, method, *given):
            missing.append(f"Connection.{method}({', '.join(given)}) differs")
    return missing


def _packs_differently(pool: Any) -> list[str]:
    """Self-test, no I/O: the connection class packs the probe command as the channel does."""
    kwargs = pool.connection_kwargs
    try:
        connection = pool.connection_class(**kwargs)  # not connected: connecting is lazy
        theirs = b"".join(bytes(part) for part in connection.pack_command(*_PACKING_PROBE))
    except Exception as exc:
        return [f"Connection.pack_command() cannot be checked ({exc!r})"]
    encoding, errors = kwargs.get("encoding") or "utf-8", kwargs.get("encoding_errors") or "strict"
    ours = pack_command(_PACKING_PROBE, encoding, errors)
    return [] if theirs == ours else ["Connection.pack_command() packs a script call differently"]


def _checkout_call(pool: Any) -> Callable[[], Any]:
    """How to take a connection from ``pool``: ``get_connection()``, or, where redis-py
    before 5.3 requires a command name (which its pools ignore), ``get_connection("EVALSHA")``."""
    if _wants_command_name(type(pool)):
        return functools.partial(pool.get_connection, "EVALSHA")
    check_out: Callable[[], Any] = pool.get_connection
    return check_out


def _wants_command_name(pool_class: type) -> bool:
    """Whether ``get_connection`` requires a ``command_name``: the first definition in the
    class's MRO that names its parameters says (a subclass passing ``*args`` on does not)."""
    for cls in pool_class.__mro__:
        function = vars(cls).get("get_connection")
        if function is None:
            continue
        try:
            parameters = list(inspect.signature(function).parameters.values())[1:]
        except (TypeError, ValueError):
            return False
        if all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
            continue
        return any(p.name == "command_name" and p.default is p.empty for p in parameters)
    return False


def _is_redis_py_execute_command(function: Any) -> bool:
    """Whether ``function`` is redis-py's own, not an override or a tracing wrapper (functools.wraps
    and wrapt both leave ``__wrapped__``; a bare replacement has code from another file)."""
    if hasattr(function, "__wrapped__"):
        return False
    code = getattr(function, "__code__", None)
    return (
        code is not None and code.co_name == "execute_command" and code.co_filename == redis.client.__file__
    )


def pack_command(command: Sequence[Any], encoding: str, errors: str) -> bytes:
    """One command as a RESP array of bulk strings (what redis-py's packer sends, for the
    argument types it accepts, without its per-argument encoder calls)."""
    name = command[0]
    first = name.encode() if isinstance(name, str) else _argument_bytes(name, command, encoding, errors)
    parts = [b"*%d\r\n$%d\r\n%b\r\n" % (len(command), len(first), first)]  # the name: UTF-8 always
    for arg in command[1:]:
        kind = type(arg)  # the common exact types first; anything else as redis-py would
        if kind is bytes:
            data = arg
        elif kind is str:
            data = arg.encode(encoding, errors)
        elif kind is int or kind is float:
            data = repr(arg).encode()
        else:
            data = _argument_bytes(arg, command, encoding, errors)
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


def _argument_bytes(arg: Any, command: Sequence[Any], encoding: str, errors: str) -> bytes:
    if isinstance(arg, bytes):
        return bytes(arg)
    if isinstance(arg, str):
        return arg.encode(encoding, errors)
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return repr(arg).encode()
    if isinstance(arg, (bytearray, memoryview)):
        return bytes(arg)
    raise DataError(
        f"Invalid input of type: {type(arg).__name__!r} in {command[0]!r}. "
        "Convert to a bytes, str, int or float first."
    )


class ScriptChannel:
    """Sends one client's lock commands, one call at a time, on a connection borrowed from its
    pool, or on the connection it keeps (see the module docstring)."""

    def __init__(self, client: Any, dedicated: bool = False) -> None:
        self._pool = client.connection_pool
        # A single-connection client: a weak reference (the channel is the value of a
        # weak dict keyed by the client), read on each call, as close() may drop it.
        self._single: Callable[[], Any] = weakref.ref(client) if client.connection is not None else _no_client
        # dedicate_connection(): the kept connection (None until the first script) and its lock.
        self._dedicated_lock = threading.Lock() if dedicated else None
        self._dedicated: Any = None
        if dedicated:
            _dedicated_channels.add(self)
        self._check_out = _checkout_call(self._pool)
        kwargs = self._pool.connection_kwargs
        self._encoding: str = kwargs.get("encoding") or "utf-8"
        self._encoding_errors: str = kwargs.get("encoding_errors") or "strict"

    def execute(
        self, *command: Any, deadline: float | None = None, on_late: Callable[[Any], object] | None = None
    ) -> Any:
        """Send ``command`` and return its reply (as ``execute_command`` would for EVAL/EVALSHA).

        ``deadline`` (monotonic): no answer by then raises DeadlineExceeded, whatever the
        client's socket timeout and retry policy (see :meth:`_call`); ``on_late`` gets
        the reply if it comes after that.
        """
        return self._call(self._pack(command), _read_one, deadline, on_late)

    def execute_batch(self, commands: list[tuple[Any, ...]], deadline: float | None = None) -> list[Any]:
        """Send ``commands`` at once and read every reply, in order (one round trip, like a
        non-transactional pipeline); error replies come back as exception objects."""

        def read_all(conn: Any, deadline: float | None) -> list[Any]:
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(_read_one(conn, deadline))
                except redis.ResponseError as error:
                    replies.append(error)
            return replies

        result: list[Any] = self._call(b"".join(self._pack(c) for c in commands), read_all, deadline)
        return result

    def _call(
        self,
        packed: bytes,
        read: Reader,
        deadline: float | None,
        on_late: Callable[[Any], object] | None = None,
    ) -> Any:
        """One round trip, ended on ``deadline`` if one is given.

        On a connected connection the reply is awaited on this thread, at most until the
        deadline (no retries: the deadline is the budget). Where the call would have to
        connect first (a connect, a handshake and the client's retries cannot be bounded
        from here), it runs on a helper thread under the client's own settings, and this
        thread stops waiting at the deadline.
        """
        if deadline is None:
            return self._round_trip(packed, read, None)
        try:
            return self._round_trip(packed, read, deadline)
        except _MustConnect:
            pass  # raised before anything was sent
        except _TryFailed as failed:
            # The connection broke or timed out: try again as the client's retry
            # policy says, on a new connection, if time is left.
            if not failed.policy_retries or time.monotonic() >= deadline:
                raise failed.error from None
        return call_before(deadline, lambda: self._round_trip(packed, read, None), on_late)

    def _pack(self, command: tuple[Any, ...]) -> bytes:
        return pack_command(command, self._encoding, self._encoding_errors)

    def _round_trip(self, packed: bytes, read: Reader, deadline: float | None) -> Any:
        """Write ``packed`` and ``read`` the reply: on the client's own connection (a
        single-connection client), on the dedicated one, else on one borrowed from the pool."""
        client = self._single()
        if client is not None:
            with client.single_connection_lock:
                conn = client.connection
                if conn is not None:
                    _check_connected(conn, deadline)
                    return _on_kept_connection(conn, packed, read, deadline)
        dedicated_lock = self._dedicated_lock
        # Busy (another thread, or this one re-entered from a signal handler while it
        # waits for a reply): borrow from the pool instead of waiting or crossing replies.
        if dedicated_lock is not None and dedicated_lock.acquire(blocking=False):
            try:
                conn = self._dedicated
                if conn is None:
                    if deadline is not None:
                        raise _MustConnect
                    conn = self._dedicated = self._check_out()
                    # Back to the pool when this channel (its client) is gone.
                    weakref.finalize(self, _give_back, self._pool, conn, os.getpid())
                else:
                    _make_ready(conn, self._pool)
                    _check_connected(conn, deadline)
                return _on_kept_connection(conn, packed, read, deadline)
            finally:
                dedicated_lock.release()
        if deadline is not None:
            raise _MustConnect  # a checkout may reconnect: only on a helper thread
        conn = self._check_out()
        try:
            return _send_and_read(conn, packed, read, deadline)
        finally:
            self._pool.release(conn)


# How a round trip reads its reply (or replies) on a connection, by a deadline (or None).
Reader = Callable[[Any, "float | None"], Any]


class _MustConnect(Exception):
    """A bounded call found its connection not connected: it must run where connecting may block."""


class _TryFailed(Exception):
    """A bounded call's one try failed before its deadline: the error, and whether the
    connection's retry policy would send the command again."""

    def __init__(self, error: Exception, policy_retries: bool) -> None:
        super().__init__(error)
        self.error = error
        self.policy_retries = policy_retries


def _policy_retries(retry: Any, error: Exception) -> bool:
    """Whether redis-py's ``retry`` policy retries after ``error`` (checked through its
    public ``get_retries``; a policy we cannot read counts as retrying: the lock's
    scripts are safe to run twice)."""
    get_retries = getattr(retry, "get_retries", None)
    retries = get_retries() if callable(get_retries) else getattr(retry, "_retries", 1)
    supported = getattr(retry, "_supported_errors", (redis.ConnectionError, redis.TimeoutError))
    return retries != 0 and isinstance(error, supported)


def _read_one(conn: Any, deadline: float | None) -> Any:
    """One reply; with a deadline, waited for at most until then, or the connection's own
    socket timeout if that is shorter (the rest of a reply that has started arriving is
    read under the connection's own timeout)."""
    if deadline is not None:
        left = deadline - time.monotonic()
        socket_timeout = getattr(conn, "socket_timeout", None)
        if isinstance(socket_timeout, (int, float)) and 0 < socket_timeout < left:
            if not conn.can_read(timeout=socket_timeout):
                raise redis.TimeoutError("Timeout reading from socket")
        elif left <= 0 or not conn.can_read(timeout=left):
            raise DeadlineExceeded("no reply from Redis before the lock operation's deadline")
    return conn.read_response()


def _is_connected(conn: Any) -> bool:
    """Whether ``conn`` has a socket (redis-py's ``is_connected``, or its socket attribute)."""
    flag = getattr(type(conn), "is_connected", None)
    if isinstance(flag, property):
        return bool(conn.is_connected)
    return getattr(conn, "_sock", None) is not None


def _give_back(pool: Any, conn: Any, pid: int) -> None:
    if os.getpid() == pid:  # a forked child's pool starts afresh
        pool.release(conn)


def _check_connected(conn: Any, deadline: float | None) -> None:
    if deadline is not None and not _is_connected(conn):
        raise _MustConnect


def _send_and_read(conn: Any, packed: bytes, read: Reader, deadline: float | None) -> Any:
    """Write ``packed`` on ``conn`` and ``read`` the reply: without a deadline under the
    connection's retry policy (a failed try disconnects; the next one reconnects as it
    sends), with one in a single try whose wait for the reply ends on the deadline."""

    def send_and_read() -> Any:
        conn.send_packed_command([packed], check_health=deadline is None)
        return read(conn, deadline)

    try:
        if deadline is None:
            return conn.retry.call_with_retry(send_and_read, lambda _error: conn.disconnect())
        try:
            return send_and_read()
        except (redis.ConnectionError, redis.TimeoutError) as error:
            if isinstance(error, DeadlineExceeded):
                raise
            conn.disconnect()
            raise _TryFailed(error, _policy_retries(conn.retry, error)) from error
    except redis.ResponseError:
        raise  # a whole error reply was read: the connection is in step
    except BaseException:
        # Interrupted anywhere between the send and the end of the read (a signal
        # handler's exception, e.g. a soft time limit, may land between the two), or
        # out of time: a reply may still be on its way, so the connection must not
        # serve another command.
        conn.disconnect()
        raise


def _on_kept_connection(conn: Any, packed: bytes, read: Reader, deadline: float | None) -> Any:
    try:
        return _send_and_read(conn, packed, read, deadline)
    finally:
        # redis-py's maintenance notifications may ask for a new connection
        should_reconnect = getattr(conn, "should_reconnect", None)
        if should_reconnect is not None and should_reconnect():
            conn.disconnect()


def _make_ready(conn: Any, pool: Any) -> None:
    """The pool's check-out check on a kept connection: one the server closed, or with
    unread data (not a push message of maintenance notifications), is dropped, and the
    send connects again. A disconnected one is left to the send (can_read would connect
    it, and an unreachable server would then cost two connect timeouts)."""
    if getattr(conn, "is_connected", True) is False:
        return
    try:
        unread = conn.can_read()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        conn.disconnect()
        return
    notifications = getattr(pool, "maint_notifications_enabled", None)
    if unread and not (notifications is not None and notifications()):
        conn.disconnect()


def _no_client() -> None:
    return None


_dedicated_channels: weakref.WeakSet[ScriptChannel] = weakref.WeakSet()


def _forget_dedicated_in_child() -> None:
    # The parent's kept connections share its sockets, and a lock may have been held
    # by another thread at the fork: a child starts with neither.
    for channel in list(_dedicated_channels):
        channel._dedicated = None
        channel._dedicated_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_dedicated_in_child)
