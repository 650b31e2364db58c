"""The lock's protocol under seeded faults (tests/sim/world.py): every invariant on every event.

``DLOCK_SIM_SEEDS`` sets how many seeds (default 2,000, a few seconds); a failure names
its seed and shows the end of its trace, and ``run_seed(seed)`` replays it exactly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest

from celery_dlock import protocol
from celery_dlock.lease import ACQUIRED, AttemptPlan, LockCore, trusted_until
from celery_dlock.scripts import WAIT
from tests.sim.world import Violation, run_seed

SEEDS = int(os.environ.get("DLOCK_SIM_SEEDS", "2000"))


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    """The runs lose locks on purpose (pauses, crashes): their warnings are expected."""
    logger = logging.getLogger("celery_dlock")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


def test_every_invariant_holds_for_every_seed() -> None:
    granted = 0
    for seed in range(SEEDS):
        world = run_seed(seed)  # raises Violation (seed, faults, trace) on the first broken invariant
        granted += sum("acquire -> True" in line for line in world.trace)
    assert granted > SEEDS  # the runs did take the lock, many times


def first_violation() -> str | None:
    """The first violation within the default seeds (a re-introduced defect must cause one)."""
    for seed in range(SEEDS):
        try:
            run_seed(seed)
        except Violation as violation:
            return str(violation)
    return None


def test_a_seed_replays_exactly() -> None:
    assert run_seed(11).trace == run_seed(11).trace
    assert run_seed(11).trace != run_seed(12).trace


def adopting_attempt(original: Any) -> Any:
    """The defect of the issue "Core lock: never trade the safety margin for speed": a woken
    waiter that finds the lock handed to it adopts it as it stands - on the 500 ms hand-over
    lease - instead of confirming it with its full lease, and trusts it for its full timeout."""

    def attempt(lock: Any, token: str, mode: bytes, member: Any, plan: Any) -> protocol.Operation[Any]:
        server = lock.redis.world.server  # test-only: the defect reads the server's state directly
        if mode == WAIT and server.get(lock.keys.lock.encode()) == token.encode():
            now = yield protocol.NOW
            lock._acquired(token, int(server.get(lock.keys.fence.encode())), now)
            return ACQUIRED
        return (yield from original(lock, token, mode, member, plan))

    return attempt


def test_the_simulation_finds_adoption_on_the_short_hand_over_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "attempt", adopting_attempt(protocol.attempt))
    found = first_violation()
    assert found is not None, f"no seed of {SEEDS} found the defect"
    assert "two clients hold the lock at once" in found


def test_the_simulation_finds_the_extend_renewal_race(monkeypatch: pytest.MonkeyPatch) -> None:
    """The other defect of that issue, and its sibling the simulator found: the trust follows
    whichever answer comes last, so a renewal reply that overtakes an extend(replace=True)
    that shortens the lease, or a shortening extend whose reply is lost, leaves the holder
    trusting a lease the server no longer gives it."""

    def renewed_without_the_extend_check(self: Any, lease_ms: int, sent_at: float) -> None:
        if not self._lost:
            self._trusted_until = max(self._trusted_until, trusted_until(sent_at, lease_ms))

    monkeypatch.setattr(LockCore, "_renewed", renewed_without_the_extend_check)
    monkeypatch.setattr(LockCore, "_extend_started", lambda self, lease_ms, sent_at: None)
    found = first_violation()
    assert found is not None, f"no seed of {SEEDS} found the defect"
    assert "two clients hold the lock at once" in found


def test_the_simulation_finds_a_waiter_that_sleeps_through_a_free_lock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A waiter that trusts the hand-over message alone (no timer before its deadline) misses a
    lock that expired, or whose message was lost: the no-lost-wake-up check sees it."""
    original = AttemptPlan.next_wait

    def until_the_deadline(self: AttemptPlan, reply: Any, now: float) -> float | None:
        wait = original(self, reply, now)
        deadline = self._deadline
        return None if wait is None else max(wait, deadline - now if deadline is not None else wait)

    monkeypatch.setattr(AttemptPlan, "next_wait", until_the_deadline)
    found = first_violation()
    assert found is not None, f"no seed of {SEEDS} found the defect"
    assert "gave up though the lock was free" in found
