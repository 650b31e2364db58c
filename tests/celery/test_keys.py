"""Lock keys: canonical forms survive Celery's serializers; every lock_key kind; clear errors."""

from __future__ import annotations

import datetime as dt
import enum
import inspect
import uuid
from decimal import Decimal
from typing import Any

import pytest
from kombu.serialization import dumps, loads

from celery_dlock.celery.keys import build_lock_key, canonical, safe_name
from celery_dlock.keys import MAX_NAME_LENGTH, check_name


class Color(str, enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


VALUES: list[Any] = [
    (1, 2, (3, [4, (5,)])),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    dt.datetime(2024, 1, 2, 3, 4, 5, 678901),
    dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
    dt.date(2024, 1, 2),
    dt.time(3, 4, 5),
    Decimal("10.50"),
    {"b": 1, "a": (2, 3), 7: "int key", None: "none key", True: "bool key"},
    b"bytes \x00\xff",
    "text ünïcode {braces}",
    1.5,
    True,
    None,
    Color.RED,
    Level.HIGH,
]


def round_trip(value: Any, serializer: str) -> Any:
    content_type, encoding, data = dumps(value, serializer=serializer)
    return loads(data, content_type, encoding, accept={content_type})


@pytest.mark.parametrize("serializer", ["json", "pickle"])
@pytest.mark.parametrize("value", VALUES, ids=[type(v).__name__ + str(i) for i, v in enumerate(VALUES)])
def test_canonical_form_is_the_same_after_the_serializer_round_trip(value: Any, serializer: str) -> None:
    assert canonical(round_trip(value, serializer)) == canonical(value)


def test_equal_instants_in_other_time_zones_are_one_key() -> None:
    utc = dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc)
    paris = utc.astimezone(dt.timezone(dt.timedelta(hours=1)))
    assert canonical(utc) == canonical(paris)
    assert canonical(utc) != canonical(utc.replace(tzinfo=None))  # naive is another value


def test_objects_without_a_stable_form_are_rejected_with_the_argument_named() -> None:
    class Order:
        pass

    def task(order: Any) -> None: ...

    key = build_lock_key(None, "shop.charge", inspect.signature(task))
    with pytest.raises(TypeError, match=r"argument 'order' of shop\.charge has type Order"):
        key.name_for((Order(),), {})


def test_default_key_binds_positional_keyword_and_defaults() -> None:
    def task(a: int, b: Any = (1, 2), *, c: str = "x") -> None: ...

    key = build_lock_key(None, "t", inspect.signature(task))
    name = key.name_for((1,), {})
    assert name == key.name_for((), {"a": 1}) == key.name_for((1, [1, 2]), {"c": "x"})
    assert name != key.name_for((2,), {})
    assert name != key.name_for((1,), {"c": "y"})
    assert name.startswith("t:") and len(name) == 2 + 64


def test_default_key_of_another_task_differs() -> None:
    def task(a: int) -> None: ...

    sig = inspect.signature(task)
    first, second = build_lock_key(None, "t1", sig), build_lock_key(None, "t2", sig)
    assert first.name_for((1,), {}) != second.name_for((1,), {})


def test_arguments_that_do_not_fit_the_signature_give_a_clear_error() -> None:
    def task(a: int) -> None: ...

    with pytest.raises(TypeError, match=r"do not match t\(a.*too many positional"):
        build_lock_key(None, "t", inspect.signature(task)).name_for((1, 2), {})


def test_listed_arguments_key_uses_only_those() -> None:
    def task(order_id: int, note: str = "", **extra: Any) -> None: ...

    key = build_lock_key(["order_id", "region"], "t", inspect.signature(task))
    assert key.name_for((5, "a"), {"region": "eu"}) == key.name_for((5,), {"note": "b", "region": "eu"})
    assert key.name_for((5,), {"region": "eu"}) != key.name_for((5,), {"region": "us"})
    with pytest.raises(ValueError, match="'region', which this call does not pass"):
        key.name_for((5,), {})


def test_template_key_is_readable_and_canonical() -> None:
    def task(order_id: Any, when: Any = None) -> None: ...

    key = build_lock_key("order:{order_id}:{when}", "t", inspect.signature(task))
    moment = dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc)
    assert key.name_for((42,), {"when": moment}) == "order:42:2024-01-01T12:00:00+00:00"
    assert key.name_for((42, moment.isoformat()), {}) == key.name_for((42,), {"when": moment})
    assert key.name_for(((1, 2),), {}) == key.name_for(([1, 2],), {}) == "order:[1, 2]:None"


def test_braces_from_values_and_task_names_are_escaped() -> None:
    def task(x: str) -> None: ...

    name = build_lock_key("k:{x}", "t", inspect.signature(task)).name_for(("{evil}",), {})
    assert name == "k:%7Bevil%7D"
    check_name(name)
    static = build_lock_key("task", "weird{name}", inspect.signature(task))
    assert static.name_for(("a",), {}) == "weird%7Bname%7D"


def test_very_long_names_are_capped_with_a_hash() -> None:
    long = "x" * (MAX_NAME_LENGTH * 2)
    capped = safe_name(long)
    assert len(capped) <= MAX_NAME_LENGTH and check_name(capped)
    assert capped != safe_name(long + "y")


def test_callable_key_gets_the_arguments_and_must_return_text() -> None:
    def task(a: int) -> None: ...

    key = build_lock_key(lambda args, kwargs: f"user:{kwargs.get('a', args[0] if args else None)}", "t",
                         inspect.signature(task))
    assert key.name_for((3,), {}) == key.name_for((), {"a": 3}) == "user:3"
    bad = build_lock_key(lambda args, kwargs: 7, "t", inspect.signature(task))
    with pytest.raises(TypeError, match="must return a str, got int: 7"):
        bad.name_for((1,), {})


@pytest.mark.parametrize(
    "value, error, message",
    [
        (5, TypeError, "lock_key of t must be None"),
        ([], ValueError, "must name at least one argument"),
        (["nope"], ValueError, "names 'nope', which is not an argument"),
        ([1], TypeError, "must list argument names"),
        (["a", "a"], ValueError, "lists an argument twice"),
        ("order:{nope}", ValueError, "refers to 'nope', which is not an argument"),
        ("order:{0}", ValueError, "must name arguments"),
        ("order:{a", ValueError, "malformed"),
    ],
)
def test_bad_lock_key_values_are_rejected_clearly(value: Any, error: type[Exception], message: str) -> None:
    def task(a: int) -> None: ...

    with pytest.raises(error, match=message):
        build_lock_key(value, "t", inspect.signature(task))


def _plain(a: Any, b: Any, c: Any = 3, d: Any = None) -> None: ...


def _one(a: Any) -> None: ...


def _none() -> None: ...


def _rest(a: Any, *args: Any, b: Any = 1, **kwargs: Any) -> None: ...


@pytest.mark.parametrize("function", [_plain, _one, _none, _rest])
def test_binding_a_call_agrees_with_inspect_for_every_shape(function: Any) -> None:
    """The fast binder for plain signatures gives exactly Signature.bind + apply_defaults (or its error)."""
    import itertools

    from celery_dlock.celery.keys import bind_call, plain_parameters

    signature = inspect.signature(function)
    plain = plain_parameters(signature)
    assert (plain is None) == (function is _rest)
    names = [*signature.parameters, "unknown"]
    for positional in range(6):
        for count in range(4):
            for keywords in itertools.combinations(names, count):
                args, kwargs = list(range(positional)), {k: f"kw-{k}" for k in keywords}
                try:
                    bound = signature.bind(*args, **kwargs)
                    bound.apply_defaults()
                    expected: Any = list(bound.arguments.items())
                except TypeError:
                    expected = TypeError
                try:
                    got: Any = list(bind_call(signature, args, kwargs, "t", plain).items())
                except TypeError:
                    got = TypeError
                assert got == expected, (args, kwargs)


def test_the_owner_suffix_is_the_compact_json_of_who_holds_the_lock() -> None:
    """Workers of earlier versions wrote it with json.dumps: a main process must match either."""
    import json

    from celery_dlock.celery.tasklock import Owner

    for owner in (Owner("abc-123", "celery@host", 42), Owner('t"\\é\u2603', "w\n@h", 7)):
        expected = "|" + json.dumps([owner.task_id, owner.hostname, owner.pid], separators=(",", ":"))
        assert owner.suffix() == expected
        assert Owner.parse("token" + owner.suffix()) == owner


def test_the_canonical_json_is_json_dumps_with_sorted_keys_and_no_spaces() -> None:
    import json

    from celery_dlock.celery.keys import canonical_json

    value = {"b": [1, "é", None, 2.5], "a": {"z": True, "y": "\u2603"}}
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert canonical_json(value) == expected
