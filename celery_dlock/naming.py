"""Lock names built from a function's call arguments (``"order:{order_id}"``).

Shared by the decorators (sync and asyncio) and the Celery layer. Templates are
checked against the function's signature when decorating, so a typo fails at
import time, not at the first call.
"""

from __future__ import annotations

import inspect
import string
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar, overload

from celery_dlock.keys import check_name
from celery_dlock.options import LockOptions


def default_name(func: Callable[..., Any]) -> str:
    """The module-qualified name of ``func``, e.g. ``"billing.tasks.charge"``."""
    module = getattr(func, "__module__", None) or "__main__"
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    return f"{module}.{qualname}"


def template_fields(template: str) -> list[str]:
    """The argument names a template refers to (``"a:{x.y}:{z[0]}"`` -> ``["x", "z"]``)."""
    fields = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"lock name template {template!r} is malformed: {exc}") from None
    for _, field, _, _ in parsed:
        if field is None:
            continue
        root = field.split(".", 1)[0].split("[", 1)[0]
        if not root or root.isdigit():
            raise ValueError(
                f"lock name template {template!r} must name arguments, like '{{order_id}}', "
                f"got the field {{{field}}}"
            )
        fields.append(root)
    return fields


class NameTemplate:
    """Formats a lock name from the bound arguments of a call to ``func``."""

    def __init__(self, template: str, func: Callable[..., Any]) -> None:
        self.template = template
        self.signature = inspect.signature(func)
        self.fields = template_fields(template)
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in self.signature.parameters.values())
        missing = [f for f in self.fields if f not in self.signature.parameters]
        if missing and not accepts_any:
            raise ValueError(
                f"lock name template {template!r} refers to {missing[0]!r}, which is not an "
                f"argument of {default_name(func)}{self.signature}"
            )

    @property
    def is_static(self) -> bool:
        return not self.fields

    def format(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        for param in self.signature.parameters.values():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                values.update(values.pop(param.name, {}))
        try:
            name = self.template.format(**values)
        except (KeyError, AttributeError, IndexError) as exc:
            raise ValueError(
                f"lock name template {self.template!r} cannot be filled from the call "
                f"arguments {sorted(values)}: {exc!r}"
            ) from None
        return check_name(name, parameter=f"lock name formatted from {self.template!r}")


def lock_name_for(
    func: Callable[..., Any], name: str | None
) -> Callable[[tuple[Any, ...], dict[str, Any]], str]:
    """How the decorators name the lock of a call to ``func``: ``name`` (fixed, or a
    template over its arguments), or the function's own dotted name."""
    if name is None:
        fixed = default_name(func)
        return lambda args, kwargs: fixed
    template = NameTemplate(name, func)
    if template.is_static:
        return lambda args, kwargs: name
    return template.format


F = TypeVar("F", bound=Callable[..., Any])


class LockDecorator(Protocol):
    """The type of ``distributed_lock_decorator`` (sync and asyncio): bare, or called."""

    @overload
    def __call__(self, name: F, /) -> F: ...
    @overload
    def __call__(self, name: str | None = None, redis: Any = None, **options: Any) -> Callable[[F], F]: ...


def bare_decoration(name: Any, redis: Any, options: Mapping[str, Any]) -> Callable[..., Any] | None:
    """The function a lock decorator was put on bare (``@distributed_lock_decorator``), or
    None once the decorator's own arguments are checked (bad options fail at decoration)."""
    if callable(name) and redis is None and not options:
        return name  # type: ignore[no-any-return]
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str (or omitted), got {type(name).__name__}: {name!r}")
    LockOptions.build("validation", **options)
    return None
