"""``dedup_on_publish``: do not enqueue a call whose lock key is already queued or running.

Publishing first runs :data:`CLAIM_QUEUED` on two keys of the same lock (one
hash tag, one atomic step): the run lock itself and a *queued marker*
(``<lock key>:ext:queued``, value = the queued message's task id, with a lease of
its own: ``dedup_timeout`` plus any countdown/ETA, capped by ``expires``).

* lock held by a task run  -> return that run's ``AsyncResult``, publish nothing - unless
  the message is due later (countdown/ETA) or that run publishes it itself (a task that
  re-publishes itself: its successor, not a duplicate);
* marker held by another id -> return that message's ``AsyncResult``, publish nothing;
* otherwise                -> claim the marker for our task id and publish.

The marker is handed over when the run starts (deleted right after the run
lock is taken), re-claimed while a message of that id waits for a retry, and
dropped when the message is revoked or expires, is skipped, or fails for good.

What deduplicates: ``delay``, ``apply_async`` and ``signature(...).apply_async``
of a single task. What does not: ``app.send_task`` (it never calls the task
class), canvas members (groups, chords, chains, link callbacks: their ids are
fixed in advance by the canvas) and re-publications of the same task id (retries).
All of them are still protected by the *run* lock in the worker.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from celery.signals import task_revoked
from redis.exceptions import RedisError

from celery_dlock.celery.config import lock_prefix, redis_client_for_app
from celery_dlock.celery.keyrequest import decided_name, name_for_publish, name_for_run, with_name_header
from celery_dlock.celery.settings import TaskLockConfig
from celery_dlock.keys import LockKeys
from celery_dlock.lock import run_script
from celery_dlock.options import to_millis
from celery_dlock.scripts import Script

logger = logging.getLogger("celery_dlock.celery")

# Options that make a publish part of a canvas: its task id is already known to a
# group/chord/chain, so it must be published as is.
CANVAS_OPTIONS = ("link", "link_error", "chain", "chord", "group_id")

# KEYS[1] run lock, KEYS[2] queued marker; ARGV[1] task id, ARGV[2] marker lease ms,
# ARGV[3] '1' when the message is not a duplicate of a running holder whatever it is
# (it is due later, or the holder itself publishes it).
# Returns {0, id} when the caller claimed the marker (publish), {1, id} when another
# message is queued, {2, id} when a task run with another id holds the lock.
CLAIM_QUEUED = Script(
    "claim_queued",
    """
local queued = redis.call('GET', KEYS[2])
if queued and queued ~= ARGV[1] then
  return {1, queued}
end
local holder = ARGV[3] ~= '1' and redis.call('GET', KEYS[1])
if holder then
  local bar = string.find(holder, '|', 1, true)
  if bar then
    local ok, owner = pcall(cjson.decode, string.sub(holder, bar + 1))
    if ok and type(owner) == 'table' and type(owner[1]) == 'string'
       and owner[1] ~= '' and owner[1] ~= ARGV[1] then
      return {2, owner[1]}
    end
  end
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {0, ARGV[1]}
""",
)

# KEYS[1] queued marker; ARGV[1] task id. Deletes the marker if it is this id's.
DROP_QUEUED = Script(
    "drop_queued",
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""",
)

# KEYS[1] queued marker; ARGV[1] task id, ARGV[2] lease ms.
# Marks this id as queued again (a retry is on its way) unless another id is queued.
REMARK_QUEUED = Script(
    "remark_queued",
    """
local queued = redis.call('GET', KEYS[1])
if not queued or queued == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
""",
)

_internal_publish: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "dlock_internal_publish", default=False
)


@contextmanager
def publishing_internally() -> Iterator[None]:
    """Publishes made inside (lock retries) never deduplicate against anything."""
    token = _internal_publish.set(True)
    try:
        yield
    finally:
        _internal_publish.reset(token)


def marker_key(keys: LockKeys) -> str:
    return keys.extension("queued")


def _seconds_until(when: Any) -> float:
    if isinstance(when, str):
        try:
            when = datetime.fromisoformat(when)
        except ValueError:
            return 0.0
    if isinstance(when, datetime):
        now = datetime.now(timezone.utc) if when.tzinfo is not None else datetime.now()
        return max(0.0, (when - now).total_seconds())
    return 0.0


def marker_lease(config: TaskLockConfig, options: Mapping[str, Any]) -> float:
    """How long the queued marker lives: dedup_timeout after the message becomes due, within ``expires``."""
    delay = 0.0
    countdown = options.get("countdown")
    if isinstance(countdown, (int, float)) and not isinstance(countdown, bool):
        delay = max(0.0, float(countdown))
    elif options.get("eta") is not None:
        delay = _seconds_until(options["eta"])
    lease = config.dedup_timeout + delay
    expires = options.get("expires")
    if isinstance(expires, (int, float)) and not isinstance(expires, bool):
        lease = min(lease, max(float(expires), 0.001) + 1.0)
    elif expires is not None:
        lease = min(lease, _seconds_until(expires) + 1.0)
    return max(lease, 0.001)


def _due_later(options: Mapping[str, Any]) -> bool:
    countdown = options.get("countdown")
    if isinstance(countdown, (int, float)) and not isinstance(countdown, bool):
        return countdown > 0
    return options.get("eta") is not None and _seconds_until(options["eta"]) > 0


def _published_by_the_holder(keys: LockKeys) -> bool:
    """Whether the run publishing this message holds its lock (a task re-publishing itself:
    the message is its successor, never a duplicate of it)."""
    from celery_dlock.celery.runner import current_lock

    running = current_lock()
    return running is not None and running.keys.lock == keys.lock


def should_deduplicate(config: TaskLockConfig, options: Mapping[str, Any], app: Any) -> bool:
    if not config.dedup_on_publish or _internal_publish.get():
        return False
    if app.conf.task_always_eager:
        return False
    return not any(options.get(name) for name in CANVAS_OPTIONS)


def publish(
    task: Any,
    config: TaskLockConfig,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    task_id: str | None,
    options: Mapping[str, Any],
    send: Callable[[str | None, Mapping[str, Any]], Any],
    canvas: Mapping[str, Any] | None = None,
) -> Any:
    """Publish a locked task's message through ``send(task_id, options)``.

    A key that depends on the message is decided here and sent along (keyrequest.py);
    with ``dedup_on_publish`` nothing is sent while the same call is queued or running.
    ``canvas``: the ``link``/``link_error`` options if the caller passes them apart.
    """
    from celery.utils import uuid as new_task_id

    name = None
    if config.key.wants_request:
        # A re-publication of a message (a lock retry, self.retry()) keeps the name decided
        # for it; a new message gets one now.
        name = decided_name(options)
        if name is None:
            task_id = task_id or new_task_id()
            name = name_for_publish(task, config, task_id, args or (), kwargs or {}, options)
            options = with_name_header(options, name)
    if not should_deduplicate(config, {**options, **(canvas or {})}, task.app):
        return send(task_id, options)
    task_id = task_id or new_task_id()
    if name is None:
        name = config.key.name_for(args or (), kwargs or {})
    chosen_id = task_id
    return publish_once(
        task, config, redis_client_for_app(task.app), name, task_id, options, lambda: send(chosen_id, options)
    )


def publish_once(
    task: Any,
    config: TaskLockConfig,
    client: Any,
    name: str,
    task_id: str,
    options: Mapping[str, Any],
    publish: Callable[[], Any],
) -> Any:
    """Publish through ``publish()`` unless the call named ``name`` is queued or running."""
    keys = LockKeys.for_name(name, config.prefix)
    marker = marker_key(keys)
    lease_ms = to_millis(marker_lease(config, options))
    after_the_run = b"1" if _due_later(options) or _published_by_the_holder(keys) else b"0"
    try:
        status, existing = run_script(
            client, CLAIM_QUEUED, [keys.lock, marker], [task_id, lease_ms, after_the_run]
        )
    except RedisError as exc:
        # Fail open: the run lock in the worker still guarantees one run at a time.
        logger.warning(
            "dedup_on_publish of %s skipped (Redis error: %r); publishing %s", task.name, exc, task_id
        )
        return publish()
    existing = existing.decode() if isinstance(existing, bytes) else str(existing)
    if int(status) != 0:
        state = "queued" if int(status) == 1 else "running"
        logger.info(
            "dedup_on_publish: %s with lock key %r is already %s as %s; not publishing another",
            task.name,
            name,
            state,
            existing,
        )
        return task.AsyncResult(existing)
    try:
        return publish()
    except BaseException:
        drop_queued(client, keys, task_id)
        raise


def drop_queued(client: Any, keys: LockKeys, task_id: str) -> None:
    """Remove the queued marker if it names ``task_id`` (errors are logged: it expires anyway)."""
    try:
        run_script(client, DROP_QUEUED, [marker_key(keys)], [task_id])
    except RedisError as exc:
        logger.warning("could not drop the queued marker of %r for %s: %r", keys.lock, task_id, exc)


def remark_queued(client: Any, keys: LockKeys, task_id: str, seconds: float) -> None:
    try:
        run_script(client, REMARK_QUEUED, [marker_key(keys)], [task_id, to_millis(seconds)])
    except RedisError as exc:
        logger.warning("could not mark %s as queued under %r: %r", task_id, keys.lock, exc)


@dataclass(frozen=True)
class QueuedMarker:
    """A queued marker: the lock name of the call, the task id of its queued message, and
    the seconds left of its lease (None: no expiry)."""

    name: str
    task_id: str
    expires_in: float | None


MARKER_SUFFIX = ":ext:queued"


def queued_markers(app: Any, match: str = "*") -> list[QueuedMarker]:
    """The queued markers of ``app`` whose lock name matches the glob ``match``.

    A marker blocks new publishes of its call until its message runs, is revoked or
    expires - or its lease (``dedup_timeout`` after the message is due) ends. A message
    that vanished (a purged queue, lost broker data) leaves its marker until then:
    list them here and remove one with :func:`clear_queued_marker`. Uses ``SCAN`` (never
    ``KEYS``); a Redis Cluster client scans every primary.
    """
    client = redis_client_for_app(app)
    prefix = lock_prefix(app.conf)
    found: list[QueuedMarker] = []
    for raw in client.scan_iter(match=f"{prefix}{{{match}}}{MARKER_SUFFIX}", count=1000):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        name = key[len(prefix) + 1 : -len(MARKER_SUFFIX) - 1]
        value = client.get(key)
        if value is None:
            continue  # ended meanwhile
        ttl_ms = client.pttl(key)
        found.append(
            QueuedMarker(
                name=name,
                task_id=value.decode() if isinstance(value, bytes) else str(value),
                expires_in=ttl_ms / 1000 if ttl_ms >= 0 else None,
            )
        )
    return sorted(found, key=lambda marker: marker.name)


def clear_queued_marker(app: Any, name: str) -> bool:
    """Remove the queued marker of the call whose lock name is ``name``; True if there was one.

    The next publish of that call is then published (its run lock still protects it)."""
    keys = LockKeys.for_name(name, lock_prefix(app.conf))
    return bool(redis_client_for_app(app).delete(marker_key(keys)))


def _drop_marker_of_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    """A message revoked or expired before it ran will never hand its marker over: drop it."""
    config = getattr(sender, "_dlock_config", None)
    if config is None or not config.dedup_on_publish or request is None:
        return
    try:
        name = name_for_run(sender, config, request.args or (), request.kwargs or {}, request)
        client = redis_client_for_app(sender.app)
    except Exception as exc:
        logger.warning("cannot drop the queued marker of revoked %s[%s]: %r", sender.name, request.id, exc)
        return
    drop_queued(client, LockKeys.for_name(name, config.prefix), str(request.id))


task_revoked.connect(_drop_marker_of_revoked, weak=False)
