"""Building a default Redis client from the environment, and naming a client's server in errors.

Shared by the sync and asyncio drivers; no I/O."""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any
from urllib.parse import quote

from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from celery_dlock.errors import LockBackendUnavailable, LockError

logger = logging.getLogger("celery_dlock")

DEFAULT_SOCKET_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0


def redis_url_from_env() -> str:
    """The Redis URL the default client connects to.

    ``REDIS_URL`` wins; otherwise ``REDIS_HOST`` (localhost), ``REDIS_PORT``
    (6379), ``REDIS_DB`` (0) and ``REDIS_PASSWORD`` (none).
    """
    url = os.environ.get("REDIS_URL")
    if url:
        return url
    host = os.environ.get("REDIS_HOST", "localhost")
    port = os.environ.get("REDIS_PORT", "6379")
    db = os.environ.get("REDIS_DB", "0")
    if not port.isdigit():
        raise ValueError(f"REDIS_PORT must be a port number, got {port!r}")
    if not db.isdigit():
        raise ValueError(f"REDIS_DB must be a database number, got {db!r}")
    password = os.environ.get("REDIS_PASSWORD")
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{host}:{port}/{db}"


def check_redis_url(url: object, parameter: str = "url") -> str:
    if not isinstance(url, str):
        raise TypeError(f"{parameter} must be a str, got {type(url).__name__}: {url!r}")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"{parameter} must start with redis://, rediss:// or unix://, got {url!r}")
    return url


def client_options() -> dict[str, Any]:
    """Timeouts for default clients, so a dead network gives an error instead of a hang."""
    return {
        "socket_timeout": DEFAULT_SOCKET_TIMEOUT,
        "socket_connect_timeout": DEFAULT_CONNECT_TIMEOUT,
        "health_check_interval": 30,
    }


def describe_server(client: Any) -> str:
    """``host:port`` (or socket path, or cluster nodes) of a redis-py client, for messages."""
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if isinstance(kwargs, dict):
        if kwargs.get("path"):
            return f"unix:{kwargs['path']}"
        return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
    nodes = getattr(client, "startup_nodes", None)
    if nodes:
        return ",".join(f"{n.host}:{n.port}" for n in nodes)
    return repr(client)


def notifier_key(client: Any) -> tuple[Any, ...]:
    """Clients that reach the same server (pub/sub ignores the db) share one subscription."""
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if not isinstance(kwargs, dict):
        return ("client", id(client))
    return (
        type(pool).__name__,
        # A Sentinel pool resolves its master at connect time: its host is not in the
        # kwargs, its service name (and its Sentinel set) tells masters apart.
        getattr(pool, "service_name", None),
        id(getattr(pool, "sentinel_manager", None)),
        getattr(pool, "connection_class", None),
        kwargs.get("host"),
        kwargs.get("port"),
        kwargs.get("path"),
        kwargs.get("username"),
        kwargs.get("password"),
    )


# -- server settings that break leases -------------------------------------------------

#: The only eviction policy under which Redis never deletes a lease or a fence counter.
SAFE_EVICTION_POLICY = "noeviction"


def eviction_warning(server: str, policy: str) -> str | None:
    """The warning to log for a server's ``maxmemory-policy``, or None when it is safe."""
    if policy == SAFE_EVICTION_POLICY:
        return None
    return (
        f"Redis at {server} has maxmemory-policy {policy!r}: under memory pressure it may evict "
        "a held lock (a second holder can then acquire) or a fence counter (fences restart). "
        f"Set `maxmemory-policy {SAFE_EVICTION_POLICY}` (CONFIG SET, or redis.conf)."
    )


def report_eviction_policy(client: Any, reply: Any, error: BaseException | None) -> None:
    """Log what a ``CONFIG GET maxmemory-policy`` on ``client`` found: a warning for a policy
    that may evict locks; a debug line when CONFIG was refused (managed Redis, an ACL)."""
    server = describe_server(client)
    if error is not None:
        logger.debug("maxmemory-policy of %s not checked: %r", server, error)
        return
    policy = policy_from_reply(reply)
    warning = eviction_warning(server, policy) if policy else None
    if warning:
        logger.warning(warning)


def policy_from_reply(reply: Any) -> str | None:
    """The policy in a ``CONFIG GET maxmemory-policy`` reply (a dict, a flat list, or bytes)."""
    if isinstance(reply, dict):
        values = list(reply.values())
    elif isinstance(reply, (list, tuple)):
        values = list(reply[1::2])
    else:
        return None
    if not values:
        return None
    value = values[0]
    return value.decode() if isinstance(value, bytes) else str(value)


_seen_clients: weakref.WeakSet[Any] = weakref.WeakSet()


def first_sight(client: Any) -> bool:
    """True the first time a lock of this process uses ``client``: time to check its server once."""
    try:
        if client in _seen_clients:
            return False
        _seen_clients.add(client)
    except TypeError:  # not weak-referenceable: not checked
        return False
    return True


def reject_foreign_client(client: object) -> None:
    """Clients of redis-py forks (valkey-py) raise their own exception classes, which the
    lock cannot tell apart (a lost script cache, a timeout, a refused login): refuse them."""
    module = type(client).__module__.split(".", 1)[0]
    if module == "valkey":
        raise TypeError(
            f"redis must be a redis-py client; valkey-py clients are not supported (got {client!r}). "
            "redis-py's clients work with Valkey servers: redis.Redis.from_url('redis://<valkey host>')"
        )


def backend_error(client: Any, action: str, name: str, exc: BaseException) -> LockError:
    """Turn a redis-py error into ours, naming the server and what we were doing."""
    where = describe_server(client)
    if isinstance(exc, AuthenticationError):
        return LockError(f"cannot {action} lock {name!r}: Redis at {where} refused the credentials ({exc})")
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        return LockBackendUnavailable(
            f"cannot {action} lock {name!r}: Redis at {where} is unreachable ({exc})"
        )
    return LockError(f"cannot {action} lock {name!r}: Redis at {where} answered {exc}")
