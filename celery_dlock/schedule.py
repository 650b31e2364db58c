"""The renewal schedule: which held locks are due, which are lost, when to wake next.

This is the I/O-free heart of the watchdog, shared by the sync watchdog (a
thread) and the asyncio one (a task per event loop); each only adds waiting
and the pipelined round trip. Callers serialize access (a lock, or the loop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from celery_dlock.lease import LockCore

# After a failed renewal, try again after this long (capped by the interval).
RETRY_AFTER_ERROR = 0.25
IDLE_WAKE = 3600.0


@dataclass
class _Entry:
    lock: LockCore
    renew: bool
    next_renewal: float


@dataclass
class Batch:
    """Renewals to send in one pipeline to one client."""

    client_id: int
    client: Any
    locks: list[tuple[LockCore, str]]  # (lock, token at planning time)

    @property
    def deadline(self) -> float:
        """When waiting for the replies stops making sense: the shortest trusted lease
        in the batch (by then that lock is reported lost whatever the reply)."""
        return min(lock.trusted_until for lock, _ in self.locks)

    def calls(self) -> list[tuple[list[str], list[Any]]]:
        """(KEYS, ARGV) of the EXTEND script in 'renew' mode for each lock."""
        return [
            ([lock.keys.lock], [token, lock.options.timeout_ms, "renew", 0]) for lock, token in self.locks
        ]


@dataclass
class Plan:
    lost: list[LockCore] = field(default_factory=list)  # newly lost: call _notify_lost on each
    batches: list[Batch] = field(default_factory=list)  # send these now
    wake_at: float = 0.0  # look again at this monotonic time (or when told of a change)


class RenewalSchedule:
    """Tracks held locks; decides renewals and losses. See the module docstring."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._in_flight: set[int] = set()
        # The batch on the wire for each client: one at a time per client.
        self._outstanding: dict[int, Batch] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def track(self, lock: LockCore, now: float) -> float:
        """Start watching ``lock``; returns when it first needs the watchdog.

        A watchdog already asleep until before the returned time need not be woken:
        it re-plans when it wakes. (Waking a thread per acquisition costs more CPU
        than the lock's own round trip.)
        """
        renew = lock.options.auto_renewal
        entry = _Entry(lock, renew, now + lock.options.renewal_interval)
        self._entries[id(lock)] = entry
        return min(entry.next_renewal, lock.trusted_until) if renew else lock.trusted_until

    def retime(self, lock: LockCore, now: float) -> float | None:
        """``lock``'s lease changed (extend): when it next needs the watchdog, or None if untracked."""
        entry = self._entries.get(id(lock))
        if entry is None:
            return None
        if not entry.renew:
            return lock.trusted_until
        entry.next_renewal = _renew_by(entry.next_renewal, lock, now)
        return entry.next_renewal

    def untrack(self, lock: LockCore) -> None:
        self._entries.pop(id(lock), None)

    def in_flight(self, lock: LockCore) -> bool:
        return id(lock) in self._in_flight

    def plan(self, now: float) -> Plan:
        """Mark leases that ran out as lost and collect the renewals due now.

        When one lock of a client is due, its other locks that are at least
        half-way to due ride in the same pipeline, so renewals align into one
        round trip per interval instead of one per acquisition moment.
        """
        plan = Plan(wake_at=now + IDLE_WAKE)
        for batch in list(self._outstanding.values()):
            if now >= batch.deadline:
                # Its wait is over (the driver stops waiting too): the client is free
                # for another batch, and a late reply is ignored.
                self._settle(batch)
        due_clients = {
            id(_client(e.lock)) for e in self._entries.values() if e.renew and e.next_renewal <= now
        }
        batches: dict[int, Batch] = {}
        for key, entry in list(self._entries.items()):
            lock = entry.lock
            if now >= lock.trusted_until:
                reason = (
                    "no renewal reached Redis before the lease ran out"
                    if entry.renew
                    else "its lease ran out (auto_renewal is off)"
                )
                if lock._mark_lost(reason):
                    plan.lost.append(lock)
                del self._entries[key]
                continue
            plan.wake_at = min(plan.wake_at, lock.trusted_until)
            if not entry.renew or key in self._in_flight:
                continue
            client = _client(lock)
            client_id = id(client)
            nearly_due = entry.next_renewal - now <= lock.options.renewal_interval / 2
            token = lock.token
            if client_id in self._outstanding:
                # A batch of this client is on the wire: its completion wakes the
                # watchdog to plan again (waking before would find it still busy: a spin).
                continue
            if client_id in due_clients and nearly_due and token:
                batch = batches.setdefault(client_id, Batch(client_id, client, []))
                batch.locks.append((lock, token))
            else:
                plan.wake_at = min(plan.wake_at, entry.next_renewal)
        for batch in batches.values():
            self._outstanding[batch.client_id] = batch
            self._in_flight.update(id(lock) for lock, _ in batch.locks)
            plan.batches.append(batch)
        return plan

    def _settle(self, batch: Batch) -> None:
        del self._outstanding[batch.client_id]
        for lock, _ in batch.locks:
            self._in_flight.discard(id(lock))

    def complete(
        self,
        batch: Batch,
        replies: Sequence[Any] | None,
        error: BaseException | None,
        sent_at: float,
        now: float,
    ) -> list[LockCore]:
        """Apply a batch's replies (or its error); returns the locks newly found lost."""
        lost: list[LockCore] = []
        if self._outstanding.get(batch.client_id) is not batch:
            return lost  # given up at its deadline: what it says may be out of date
        self._settle(batch)
        for index, (lock, token) in enumerate(batch.locks):
            entry = self._entries.get(id(lock))
            if entry is None or entry.lock is not lock or lock.token != token:
                continue  # released (and maybe acquired again) while the renewal was on the wire
            reply: Any = error if error is not None or replies is None else replies[index]
            if isinstance(reply, BaseException) or reply is None:
                # Try again soon, and before the lease we trust runs out.
                retry = min(RETRY_AFTER_ERROR, lock.options.renewal_interval, (lock.trusted_until - now) / 2)
                entry.next_renewal = now + max(0.0, retry)
                continue
            lease_ms = int(reply)
            if lease_ms < 0:
                if lock._mark_lost("renewal found the lock expired or owned by another token"):
                    lost.append(lock)
                del self._entries[id(lock)]
                continue
            lock._renewed(lease_ms, sent_at)
            entry.next_renewal = _renew_by(sent_at + lock.options.renewal_interval, lock, now)
        return lost


def _renew_by(planned: float, lock: LockCore, now: float) -> float:
    """``planned``, or half-way through the trusted lease if that ends first (a lease
    an extend() shortened): a renewed lock is renewed before its lease runs out."""
    return min(planned, now + max(0.0, lock.trusted_until - now) / 2)


def _client(lock: LockCore) -> Any:
    return lock.redis
