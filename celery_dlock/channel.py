"""How the sync lock sends its scripts: straight over a pool connection, without execute_command.

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
* **No stale reply.** redis-py's connection disconnects itself when a read or a
  send is interrupted, and the connection always goes back to the pool.

Acquire, release and the watchdog's batched renewals all use it. Clients it does
not understand get ``None`` from :func:`script_channel` and keep using
``execute_command``: Redis Cluster, single-connection clients, client-side
caching, custom EVAL/EVALSHA response callbacks, and any ``execute_command``
that is not redis-py's own (a subclass's override, or a tracing library's
wrapper: their instrumentation keeps seeing the lock's commands). The lock's
commands do bypass redis-py 8's built-in operation metrics.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.exceptions import DataError

_channels: weakref.WeakKeyDictionary[Any, ScriptChannel | None] = weakref.WeakKeyDictionary()


def script_channel(client: Any) -> ScriptChannel | None:
    """The channel for ``client`` (one per client, shared by its locks), or None to use execute_command."""
    try:
        return _channels[client]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable: some wrapper we do not know
        return None
    channel = ScriptChannel(client) if _understood(client) else None
    _channels[client] = channel
    return channel


def _understood(client: Any) -> bool:
    if not isinstance(client, redis.Redis):
        return False
    if not _is_redis_py_execute_command(type(client).execute_command):
        return False
    if client.connection is not None:  # single_connection_client: it has its own lock
        return False
    if "EVALSHA" in client.response_callbacks or "EVAL" in client.response_callbacks:
        return False
    pool = client.connection_pool
    return isinstance(pool, redis.ConnectionPool) and getattr(pool, "cache", None) is None


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
    parts = [b"*%d\r\n" % len(command)]
    for index, arg in enumerate(command):
        if index == 0 and isinstance(arg, str):
            data = arg.encode()  # the command name: UTF-8 whatever the client's encoding
        elif isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode(encoding, errors)
        elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
            data = repr(arg).encode()
        elif isinstance(arg, (bytearray, memoryview)):
            data = bytes(arg)
        else:
            raise DataError(
                f"Invalid input of type: {type(arg).__name__!r} in {command[0]!r}. "
                "Convert to a bytes, str, int or float first."
            )
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class ScriptChannel:
    """Sends commands on connections borrowed from one client's pool, one call at a time."""

    def __init__(self, client: Any) -> None:
        self._pool = client.connection_pool
        kwargs = self._pool.connection_kwargs
        self._encoding: str = kwargs.get("encoding") or "utf-8"
        self._encoding_errors: str = kwargs.get("encoding_errors") or "strict"

    def execute(self, *command: Any) -> Any:
        """Send ``command`` and return its reply (as ``execute_command`` would for EVAL/EVALSHA)."""
        return self._round_trip(self._pack(command), lambda conn: conn.read_response())

    def execute_batch(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` at once and read every reply, in order (one round trip, like a
        non-transactional pipeline); error replies come back as exception objects."""

        def read_all(conn: Any) -> list[Any]:
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as error:
                    replies.append(error)
            return replies

        result: list[Any] = self._round_trip(b"".join(self._pack(c) for c in commands), read_all)
        return result

    def _pack(self, command: tuple[Any, ...]) -> bytes:
        return pack_command(command, self._encoding, self._encoding_errors)

    def _round_trip(self, packed: bytes, read: Callable[[Any], Any]) -> Any:
        """Write ``packed`` on a borrowed connection and ``read`` the reply, under its retry policy
        (a failed try disconnects; the next one reconnects as it sends), then give it back."""
        conn = self._pool.get_connection()
        try:

            def send_and_read() -> Any:
                conn.send_packed_command([packed])
                return read(conn)

            return conn.retry.call_with_retry(send_and_read, lambda _error: conn.disconnect())
        finally:
            self._pool.release(conn)
