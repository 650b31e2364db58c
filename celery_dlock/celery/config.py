"""App-wide settings of the Celery layer, read from ``app.conf`` (lower-case, ``dlock_`` prefix).

Shared by :mod:`celery_dlock.celery` (tasks) and :mod:`celery_dlock.beat`.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from celery.signals import import_modules

from celery_dlock.celery.errors import LockStoreNotConfigured
from celery_dlock.channel import dedicate_connection
from celery_dlock.connection import check_redis_url, client_options
from celery_dlock.keys import DEFAULT_PREFIX, check_prefix

# Broker URLs that name a Redis server the locks can live on too.
REDIS_BROKER_SCHEMES = ("redis://", "rediss://", "unix://", "redis+socket://", "sentinel://")
LOCK_URL_SCHEMES = ("redis://", "rediss://", "unix://", "sentinel://", "redis+socket://")


def setting(conf: Any, name: str, default: Any = None) -> Any:
    """``app.conf[name]`` (or ``default`` when unset or None); works on plain objects too."""
    try:
        value = conf.get(name, default)
    except AttributeError:
        value = getattr(conf, name, default)
    return default if value is None else value


@dataclass(frozen=True)
class LockStore:
    """Where an app's locks live, and the setting that says so (named in every error).

    ``factory``: ``dlock_redis_client``, a callable returning a redis-py client. Else
    ``url`` with its ``transport_options`` (Sentinel's ``master_name``, ...) and ``ssl``
    options (``broker_use_ssl``'s keys).
    """

    setting: str
    url: str | None = None
    transport_options: Mapping[str, Any] = field(default_factory=dict)
    ssl: Mapping[str, Any] | None = None
    factory: Callable[[], Any] | None = None

    def identity(self) -> tuple[Any, ...]:
        """Equal for stores that give the same client (one client per process and store)."""
        if self.factory is not None:
            return ("factory", id(self.factory))
        return ("url", self.url, repr(sorted(self.transport_options.items())), repr(self.ssl))

    def make_client(self) -> Any:
        import redis

        if self.factory is not None:
            return self.factory()
        assert self.url is not None
        if self.url.startswith("sentinel://"):
            return self._sentinel_master()
        options = {**client_options(), **dict(self.ssl or {})}
        return redis.Redis.from_url(_as_redis_py_url(self.url), **options)

    def _sentinel_master(self) -> Any:
        from redis.sentinel import Sentinel

        assert self.url is not None
        options = dict(self.transport_options)
        master_name = options.get("master_name")
        if not master_name:
            raise LockStoreNotConfigured(
                f"{self.setting} is a sentinel:// URL: set master_name in "
                f"{_transport_options_setting(self.setting)} (the Sentinel service to use)"
            )
        hosts: list[tuple[str, int]] = []
        password = username = None
        db = 0
        for part in self.url.split(";"):
            parsed = urlparse(part.strip())
            hosts.append((parsed.hostname or "localhost", parsed.port or 26379))
            password = password or (unquote(parsed.password) if parsed.password else None)
            username = username or (unquote(parsed.username) if parsed.username else None)
            if parsed.path.strip("/").isdigit():
                db = int(parsed.path.strip("/"))
        sentinel = Sentinel(
            hosts,
            sentinel_kwargs=options.get("sentinel_kwargs"),
            username=username,
            password=password,
            db=db,
            **{**client_options(), **dict(self.ssl or {})},
        )
        return sentinel.master_for(master_name)


def lock_store(conf: Any) -> LockStore:
    """The app's lock store: ``dlock_redis_client``, else ``dlock_redis_url``, else the
    broker's Redis server (``broker_url`` as Celery reads it, so also from the environment
    and Django settings). Any other broker and neither setting: LockStoreNotConfigured,
    never a guess."""
    factory = setting(conf, "dlock_redis_client")
    if factory is not None:
        return LockStore("dlock_redis_client", factory=_client_factory(factory))
    url = setting(conf, "dlock_redis_url")
    if url:
        return LockStore(
            "dlock_redis_url",
            url=_check_lock_url(url),
            transport_options=setting(conf, "dlock_redis_transport_options", {}),
            ssl=setting(conf, "dlock_redis_use_ssl"),
        )
    broker = _broker_url(conf)
    if broker.startswith(REDIS_BROKER_SCHEMES):
        return LockStore(
            "broker_url",
            url=broker if broker.startswith("sentinel://") else broker.split(";")[0].strip(),
            transport_options=setting(conf, "broker_transport_options", {}),
            ssl=_ssl_options(setting(conf, "broker_use_ssl")),
        )
    scheme = broker.split("://")[0] + "://" if "://" in broker else repr(broker) or "none"
    raise LockStoreNotConfigured(
        "celery-dlock has no lock store: set dlock_redis_url (a redis://, rediss://, unix:// or "
        "sentinel:// URL) or dlock_redis_client (a callable returning a redis-py client). "
        f"The broker ({scheme}) is not a Redis server the locks could share."
    )


def _broker_url(conf: Any) -> str:
    # The property, not conf.get(): Celery's broker_url reads CELERY_BROKER_URL too.
    broker = getattr(conf, "broker_url", None) if hasattr(conf, "broker_url") else setting(conf, "broker_url")
    if isinstance(broker, (list, tuple)):
        broker = broker[0] if broker else None
    return broker.strip() if isinstance(broker, str) else ""


def _check_lock_url(url: object) -> str:
    if not isinstance(url, str):
        raise TypeError(f"dlock_redis_url must be a str, got {type(url).__name__}: {url!r}")
    if not url.startswith(LOCK_URL_SCHEMES):
        raise ValueError(
            f"dlock_redis_url must start with redis://, rediss://, unix:// or sentinel://, got {url!r}"
        )
    return url


def _as_redis_py_url(url: str) -> str:
    """kombu's ``redis+socket:///path?virtual_host=N`` as redis-py's ``unix:///path?db=N``."""
    if not url.startswith("redis+socket://"):
        return check_redis_url(url, "dlock_redis_url")
    parsed = urlparse(url)
    query = parse_qs(parsed.query)
    db = (query.get("virtual_host") or query.get("db") or ["0"])[0]
    auth = f"{parsed.netloc}@" if "@" in parsed.netloc else ""
    return f"unix://{auth}{parsed.path}?db={db}"


def _ssl_options(options: Any) -> Mapping[str, Any] | None:
    """Celery's ``broker_use_ssl`` (a dict of redis-py's ssl_* names, or True) for the lock client."""
    if isinstance(options, Mapping):
        return {key: value for key, value in options.items() if key.startswith("ssl_")}
    return None


def _transport_options_setting(source: str) -> str:
    return "broker_transport_options" if source == "broker_url" else "dlock_redis_transport_options"


def _client_factory(value: Any) -> Callable[[], Any]:
    """``dlock_redis_client``: a callable, or a dotted path ("pkg.mod:func" or "pkg.mod.func") to one."""
    if isinstance(value, str):
        from celery.utils.imports import symbol_by_name

        try:
            value = symbol_by_name(value)
        except (ImportError, AttributeError, ValueError) as exc:
            raise LockStoreNotConfigured(f"dlock_redis_client={value!r} cannot be imported: {exc}") from exc
    if not callable(value):
        raise LockStoreNotConfigured(
            f"dlock_redis_client must be a callable returning a redis-py client (or a dotted path to one), "
            f"got {type(value).__name__}: {value!r}"
        )
    factory: Callable[[], Any] = value
    return factory


def lock_prefix(conf: Any) -> str:
    return check_prefix(setting(conf, "dlock_prefix", DEFAULT_PREFIX))


_apps_checked: weakref.WeakSet[Any] = weakref.WeakSet()  # lock store found at least once
_apps_watched: weakref.WeakSet[Any] = weakref.WeakSet()  # checked when a worker or beat starts


def check_lock_store(app: Any) -> None:
    """Raise LockStoreNotConfigured unless ``app`` has a lock store (cheap after the first success:
    a locked task's publish calls it)."""
    if app not in _apps_checked:
        lock_store(app.conf)
        _apps_checked.add(app)


def check_lock_store_at_start(app: Any) -> None:
    """Make a worker (or beat) of ``app`` fail at start when it has no lock store (the
    apps of locked tasks are found by themselves; install() names its app here)."""
    _apps_watched.add(app)


def _check_at_start(sender: Any = None, **_: Any) -> None:
    """Celery's import_modules, sent as a worker or beat starts: what a receiver raises
    stops the start (worker_init would only log it)."""
    app = sender
    if app is None:
        return
    if app in _apps_watched or any(getattr(task, "dlock_locked", False) for task in app.tasks.values()):
        lock_store(app.conf)


import_modules.connect(_check_at_start, weak=False)


_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


def redis_client_for_app(app: Any) -> Any:
    """One redis-py client per process and lock store for ``app`` (fork-safe: keyed by pid).

    Raises LockStoreNotConfigured (naming the setting) when the app has no lock store.
    The lock's scripts on it keep one connection
    (:func:`celery_dlock.channel.dedicate_connection`) instead of checking one out of
    the pool for each, which costs a pool process more CPU than the lock's own work
    does. A Celery pool process runs one task at a time, so nothing waits for that
    connection; with a thread pool, a thread that finds it busy borrows one from the
    pool. Other commands, pipelines and waiters' pub/sub use the pool.

    Every locked run asks for it, so the answer is remembered per app for as long as
    the settings that chose it are the same objects (see :func:`_store_settings_seen`).
    """
    seen = _store_settings_seen(app)
    remembered = _remembered.get(app) if seen is not None else None
    if remembered is not None and remembered[0] == seen:
        return remembered[1]
    client = _client_for(lock_store(app.conf))
    if seen is not None:
        _remembered[app] = (seen, client)
    return client


def _client_for(store: LockStore) -> Any:
    key = (os.getpid(), *store.identity())
    client = _clients.get(key)
    if client is not None:
        return client
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = store.make_client()
            dedicate_connection(client)  # before any other thread can see the client
            _clients[key] = client
        return client


#: The settings :func:`lock_store` reads.
STORE_SETTINGS = (
    "dlock_redis_client",
    "dlock_redis_url",
    "dlock_redis_transport_options",
    "dlock_redis_use_ssl",
    "broker_url",
    "broker_transport_options",
    "broker_use_ssl",
)

#: app -> (what _store_settings_seen saw, the client it got).
_remembered: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], Any]] = weakref.WeakKeyDictionary()


def _store_settings_seen(app: Any) -> tuple[Any, ...] | None:
    """What changes when the app's lock store may have changed: the process, the app's
    configuration object, and the store settings assigned at run time, which Celery
    keeps in ``conf.changes`` (a plain dict; settings from a config module or Django
    are fixed once the app is configured, and reloading them makes a new conf). Reading
    that dict is cheap; asking ``app.conf`` for an unset setting is not. None where
    ``conf`` is not Celery's: then the settings are read on every call.

    A setting's value is compared by identity: assign a new value, do not mutate one.
    """
    conf = app.conf
    changes = getattr(conf, "changes", None)
    if type(changes) is not dict:
        return None
    return (os.getpid(), conf, *[changes.get(name) for name in STORE_SETTINGS])
