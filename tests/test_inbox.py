"""The I/O-free half of the release notifier: who a handover message wakes, and when a
subscription counts as live (celery_dlock.inbox)."""

from __future__ import annotations

import threading

from celery_dlock.inbox import Waiter, WaiterRegistry, handover_token


def test_a_handover_wakes_exactly_its_waiter() -> None:
    registry: WaiterRegistry[threading.Event] = WaiterRegistry(threading.Event)
    mine, other = Waiter(threading.Event()), Waiter(threading.Event())
    registry.register("tok-a", mine)
    registry.register("tok-b", other)
    registry.handed_over("7:1732000000123456:tok-a")
    assert mine.wake.is_set() and not other.wake.is_set()


def test_tokens_may_contain_colons() -> None:
    token = 'abc|["task:1","host",12]'
    assert handover_token(f"3:99:{token}") == token


def test_a_message_of_another_shape_is_read_as_a_bare_token() -> None:
    assert handover_token("just-a-token") == "just-a-token"
    assert handover_token("x:1:tok") == "x:1:tok"


def test_a_handover_before_registration_is_kept_for_the_waiter() -> None:
    registry: WaiterRegistry[threading.Event] = WaiterRegistry(threading.Event)
    registry.handed_over("5:42:late-token")
    waiter = Waiter(threading.Event())
    registry.register("late-token", waiter)
    assert waiter.wake.is_set()


def test_a_second_subscribe_confirmation_counts_as_a_lost_connection() -> None:
    # redis-py resubscribes a dropped pub/sub connection by itself, without raising: the
    # only sign is a new confirmation. Handovers in the gap may be lost, so every waiter
    # must wake and look for itself, and no earlier subscription counts as live.
    registry: WaiterRegistry[threading.Event] = WaiterRegistry(threading.Event)
    inbox, new = registry.inbox("dlock:")
    assert new and inbox.live_generation is None
    registry.confirmed(inbox.channel)
    live_before = inbox.live_generation
    assert live_before is not None
    waiter = Waiter(threading.Event())
    registry.register("tok", waiter)
    registry.confirmed(inbox.channel)  # resubscribed after a silent reconnect
    assert waiter.wake.is_set()
    assert inbox.live_generation is not None and inbox.live_generation != live_before


def test_garbage_messages_are_read_without_raising_and_later_ones_still_wake() -> None:
    # Both drivers' readers hand every message to on_message: one that raised would
    # stop the reader, and every later wake-up of the process with it.
    registry: WaiterRegistry[threading.Event] = WaiterRegistry(threading.Event)
    waiter = Waiter(threading.Event())
    registry.register("tok", waiter)
    for garbage in (
        {"type": b"message", "data": b"\xff\xfe not utf-8"},
        {"type": b"message", "data": None},
        {"type": b"message"},
        {"type": b"subscribe", "channel": b"\xff"},
        {"type": 17},
        {},
    ):
        registry.on_message(garbage)
    assert not waiter.wake.is_set()
    registry.on_message({"type": b"message", "data": b"3:99:tok"})
    assert waiter.wake.is_set()


def test_the_reader_pings_a_silent_connection_and_drops_it_when_no_pong_comes() -> None:
    from celery_dlock.inbox import PING_AFTER_SILENCE, PONG_TIMEOUT

    registry: WaiterRegistry[threading.Event] = WaiterRegistry(threading.Event)
    waiter = Waiter(threading.Event())
    registry.register("tok", waiter)
    start = 1_000_000.0
    registry.after_read({"type": b"subscribe", "channel": b"c", "data": 1}, start)
    assert registry.after_read(None, start + PING_AFTER_SILENCE - 0.1) is None
    assert registry.after_read(None, start + PING_AFTER_SILENCE) == "ping"
    assert registry.after_read(None, start + PING_AFTER_SILENCE + 0.5) is None  # one PING at a time
    # A PONG (any message) means alive.
    assert registry.after_read({"type": b"pong", "data": b""}, start + PING_AFTER_SILENCE + 1) is None
    assert not waiter.wake.is_set()
    later = start + PING_AFTER_SILENCE + 1
    assert registry.after_read(None, later + PING_AFTER_SILENCE) == "ping"
    generation = registry.generation
    assert registry.after_read(None, later + PING_AFTER_SILENCE + PONG_TIMEOUT) == "reconnect"
    assert waiter.wake.is_set() and registry.generation == generation + 1
