"""What a ``lock_key`` callable that also takes the request sees: :class:`LockKeyRequest`.

``lock_key=lambda args, kwargs, request: f"tenant:{request.headers['tenant']}"``

The publisher decides the lock name and sends it with the message (header
``dlock_lock_name``); the worker locks exactly that name and never computes it again.
So a key built from routing or headers names the same lock for ``dedup_on_publish``,
for the run, for a lock retry and for the clean-up after a dead pool process.

A message that carries no decided name (sent with ``app.send_task()`` by name, or by
another producer) is named in the worker, from what the message says: the same fields,
read from the received request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery_dlock.celery.settings import TaskLockConfig

#: Message header carrying the lock name the publisher decided.
NAME_HEADER = "dlock_lock_name"

#: Message properties a worker request also shows as attributes (never custom headers).
_MESSAGE_PROPERTIES = frozenset(
    {
        "application_headers",
        "content_encoding",
        "content_type",
        "correlation_id",
        "delivery_mode",
        "message_id",
        "priority",
        "reply_to",
        "timestamp",
    }
)
#: Celery's own protocol-2 headers, used if the app cannot tell (see _celery_headers).
_KNOWN_CELERY_HEADERS = frozenset(
    {
        "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
        "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin",
        "ignore_result", "replaced_task_nesting", "stamped_headers", "stamps",
    }
)  # fmt: skip


@dataclass(frozen=True)
class LockKeyRequest:
    """The message a lock name is computed for, the same at publish and in the worker.

    ``queue``: the queue the message is routed to (after ``task_routes``); ``headers``:
    the custom headers given to ``apply_async(headers=...)``.
    """

    task: str
    id: str | None = None
    queue: str | None = None
    routing_key: str | None = None
    priority: int | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)


# -- at publish -----------------------------------------------------------------------------

#: Routing options a task class may set as attributes (Celery merges them into every publish).
_ROUTING_ATTRIBUTES = ("queue", "routing_key", "exchange", "priority")


def request_for_publish(
    task: Any, task_id: str | None, args: Sequence[Any], kwargs: Mapping[str, Any], options: Mapping[str, Any]
) -> LockKeyRequest:
    """The request a publish with these ``apply_async`` options will become."""
    merged = dict(options)
    for name in _ROUTING_ATTRIBUTES:
        value = getattr(task, name, None)
        if value is not None and merged.get(name) is None:
            merged[name] = value
    # The router resolves the queue as send_task will (it pops 'queue': give it a copy).
    routed = task.app.amqp.router.route(dict(merged), task.name, args, kwargs)
    queue = routed.get("queue")
    routing_key = routed.get("routing_key") or getattr(queue, "routing_key", None)
    headers = {k: v for k, v in (options.get("headers") or {}).items() if not str(k).startswith("dlock_")}
    return LockKeyRequest(
        task=task.name,
        id=task_id,
        queue=getattr(queue, "name", None) or (queue if isinstance(queue, str) else None),
        routing_key=routing_key,
        priority=merged.get("priority"),
        headers=headers,
    )


def name_for_publish(
    task: Any,
    config: TaskLockConfig,
    task_id: str | None,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    options: Mapping[str, Any],
) -> str:
    request = request_for_publish(task, task_id, args, kwargs, options) if config.key.wants_request else None
    return config.key.name_for(args, kwargs, request)


def decided_name(options: Mapping[str, Any]) -> str | None:
    """The lock name already decided for a message being published again, if any."""
    value = (options.get("headers") or {}).get(NAME_HEADER)
    return value if isinstance(value, str) and value else None


def with_name_header(options: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``options`` whose ``headers`` also carry the decided lock name."""
    return {**options, "headers": {**(options.get("headers") or {}), NAME_HEADER: name}}


# -- in the worker --------------------------------------------------------------------------


def name_for_run(
    task: Any, config: TaskLockConfig, args: Sequence[Any], kwargs: Mapping[str, Any], request: Any
) -> str:
    """The lock name of a received message: the publisher's decision if it sent one.

    ``request``: the running task's ``task.request``, or the worker's ``Request``.
    """
    if not config.key.wants_request:
        return config.key.name_for(args, kwargs)
    decided = message_header(request, NAME_HEADER)
    if isinstance(decided, str) and decided:
        return decided
    return config.key.name_for(args, kwargs, request_for_run(task, request))


def request_for_run(task: Any, request: Any) -> LockKeyRequest:
    """What a received message (that carries no decided name) says about itself."""
    delivery_info = getattr(request, "delivery_info", None) or {}
    routing_key = delivery_info.get("routing_key")
    exchange = delivery_info.get("exchange")
    return LockKeyRequest(
        task=task.name,
        id=getattr(request, "id", None),
        queue=_queue_named_by(task.app, exchange, routing_key),
        routing_key=routing_key,
        priority=delivery_info.get("priority"),
        headers=_custom_headers(task.app, request),
    )


def message_header(request: Any, name: str) -> Any:
    """A header of the message behind ``request`` (a task's request or the worker's Request)."""
    for source in (getattr(request, "request_dict", None), vars(request), getattr(request, "headers", None)):
        if isinstance(source, Mapping) and source.get(name) is not None:
            return source[name]
    return None


def _queue_named_by(app: Any, exchange: str | None, routing_key: str | None) -> str | None:
    """The app queue a message with this exchange and routing key was routed to."""
    if routing_key is None:
        return None
    for queue in app.amqp.queues.values():
        queue_exchange = getattr(getattr(queue, "exchange", None), "name", None)
        if queue.routing_key == routing_key and (not exchange or queue_exchange == exchange):
            return str(queue.name)
    return str(routing_key)


def _custom_headers(app: Any, request: Any) -> dict[str, Any]:
    """The headers of the message that are neither Celery's own nor the request's fields."""
    source = getattr(request, "request_dict", None)
    if not isinstance(source, Mapping):
        source = vars(request)
    from celery.app.task import Context

    reserved = _celery_headers(app) | _MESSAGE_PROPERTIES
    custom = {
        key: value
        for key, value in source.items()
        if isinstance(key, str)
        and not key.startswith(("_", "dlock_"))
        and key not in reserved
        and not hasattr(Context, key)
    }
    headers = getattr(request, "headers", None)
    if isinstance(headers, Mapping):  # Celery versions that keep custom headers here
        custom.update({k: v for k, v in headers.items() if not str(k).startswith("dlock_")})
    return custom


_protocol_headers: frozenset[str] | None = None


def _celery_headers(app: Any) -> frozenset[str]:
    """The names of Celery's own message headers, read from the app's message factory.

    Falls back to the names known today if that factory's interface differs.
    """
    global _protocol_headers
    if _protocol_headers is None:
        try:
            message = app.amqp.as_task_v2("0", "celery_dlock.probe")
            _protocol_headers = frozenset(message.headers) | _KNOWN_CELERY_HEADERS
        except Exception:
            _protocol_headers = _KNOWN_CELERY_HEADERS
    return _protocol_headers
