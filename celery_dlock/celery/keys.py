"""What a task run locks: the ``lock_key`` option, computed the same way at publish and in the worker.

A publisher holds Python objects (``(1, 2)``, ``UUID(...)``, ``datetime``,
``Decimal``); the worker holds what the serializer gave back (lists, and for
Celery's JSON either the same types or their string forms). Both sides first
bind the call to the task's signature (so ``f(1)``, ``f(x=1)`` and a default
``x=1`` are one call), then turn every value into a *canonical* JSON-able form
(tuples become lists, UUIDs/dates/Decimals become strings, dict keys become
strings as JSON makes them). Only that canonical form is hashed or formatted,
so both sides name the same lock.

Lock names never contain ``{`` or ``}`` (the core lock uses them as the Redis
Cluster hash tag): braces coming from argument values or task names are
escaped, and default keys are hashes that contain no argument value at all.
"""

from __future__ import annotations

import enum
import hashlib
import inspect
import json
import math
import string
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, time, timezone
from decimal import Decimal
from typing import Any

from celery_dlock.keys import MAX_NAME_LENGTH
from celery_dlock.naming import template_fields

TASK_ONLY = "task"


# -- canonical values --------------------------------------------------------------------


def canonical(value: Any, where: str = "argument") -> Any:
    """``value`` as plain JSON data that is identical before and after a serializer round trip.

    Raises ``TypeError`` naming ``where`` for values that have no stable form
    (arbitrary objects: their ``str()`` or ``repr()`` differs between the
    publisher and the worker). Use ``lock_key=[...]`` to leave such arguments
    out of the key, or a callable ``lock_key``.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, enum.Enum) and not isinstance(value, (int, str)):
        return canonical(value.value, where)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return str.__str__(value)  # the text itself, also for str-based enums
    if isinstance(value, (list, tuple)):
        return [canonical(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, Mapping):
        return {_canonical_dict_key(k, where): canonical(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, datetime):
        if value.tzinfo is not None and value.utcoffset() is not None:
            value = value.astimezone(timezone.utc)
        return value.isoformat()
    if isinstance(value, (date, time)):
        return value.isoformat()
    if isinstance(value, (Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"__bytes__": bytes(value).hex()}
    if isinstance(value, (set, frozenset)):
        items = [canonical(item, f"{where} item") for item in value]
        return sorted(items, key=canonical_json)
    reducer = getattr(value, "__json__", None)  # kombu's JSON hook: same form both sides
    if callable(reducer):
        return canonical(reducer(), where)
    raise TypeError(
        f"{where} has type {type(value).__name__}, which cannot be part of a lock key: "
        "its text form may differ between the publisher and the worker. Pass plain data "
        "(ids, strings, numbers), or choose the key yourself with lock_key=['arg', ...], "
        "a template like 'order:{order_id}', or a callable"
    )


# Exact types that canonical() returns unchanged (not their subclasses: bool, enums).
_ALREADY_CANONICAL = frozenset({int, str, type(None)})


def _canonical_dict_key(key: Any, where: str) -> str:
    # JSON turns every key into a string; do the same so {1: x} and {"1": x} agree.
    if isinstance(key, str):
        return str.__str__(key)
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key)
    if isinstance(key, (uuid.UUID, Decimal, date, time)):
        return str(canonical(key, where))
    raise TypeError(f"{where} has a dict key of type {type(key).__name__} ({key!r}); JSON keys are strings")


_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def canonical_json(value: Any) -> str:
    """The one textual form of canonical data: sorted keys, no spaces (``json.dumps`` with
    those options, from one encoder instead of a new one per call)."""
    return _CANONICAL_JSON.encode(value)


def digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def safe_name(name: str, where: str = "lock name") -> str:
    """Make ``name`` usable as a core lock name: braces escaped, length capped."""
    if not isinstance(name, str):
        raise TypeError(f"{where} must be a str, got {type(name).__name__}: {name!r}")
    if not name:
        raise ValueError(f"{where} must not be empty")
    name = name.replace("{", "%7B").replace("}", "%7D")
    if len(name) > MAX_NAME_LENGTH:
        tail = hashlib.sha256(name.encode()).hexdigest()
        name = f"{name[: MAX_NAME_LENGTH - len(tail) - 1]}~{tail}"
    return name


# -- binding a call to the task signature ---------------------------------------------


# A signature whose parameters are all positional-or-keyword (the usual task):
# their names, and the (name, default) pairs of those that have one.
PlainParameters = tuple[tuple[str, ...], tuple[tuple[str, Any], ...]]


def bind_call(
    signature: inspect.Signature,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    task_name: str,
    plain: PlainParameters | None = None,
) -> dict[str, Any]:
    """The call's arguments by parameter name, defaults applied.

    ``plain``: :func:`plain_parameters` of ``signature``, worked out once by the caller.
    """
    if plain is not None:
        arguments = _bind_plain(plain, args, kwargs)
        if arguments is not None:
            return arguments
    # Anything else (and every call that does not fit, so it gets inspect's error):
    # Signature.bind, ten times slower.
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(
            f"cannot compute the lock key of {task_name}: the arguments args={tuple(args)!r} "
            f"kwargs={dict(kwargs)!r} do not match {task_name}{signature}: {exc}"
        ) from None
    bound.apply_defaults()
    return dict(bound.arguments)


def plain_parameters(signature: inspect.Signature) -> PlainParameters | None:
    params = signature.parameters.values()
    if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
        return None
    defaults = tuple((p.name, p.default) for p in params if p.default is not p.empty)
    return tuple(p.name for p in params), defaults


def _bind_plain(
    plain: PlainParameters, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> dict[str, Any] | None:
    """What ``Signature.bind`` + ``apply_defaults`` give for a plain signature (None: call does not fit)."""
    names, defaults = plain
    if len(args) > len(names):
        return None
    given = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        if key in given or key not in names:
            return None
        given[key] = value
    if len(given) < len(names):
        for key, default in defaults:
            given.setdefault(key, default)
        if len(given) < len(names):
            return None  # a required argument is missing
    return {name: given[name] for name in names}


def _var_keyword(signature: inspect.Signature) -> str | None:
    for param in signature.parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            return param.name
    return None


def _flattened(signature: inspect.Signature, arguments: dict[str, Any]) -> dict[str, Any]:
    """Bound arguments with the ``**kwargs`` dict merged in (so keys may name its entries)."""
    values = dict(arguments)
    extra = _var_keyword(signature)
    if extra is not None:
        values.update(values.pop(extra, {}) or {})
    return values


# -- the kinds of lock_key -----------------------------------------------------------------


class LockKey:
    """Computes a run's lock name from its call arguments."""

    #: Whether the lock name alone tells one call (task and all its arguments) from
    #: every other: then it also names the call for covered-call notes (coalesce.py).
    identifies_call = False
    #: Whether the name also depends on the message (a callable taking ``request``):
    #: then the publisher decides it and sends it along (keyrequest.py).
    wants_request = False

    def name_for(self, args: Sequence[Any], kwargs: Mapping[str, Any], request: Any = None) -> str:
        """The lock name of a call; ``request`` (a ``LockKeyRequest``) only where ``wants_request``."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class ArgumentsKey(LockKey):
    """Task name + sha256 of the canonical arguments (all of them, or the named ones)."""

    def __init__(self, task_name: str, signature: inspect.Signature, names: tuple[str, ...] | None) -> None:
        self.task_name = task_name
        self.signature = signature
        self.plain = plain_parameters(signature)
        self.names = names
        self.identifies_call = names is None  # task name + every argument, defaults applied

    def name_for(self, args: Sequence[Any], kwargs: Mapping[str, Any], request: Any = None) -> str:
        arguments = bind_call(self.signature, args, kwargs, self.task_name, self.plain)
        if self.names is None:
            chosen = arguments
        else:
            values = _flattened(self.signature, arguments)
            missing = [n for n in self.names if n not in values]
            if missing:
                raise ValueError(
                    f"cannot compute the lock key of {self.task_name}: lock_key names the "
                    f"argument {missing[0]!r}, which this call does not pass"
                )
            chosen = {n: values[n] for n in self.names}
        data = {
            name: value
            if type(value) in _ALREADY_CANONICAL
            else canonical(value, f"argument {name!r} of {self.task_name}")
            for name, value in chosen.items()
        }
        return safe_name(f"{self.task_name}:{digest(data)}")

    def describe(self) -> str:
        if self.names is None:
            return "all arguments (hashed)"
        return f"arguments {list(self.names)} (hashed)"


class StaticKey(LockKey):
    """One lock for every call (``lock_key="task"``, or a template without fields)."""

    def __init__(self, name: str) -> None:
        self.name = safe_name(name)

    def name_for(self, args: Sequence[Any], kwargs: Mapping[str, Any], request: Any = None) -> str:
        return self.name

    def describe(self) -> str:
        return f"the fixed name {self.name!r}"


class TemplateKey(LockKey):
    """A readable name like ``"order:{order_id}"``, formatted from canonical argument values."""

    def __init__(self, template: str, task_name: str, signature: inspect.Signature) -> None:
        self.template = template
        self.task_name = task_name
        self.signature = signature
        self.plain = plain_parameters(signature)
        self.fields = template_fields(template)

    def name_for(self, args: Sequence[Any], kwargs: Mapping[str, Any], request: Any = None) -> str:
        arguments = bind_call(self.signature, args, kwargs, self.task_name, self.plain)
        values = _flattened(self.signature, arguments)
        prepared: dict[str, Any] = {}
        for name, value in values.items():
            try:
                prepared[name] = canonical(value, f"argument {name!r}")
            except TypeError:
                prepared[name] = value  # an object: the template may read an attribute of it
        try:
            name = string.Formatter().vformat(self.template, (), prepared)
        except (KeyError, AttributeError, IndexError, ValueError, TypeError) as exc:
            raise ValueError(
                f"cannot compute the lock key of {self.task_name}: template {self.template!r} "
                f"cannot be filled from the arguments {sorted(prepared)}: {exc!r}"
            ) from None
        return safe_name(name, f"lock name formatted from {self.template!r}")

    def describe(self) -> str:
        return f"template {self.template!r}"


class CallableKey(LockKey):
    """A user function ``(args, kwargs) -> str``, or ``(args, kwargs, request) -> str``.

    It is called with the arguments as received; the three-argument form (a third
    positional parameter, or one named ``request``) also gets a ``LockKeyRequest``.
    """

    def __init__(self, function: Callable[..., Any], task_name: str) -> None:
        self.function = function
        self.task_name = task_name
        self.request_by_keyword, self.wants_request = _request_parameter(function)

    def name_for(self, args: Sequence[Any], kwargs: Mapping[str, Any], request: Any = None) -> str:
        if not self.wants_request:
            name = self.function(tuple(args), dict(kwargs))
        elif request is None:
            raise TypeError(f"lock_key callable {self.function!r} of {self.task_name} needs the request")
        elif self.request_by_keyword:
            name = self.function(tuple(args), dict(kwargs), request=request)
        else:
            name = self.function(tuple(args), dict(kwargs), request)
        if not isinstance(name, str):
            raise TypeError(
                f"lock_key callable {self.function!r} of {self.task_name} must return a str, "
                f"got {type(name).__name__}: {name!r}"
            )
        return safe_name(name, f"lock name returned by {self.function!r}")

    def describe(self) -> str:
        return f"callable {getattr(self.function, '__qualname__', self.function)!r}"


def _request_parameter(function: Callable[..., Any]) -> tuple[bool, bool]:
    """(by keyword, wanted): whether ``function`` takes a request, and how to pass it."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # no signature to read (some builtins): the two-argument form
        return False, False
    positional = [
        p
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) >= 3:
        return False, True
    if any(p.name == "request" and p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters):
        return True, True
    return False, False


def build_lock_key(value: object, task_name: str, signature: inspect.Signature) -> LockKey:
    """Parse and check the ``lock_key`` option against the task's signature."""
    parameters = signature.parameters
    accepts_any_keyword = _var_keyword(signature) is not None
    if value is None:
        return ArgumentsKey(task_name, signature, None)
    if isinstance(value, str):
        if value == TASK_ONLY:
            return StaticKey(task_name)
        fields = template_fields(value)  # raises ValueError on a malformed template
        if not fields:
            return StaticKey(value)
        unknown = [f for f in fields if f not in parameters]
        if unknown and not accepts_any_keyword:
            raise ValueError(
                f"lock_key template {value!r} of {task_name} refers to {unknown[0]!r}, which is not "
                f"an argument of {task_name}{signature}"
            )
        return TemplateKey(value, task_name, signature)
    if isinstance(value, (list, tuple)):
        names = tuple(value)
        if not names:
            raise ValueError(
                f"lock_key of {task_name} must name at least one argument; use lock_key='task' "
                "for one lock per task"
            )
        for name in names:
            if not isinstance(name, str):
                raise TypeError(
                    f"lock_key of {task_name} must list argument names (str), got "
                    f"{type(name).__name__}: {name!r}"
                )
            if name not in parameters and not accepts_any_keyword:
                raise ValueError(
                    f"lock_key of {task_name} names {name!r}, which is not an argument of "
                    f"{task_name}{signature}"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"lock_key of {task_name} lists an argument twice: {list(names)}")
        return ArgumentsKey(task_name, signature, names)
    if callable(value):
        return CallableKey(value, task_name)
    raise TypeError(
        f"lock_key of {task_name} must be None (all arguments), 'task', a list of argument "
        f"names, a template like 'order:{{order_id}}' or a callable (args, kwargs[, request]) -> str; "
        f"got {type(value).__name__}: {value!r}"
    )
