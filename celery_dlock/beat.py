"""A Celery beat scheduler that several beat processes can run at once, safely.

Enable it with ``beat_scheduler = "celery_dlock.beat:LockedScheduler"`` (or
``celery beat -S celery_dlock.beat:LockedScheduler``) and start as many beat
processes as you like, each with its own ``--schedule`` file. See docs/beat.md.

Leader election
    One leader lease in Redis (a :class:`celery_dlock.DistributedLock` named by
    ``dlock_beat_lock_name``, lease ``dlock_beat_lease`` seconds). Only the
    holder runs the schedule. It renews the lease from the scheduler loop every
    third of a lease, and beat's sleep between ticks is capped to that, so the
    lease never runs out between ticks whatever ``beat_max_loop_interval`` is.
    A leader whose renewal or tick claim finds the lease gone or owned by
    someone else stops publishing at once, logs it, and competes again as a
    standby; it never crashes. A beat that cannot renew (Redis unreachable)
    stops publishing once its lease has run out on its local monotonic clock.
    Standbys wait for the lease in short slices (woken by a release, or when
    the leader's lease expires), so they neither hang nor spin, and take over
    at most one lease after the leader died (at once when it shut down cleanly).

Per-tick dedup
    Before it publishes a due entry the leader claims the *scheduled tick*:
    ``SET <lock key>:tick:<entry>:<scheduled time> NX PX`` in a script that
    first checks that the leader lease still holds this beat's token, so a
    deposed leader cannot claim anything (fencing). A claim that exists
    already means another beat published that tick: it is skipped and logged.
    The scheduled time is a property of the schedule, not of this process's
    state, so two beats whose ``last_run_at`` differ name the same tick the
    same way:

    * interval entries (``schedule(run_every=...)``, numbers, timedeltas) are
      aligned on the Unix epoch: tick ``k`` is scheduled at ``k * run_every``
      seconds since 1970-01-01 UTC and becomes due when the clock enters it;
    * crontab, solar and other schedules: the latest time the schedule fired
      at or before now, found from the schedule's own ``remaining_estimate``.

Every message carries the headers ``dlock_beat_entry``, ``dlock_beat_tick``
(the scheduled time, ISO 8601 UTC) and ``dlock_beat_fence`` (the leader's
fencing token), readable in the task as ``self.request.dlock_beat_tick``.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from celery.beat import PersistentScheduler
from celery.schedules import schedstate
from celery.schedules import schedule as interval_schedule
from redis.exceptions import RedisError

from celery_dlock.celery.config import lock_prefix, lock_store, redis_client_for_app, setting
from celery_dlock.errors import LockError
from celery_dlock.keys import check_name
from celery_dlock.lock import DistributedLock, run_script
from celery_dlock.options import check_seconds, to_millis
from celery_dlock.scripts import Script

logger = logging.getLogger("celery_dlock.beat")

DEFAULT_LEASE = 30.0
MIN_LEASE = 1.0
MAX_LEASE = 24 * 3600.0
# The leader renews (and beat wakes up) this many times per lease.
RENEWALS_PER_LEASE = 3
# After a Redis error, try again after at most this long.
ERROR_RETRY = 1.0
# A tick claim outlives its tick by this much (clock skew between beat hosts, slow ticks).
TICK_TTL_MARGIN = timedelta(seconds=60)
# Entry names longer than this are hashed in tick keys.
MAX_ENTRY_KEY_LENGTH = 200
# How far back the search for the latest fire time of a calendar schedule may look.
MAX_LOOKBACK = timedelta(days=3660)
MAX_WALK_STEPS = 10_000
HEAP_PRIORITY = 5

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MICROSECOND = timedelta(microseconds=1)

# KEYS[1] leader lease, KEYS[2] tick claim; ARGV[1] leader token, ARGV[2] claim value,
# ARGV[3] claim lease in ms. Returns {1, ''} claimed, {0, holder} already claimed,
# {-1, ''} the caller does not hold the leader lease (nothing written).
CLAIM_TICK = Script(
    "beat_claim_tick",
    """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {-1, ''}
end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then
  return {1, ''}
end
return {0, redis.call('GET', KEYS[2]) or ''}
""",
)


# -- settings -----------------------------------------------------------------------


def beat_lease(conf: Any) -> float:
    """``dlock_beat_lease``: seconds, at least 1, at most a day (default 30)."""
    value = setting(conf, "dlock_beat_lease")
    if value is None:
        return DEFAULT_LEASE
    lease = check_seconds("dlock_beat_lease", value, maximum=MAX_LEASE)
    assert lease is not None
    if lease < MIN_LEASE:
        raise ValueError(
            f"dlock_beat_lease must be at least {MIN_LEASE:g} second (the leader renews it every "
            f"third of it), got {value!r}"
        )
    return lease


def beat_lock_name(app: Any) -> str:
    """``dlock_beat_lock_name``, default ``"beat:<app main name>"``."""
    value = setting(app.conf, "dlock_beat_lock_name")
    if value is not None:
        return check_name(value, parameter="dlock_beat_lock_name")
    main = getattr(app, "main", None)
    if isinstance(main, str) and main and "{" not in main and "}" not in main and len(main) < 512:
        return f"beat:{main}"
    return "beat"


# -- the scheduled tick of an entry ---------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """One scheduled run of a beat entry: what is claimed before it is published."""

    entry: str
    scheduled: datetime  # aware, UTC
    ttl: timedelta

    @property
    def label(self) -> str:
        return iso_utc(self.scheduled)

    @property
    def ttl_ms(self) -> int:
        return to_millis(self.ttl.total_seconds())


def iso_utc(moment: datetime) -> str:
    moment = moment.astimezone(timezone.utc)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}"
    return text + "Z"


def _aware(sched: Any, moment: datetime) -> datetime:
    if moment.tzinfo is None:
        made: datetime = sched.maybe_make_aware(moment)
        return made
    return moment


def _micros(span: timedelta) -> int:
    return span // MICROSECOND


def is_epoch_aligned(sched: Any) -> bool:
    """Whether ``sched`` is a plain interval schedule (its ticks are aligned on the epoch)."""
    return (
        isinstance(sched, interval_schedule)
        and type(sched).is_due is interval_schedule.is_due
        and sched.run_every > timedelta(0)
    )


def interval_slot(run_every: timedelta, moment: datetime) -> int:
    """Index of the epoch-aligned interval that contains ``moment``: floor(t / run_every)."""
    return _micros(moment.astimezone(timezone.utc) - EPOCH) // _micros(run_every)


def aligned_is_due(sched: Any, last_run_at: datetime, now: datetime) -> tuple[bool, float]:
    """``(is_due, seconds to next check)`` of an interval schedule aligned on the epoch.

    Due when ``now`` lies in a later slot than ``last_run_at``; the next check is
    the start of the next slot.
    """
    run_every: timedelta = sched.run_every
    now = _aware(sched, now)
    current = interval_slot(run_every, now)
    last = min(interval_slot(run_every, _aware(sched, last_run_at)), current)  # clock went back
    next_start = EPOCH + (current + 1) * run_every
    return current > last, max((next_start - now).total_seconds(), 0.0)


def _round_to_second(moment: datetime) -> datetime:
    return (moment + timedelta(milliseconds=500)).replace(microsecond=0)


def next_fire(sched: Any, after: datetime) -> datetime:
    """When ``sched`` fires next after ``after`` (to the second), from its own estimate."""
    now = _aware(sched, sched.now())
    remaining: timedelta = sched.remaining_estimate(after)
    return _round_to_second(now + remaining)


def latest_fire(sched: Any, now: datetime) -> tuple[datetime, datetime] | None:
    """``(latest fire time <= now, the fire after it)`` of a calendar schedule, or None.

    Looks back 2 minutes, then twice as far, and so on, until some fire time is
    found, then walks forward fire by fire. Only the schedule is consulted, never
    an entry's ``last_run_at``, so every beat process finds the same answer.
    """
    now = _aware(sched, now)
    lookback = timedelta(minutes=2)
    while lookback <= MAX_LOOKBACK:
        fire = next_fire(sched, now - lookback)
        if fire <= now:
            for _ in range(MAX_WALK_STEPS):
                following = next_fire(sched, fire)
                if following <= fire:  # a schedule that answers "now" for its own fire time
                    following = next_fire(sched, fire + timedelta(seconds=1))
                if following > now or following <= fire:
                    return fire, following
                fire = following
            return None
        lookback *= 2
    return None


def scheduled_tick(entry: Any, now: datetime) -> Tick:
    """The tick of ``entry`` that is due at ``now`` (see the module docstring)."""
    sched = entry.schedule
    name = str(entry.name)
    now = _aware(sched, now)
    if is_epoch_aligned(sched):
        run_every: timedelta = sched.run_every
        start = EPOCH + interval_slot(run_every, now) * run_every
        return Tick(name, start, 2 * run_every + TICK_TTL_MARGIN)
    found = None
    try:
        found = latest_fire(sched, now)
    except Exception:
        logger.debug("beat: cannot compute the fire times of %r", name, exc_info=True)
    if found is None:
        # Unknown shape: name the tick by the second it is published in (dedups only
        # within that second); the claim still goes through the leader fence.
        return Tick(name, now.replace(microsecond=0).astimezone(timezone.utc), TICK_TTL_MARGIN)
    fire, following = found
    return Tick(name, fire.astimezone(timezone.utc), 2 * (following - fire) + TICK_TTL_MARGIN)


def tick_key(lock_key: str, tick: Tick) -> str:
    """Redis key of a tick claim; it shares the leader lease's hash tag (one Cluster slot)."""
    entry = tick.entry
    if len(entry) > MAX_ENTRY_KEY_LENGTH:
        entry = "sha256-" + hashlib.sha256(entry.encode()).hexdigest()
    return f"{lock_key}:tick:{entry}:{tick.label}"


# -- the scheduler ------------------------------------------------------------------


class LockedScheduler(PersistentScheduler):  # type: ignore[misc]
    """``celery.beat.PersistentScheduler`` with a leader lease and per-tick dedup in Redis.

    Settings (``app.conf``): ``dlock_beat_lease`` (seconds, default 30),
    ``dlock_beat_lock_name`` (default ``"beat:<app name>"``), and the shared
    ``dlock_redis_url`` and ``dlock_prefix``.
    """

    max_interval: float
    _heap: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        app = kwargs["app"] if "app" in kwargs else args[0]
        # Validate first: a bad setting fails beat at start, before anything runs.
        self.lease = beat_lease(app.conf)
        self.lock_name = beat_lock_name(app)
        self.lock_prefix = lock_prefix(app.conf)
        lock_store(app.conf)  # a missing or malformed lock store fails here, not at the first tick
        self.renew_every = self.lease / RENEWALS_PER_LEASE
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self._lock: DistributedLock | None = None
        self._leading = False
        self._standing_by = False
        self._next_renewal = 0.0
        self._pending: dict[str, Tick] = {}
        self._last_warning = 0.0
        super().__init__(*args, **kwargs)
        # Beat sleeps at most this long between ticks: the leader renews on time and a
        # standby looks again (PITFALL: loop interval >= lease).
        self.max_interval = min(float(self.max_interval), self.renew_every)

    # -- leadership --------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """Whether this beat holds the leader lease (as far as it knows without a round trip)."""
        lock = self._lock
        return self._leading and lock is not None and lock.token is not None and not lock.lost

    @property
    def fence(self) -> int | None:
        """Fencing token of the current leadership term, or None when not leading."""
        return self._lock.fence if self._leading and self._lock is not None else None

    def _new_lock(self) -> DistributedLock:
        return DistributedLock(
            redis_client_for_app(self.app),
            self.lock_name,
            timeout=self.lease,
            retry_delay=self.renew_every,
            blocking_timeout=self.renew_every,
            prefix=self.lock_prefix,
        )

    def _warn(self, message: str, *args: Any) -> None:
        """Log a warning, at most one per lease (Redis outages would flood the log)."""
        now = time.monotonic()
        if now - self._last_warning >= self.renew_every:
            self._last_warning = now
            logger.warning(message, *args)

    def _lead_or_wait(self) -> float | None:
        """None when this beat leads and may run the schedule, else seconds to sleep."""
        if self._leading:
            lock = self._lock
            assert lock is not None
            if not lock.lost and time.monotonic() >= self._next_renewal:
                self._renew(lock)
            if self._leading and lock.lost:
                self._step_down(lock.lost_reason or "its lease ran out before it was renewed")
            if self._leading:
                return None
        return self._try_to_lead()

    def _renew(self, lock: DistributedLock) -> None:
        sent_at = time.monotonic()
        try:
            renewed = lock.extend(self.lease, replace=True)
        except LockError as exc:
            self._next_renewal = sent_at + min(ERROR_RETRY, self.renew_every)
            self._warn("beat: cannot renew the leader lease %r, will retry: %s", self.lock_name, exc)
            return
        if renewed:
            self._next_renewal = sent_at + self.renew_every
        else:
            self._step_down("renewal found the lease expired or held by another beat")

    def _try_to_lead(self) -> float | None:
        """Seek the lease; None once leading, else seconds to sleep before the next tick."""
        lock = self._lock = self._lock or self._new_lock()
        try:
            # Waits at most renew_every; woken at once by a release, or when the
            # holder's lease runs out (see celery_dlock.lease.AttemptPlan).
            acquired = lock.acquire(blocking=True)
        except LockError as exc:
            self._warn("beat: cannot reach Redis for the leader lease %r: %s", self.lock_name, exc)
            return min(ERROR_RETRY, self.renew_every)
        if not acquired:
            if not self._standing_by:
                self._standing_by = True
                logger.info(
                    "beat: standing by: another beat holds the leader lease %r (pid %d)",
                    self.lock_name,
                    os.getpid(),
                )
            return 0.0
        self._leading = True
        self._standing_by = False
        self._next_renewal = time.monotonic() + self.renew_every
        self._heap = None  # rebuild from the entries: this process's state may be old
        logger.info(
            "beat: became leader (lock %r, fence %s, lease %gs, pid %d)",
            self.lock_name,
            lock.fence,
            self.lease,
            os.getpid(),
        )
        return None

    def _step_down(self, reason: str) -> None:
        lock, self._lock = self._lock, None
        was_leading, self._leading = self._leading, False
        self._pending.clear()
        if lock is None:
            return
        fence = lock.fence
        try:
            lock.release()  # frees the key if it is still ours (lease ran out locally only)
        except LockError as exc:
            logger.debug("beat: release after losing the lease failed: %r", exc)
        if was_leading:
            logger.info(
                "beat: lost leadership (lock %r, fence %s): %s; stopped publishing, standing by",
                self.lock_name,
                fence,
                reason,
            )

    # -- the scheduler loop --------------------------------------------------------

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """One iteration of beat's loop: keep or seek the lease; run the schedule only when leading."""
        wait = self._lead_or_wait()
        if wait is not None:
            return wait
        interval = float(super().tick(*args, **kwargs))
        if self._leading:
            interval = min(interval, max(0.0, self._next_renewal - time.monotonic()))
        return interval

    def adjust(self, n: Any, drift: float = 0.001) -> Any:
        # Wake just after an entry is due rather than 10 ms before it (Celery's default),
        # which for epoch-aligned ticks would only mean a few empty ticks.
        if n and n > 0:
            return n + drift
        return n

    def is_due(self, entry: Any) -> Any:
        sched = entry.schedule
        if is_epoch_aligned(sched):
            due, next_check = aligned_is_due(sched, entry.last_run_at, sched.now())
            return schedstate(due, next_check)
        return entry.is_due()

    def populate_heap(self, *args: Any, **kwargs: Any) -> None:
        heap = []
        for entry in self.schedule.values():
            try:
                due, next_check = self.is_due(entry)
            except Exception:
                due, next_check = self._is_due_failed(entry)
            heap.append((self._when(entry, 0 if due else next_check) or 0, HEAP_PRIORITY, entry))
        heapq.heapify(heap)
        self._heap = heap

    def reserve(self, entry: Any) -> Any:
        # Name the tick and advance the entry from one reading of the clock, so the
        # entry's new last_run_at lies in the tick that is about to be claimed.
        now = _aware(entry.schedule, entry.default_now())
        self._pending[entry.name] = scheduled_tick(entry, now)
        new_entry = self.schedule[entry.name] = entry.next(last_run_at=now)
        return new_entry

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        tick = self._pending.pop(entry.name, None)
        if tick is None:
            tick = scheduled_tick(entry, _aware(entry.schedule, entry.default_now()))
        fence = self._claim(tick)
        if fence is None:
            return
        super().apply_entry(self._with_headers(entry, tick, fence), producer=producer)

    def _claim(self, tick: Tick) -> int | None:
        """Claim ``tick`` for publishing; the leader's fence when claimed, else None."""
        lock = self._lock
        token = lock.token if lock is not None else None
        if not self._leading or lock is None or token is None or lock.fence is None:
            logger.info("beat: not publishing %r (tick %s): not the leader", tick.entry, tick.label)
            return None
        if lock.lost:
            self._step_down(lock.lost_reason or "its lease ran out before it was renewed")
            logger.info("beat: not publishing %r (tick %s): not the leader", tick.entry, tick.label)
            return None
        key = tick_key(lock.keys.lock, tick)
        claimant = f"fence {lock.fence} {self.identity}"
        try:
            status, holder = run_script(
                redis_client_for_app(self.app),
                CLAIM_TICK,
                [lock.keys.lock, key],
                [token, claimant, tick.ttl_ms],
            )
        except RedisError as exc:
            self._warn("beat: not publishing %r (tick %s): cannot claim it: %s", tick.entry, tick.label, exc)
            return None
        status = int(status)
        if status == 1:
            return int(lock.fence)
        if status == 0:
            holder = holder.decode() if isinstance(holder, bytes) else str(holder)
            logger.info(
                "beat: skipped duplicate tick of %r scheduled at %s: already claimed by %s",
                tick.entry,
                tick.label,
                holder,
            )
            return None
        self._step_down("a tick claim found the lease expired or held by another beat")
        logger.info("beat: not publishing %r (tick %s): not the leader", tick.entry, tick.label)
        return None

    @staticmethod
    def _with_headers(entry: Any, tick: Tick, fence: int) -> Any:
        """A shallow copy of ``entry`` whose message headers name the tick (the stored entry is untouched)."""
        clone = entry.__class__.__new__(entry.__class__)
        clone.__dict__.update(entry.__dict__)
        options = dict(entry.options or {})
        headers = dict(options.get("headers") or {})
        headers.update(dlock_beat_entry=tick.entry, dlock_beat_tick=tick.label, dlock_beat_fence=fence)
        options["headers"] = headers
        clone.options = options
        return clone

    # -- shutdown --------------------------------------------------------------------

    def close(self) -> None:
        """Sync and close the schedule, then hand the lease over (a standby is woken at once)."""
        try:
            super().close()
        finally:
            lock = self._lock
            if lock is not None and lock.token is not None:
                self._leading = False
                fence = lock.fence
                try:
                    if lock.release():
                        logger.info("beat: released the leader lease %r (fence %s)", self.lock_name, fence)
                except LockError as exc:
                    logger.warning("beat: could not release the leader lease %r: %s", self.lock_name, exc)

    @property
    def info(self) -> str:
        base = str(super().info)
        return (
            f"{base}\n    . leader lease -> {self.lock_prefix}{{{self.lock_name}}} "
            f"({self.lease:g}s, renewed every {self.renew_every:g}s)"
        )
