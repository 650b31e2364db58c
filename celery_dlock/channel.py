"""How the sync lock sends its scripts: over connections it keeps, not one checkout per command.

Acquire, release and the watchdog's batched renewals share these connections,
so a process that holds locks keeps one connection busy, not one per purpose.

redis-py's ``execute_command`` is correct for any command, and pays for that on
every call: a pool checkout under a lock (with a socket readiness check), a
retry wrapper, observability hooks, the response-callback lookup and a pool
check-in. For the lock's own scripts, on a plain ``redis.Redis`` client, that is
a third of the client CPU of an acquire+release pair. A :class:`ScriptChannel`
instead keeps a few connections it took from the client's own pool (so TLS,
auth, timeouts, health checks and RESP parsing stay redis-py's) and writes the
command and reads its reply on one of them directly.

What it keeps of redis-py's guarantees, and how:

* **Retries.** A command is retried under the connection's own retry policy,
  disconnecting before each new try, exactly as ``execute_command`` does (the
  lock scripts are written to be safe to run twice; see ``ACQUIRE``'s "already
  ours" path).
* **No stale reply.** A connection is put back only after its reply was read;
  any other outcome (an interrupt, an error) disconnects it.
* **No dead connection.** One left idle for more than :data:`IDLE_CHECK_AFTER`
  is checked before use, as the pool checks every connection it hands out: a
  server that closed it (its ``timeout`` setting, a restart) makes it readable,
  and it is reconnected instead of failing the command.
* **Fork safety.** A channel used in a new process forgets the parent's
  connections (never touching their sockets) and takes new ones.

Clients it does not understand get ``None`` from :func:`script_channel` and keep
using ``execute_command``: Redis Cluster, single-connection clients, RESP3,
client-side caching, a subclass that overrides ``execute_command`` (its
instrumentation is respected), or a custom EVALSHA response callback.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: Idle connections a channel keeps; more, in a burst of concurrent lock calls,
#: go back to the client's pool afterwards.
MAX_IDLE = 4
#: Seconds after which an idle kept connection is checked before use (the hot
#: path, one lock call after another, skips the readiness system call).
IDLE_CHECK_AFTER = 1.0

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
    if type(client).execute_command is not redis.Redis.execute_command:
        return False
    if client.connection is not None:  # single_connection_client: it has its own lock
        return False
    if "EVALSHA" in client.response_callbacks or "EVAL" in client.response_callbacks:
        return False
    pool = client.connection_pool
    if not isinstance(pool, redis.ConnectionPool) or getattr(pool, "cache", None) is not None:
        return False
    return str(pool.connection_kwargs.get("protocol") or 2) == "2"


def pack_command(command: Sequence[Any], encoding: str, errors: str) -> bytes:
    """One command as a RESP array of bulk strings (what redis-py's packer sends, for the
    argument types it accepts, without its per-argument encoder calls)."""
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        if isinstance(arg, bytes):
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
    """Connections of one client's pool kept by this process for the lock scripts."""

    def __init__(self, client: Any) -> None:
        self._pool = client.connection_pool
        self._pid = os.getpid()
        self._idle: list[tuple[Any, float]] = []  # (connection, when it was put back)
        kwargs = self._pool.connection_kwargs
        self._encoding: str = kwargs.get("encoding") or "utf-8"
        self._encoding_errors: str = kwargs.get("encoding_errors") or "strict"

    def _pack(self, command: tuple[Any, ...]) -> bytes:
        """``command`` in the Redis protocol, its arguments encoded as the client's encoder would."""
        return pack_command(command, self._encoding, self._encoding_errors)

    def execute(self, *command: Any) -> Any:
        """Send ``command`` and return its reply (as ``execute_command`` would for EVAL/EVALSHA)."""
        packed = self._pack(command)
        conn = self._checkout()

        def send_and_read() -> Any:
            conn.send_packed_command([packed])
            return conn.read_response()

        try:
            # The connection's own retry policy, as in execute_command: a failed
            # try disconnects, and the next one reconnects in send_command.
            reply = conn.retry.call_with_retry(send_and_read, lambda _error: conn.disconnect())
        except redis.ResponseError:
            self._checkin(conn)  # an error reply was read in full: the connection is clean
            raise
        except BaseException:
            self._discard(conn)  # failed or interrupted: its reply may still be on the wire
            raise
        self._checkin(conn)
        return reply

    def execute_batch(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` at once and read every reply, in order (one round trip, like a
        non-transactional pipeline); error replies come back as exception objects."""
        packed = b"".join(self._pack(command) for command in commands)
        conn = self._checkout()

        def send_and_read() -> list[Any]:
            conn.send_packed_command([packed])
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as error:
                    replies.append(error)
            return replies

        try:
            replies: list[Any] = conn.retry.call_with_retry(send_and_read, lambda _error: conn.disconnect())
        except BaseException:
            self._discard(conn)
            raise
        self._checkin(conn)
        return replies

    def _checkout(self) -> Any:
        if self._pid != os.getpid():
            # A forked child: the parent's connections are the parent's.
            self._idle = []
            self._pid = os.getpid()
        try:
            conn, since = self._idle.pop()
        except IndexError:
            return self._pool.get_connection()
        if time.monotonic() - since > IDLE_CHECK_AFTER:
            try:
                if conn.can_read():  # EOF or stray data: start afresh
                    conn.disconnect()
            except (RedisConnectionError, RedisTimeoutError, OSError):
                conn.disconnect()  # send_command connects it again
        return conn

    def _checkin(self, conn: Any) -> None:
        if conn.should_reconnect():  # the server announced maintenance on it
            conn.disconnect()
        if len(self._idle) < MAX_IDLE:
            self._idle.append((conn, time.monotonic()))
        else:
            self._pool.release(conn)

    def _discard(self, conn: Any) -> None:
        conn.disconnect()
        self._pool.release(conn)
