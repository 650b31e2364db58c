"""The I/O-free half of the release notifier: who a handover message wakes, and when a
subscription counts as live (celery_dlock.inbox)."""

from __future__ import annotations

import threading

from celery_dlock.inbox import Handover, Waiter, WaiterRegistry, parse_handover


def test_a_handover_wakes_exactly_its_waiter_and_carries_fence_and_score() -> None:
    registry: WaiterRegistry[threading.Event] = WaiterRegistry(threading.Event)
    mine, other = Waiter(threading.Event()), Waiter(threading.Event())
    registry.register("tok-a", mine)
    registry.register("tok-b", other)
    registry.handed_over("7:1732000000123456:tok-a")
    assert mine.wake.is_set() and not other.wake.is_set()
    assert mine.take_handover() == Handover(7, "1732000000123456")
    assert mine.take_handover() is None


def test_tokens_may_contain_colons() -> None:
    token = 'abc|["task:1","host",12]'
    assert parse_handover(f"3:99:{token}") == (token, Handover(3, "99"))


def test_a_handover_before_registration_is_kept_for_the_waiter() -> None:
    registry: WaiterRegistry[threading.Event] = WaiterRegistry(threading.Event)
    registry.handed_over("5:42:late-token")
    waiter = Waiter(threading.Event())
    registry.register("late-token", waiter)
    assert waiter.wake.is_set()
    assert waiter.take_handover() == Handover(5, "42")


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
