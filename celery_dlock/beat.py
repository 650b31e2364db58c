"""Celery beat that several beat processes can run at once, safely, on any scheduler class.

Enable it with ``beat_scheduler = "celery_dlock.beat:LockedScheduler"`` (Celery's
``PersistentScheduler``), ``"celery_dlock.beat:LockedDatabaseScheduler"``
(django-celery-beat), ``"celery_dlock.beat:LockedRedBeatScheduler"`` (RedBeat), or
``locked_scheduler(YourScheduler)`` for any other ``celery.beat.Scheduler`` subclass,
and start as many beat processes as you like. See docs/beat.md.

Leader election
    One leader lease in Redis (a :class:`celery_dlock.DistributedLock` named by
    ``dlock_beat_lock_name``, lease ``dlock_beat_lease`` seconds). Only the
    holder runs the schedule. It renews the lease from the scheduler loop every
    third of a lease, and beat's sleep between ticks is capped to that, so the
    lease never runs out between ticks whatever ``beat_max_loop_interval`` is.
    A leader whose renewal or claim finds the lease gone or owned by someone
    else stops publishing at once, logs it, and competes again as a standby; it
    never crashes. A beat that cannot renew (Redis unreachable) stops publishing
    once its lease has run out on its local monotonic clock. Standbys wait for
    the lease in short slices (woken by a release, or when the leader's lease
    expires), so they neither hang nor spin, and take over at most one lease
    after the leader died (at once when it shut down cleanly).

Each run once
    Before it publishes a due entry the leader *claims* the run, in a script that
    first checks that the leader lease still holds this beat's token, so a deposed
    leader cannot claim anything (fencing). Entries keep the timing their
    scheduler gives them; what is claimed depends on the schedule:

    * interval entries (``schedule(run_every=...)``, numbers, timedeltas) run
      ``run_every`` after their last run, as in Celery. The last run of each entry
      is kept in Redis (``<lock key>:last:<entry>``): the claim is refused if
      another beat ran the entry less than ``run_every`` ago, and a beat that
      becomes leader first takes the last runs from there, so a failover keeps the
      entries' rhythm instead of restarting it from a stale local state;
    * with ``dlock_beat_align_intervals = True``, interval entries instead run on
      ticks aligned on the Unix epoch (tick ``k`` at ``k * run_every`` seconds since
      1970-01-01 UTC), claimed like calendar ticks;
    * crontab, solar and other schedules: the latest time the schedule fired at
      or before now, found from the schedule's own ``remaining_estimate``, is
      claimed with ``SET <lock key>:tick:<entry>:<scheduled time> NX PX``. It is a
      property of the schedule, not of a process's state, so two beats whose
      ``last_run_at`` differ name the same tick the same way.

Every message carries the headers ``dlock_beat_entry``, ``dlock_beat_tick``
(the scheduled time, or for an interval entry the time of this run, ISO 8601 UTC)
and ``dlock_beat_fence`` (the leader's fencing token), readable in the task as
``self.request.dlock_beat_tick``.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from celery.beat import PersistentScheduler, Scheduler
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

#: Marks the copy of an entry that was claimed and may be sent.
CLAIMED = "_dlock_claimed"

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

# KEYS[1] leader lease, KEYS[2] last run of an interval entry ("<microseconds since the
# epoch> <who>"); ARGV[1] leader token, ARGV[2] this run (microseconds), ARGV[3] the
# interval (microseconds), ARGV[4] who, ARGV[5] lease of the record in ms.
# Returns {1, ''} claimed, {0, last run} the entry ran less than an interval ago,
# {-1, ''} the caller does not hold the leader lease (nothing written).
CLAIM_INTERVAL_RUN = Script(
    "beat_claim_interval_run",
    """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {-1, ''}
end
local last = redis.call('GET', KEYS[2])
if last then
  local at = tonumber(string.match(last, '^%d+'))
  if at and tonumber(ARGV[2]) - at < tonumber(ARGV[3]) then
    return {0, last}
  end
end
redis.call('SET', KEYS[2], ARGV[2] .. ' ' .. ARGV[4], 'PX', ARGV[5])
return {1, ''}
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


def align_intervals(conf: Any) -> bool:
    """``dlock_beat_align_intervals``: run interval entries on epoch-aligned ticks (default False)."""
    value = setting(conf, "dlock_beat_align_intervals", False)
    if not isinstance(value, bool):
        raise TypeError(
            f"dlock_beat_align_intervals must be True or False, got {type(value).__name__}: {value!r}"
        )
    return value


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
    """One run of a beat entry: what is claimed before it is published."""

    entry: str
    scheduled: datetime  # aware, UTC
    ttl: timedelta
    #: Set for an interval entry on Celery's own timing: the claim then checks the
    #: entry's last run (kept in Redis) against this interval instead of naming a tick.
    run_every: timedelta | None = None

    @property
    def label(self) -> str:
        return iso_utc(self.scheduled)

    @property
    def ttl_ms(self) -> int:
        return to_millis(self.ttl.total_seconds())

    @property
    def micros(self) -> int:
        """``scheduled`` in microseconds since the Unix epoch."""
        return _micros(self.scheduled - EPOCH)


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


def is_interval(sched: Any) -> bool:
    """Whether ``sched`` is a plain interval schedule (Celery's ``schedule``, not a subclass
    with timing of its own), aligned or not."""
    if isinstance(sched, AlignedInterval):
        return True
    return (
        isinstance(sched, interval_schedule)
        and type(sched).is_due is interval_schedule.is_due
        and sched.run_every > timedelta(0)
    )


class AlignedInterval(interval_schedule):  # type: ignore[misc]
    """An interval schedule whose runs fall on ticks aligned on the Unix epoch
    (``dlock_beat_align_intervals``): tick ``k`` at ``k * run_every`` since 1970-01-01 UTC."""

    @classmethod
    def of(cls, sched: Any) -> AlignedInterval:
        return cls(run_every=sched.run_every, relative=sched.relative, nowfun=sched.nowfun, app=sched.app)

    def is_due(self, last_run_at: datetime) -> Any:
        due, next_check = aligned_is_due(self, last_run_at, self.now())
        return schedstate(due, next_check)


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
    """The run of ``entry`` that is due at ``now`` (see the module docstring)."""
    sched = entry.schedule
    name = str(entry.name)
    now = _aware(sched, now)
    if isinstance(sched, AlignedInterval):
        run_every: timedelta = sched.run_every
        start = EPOCH + interval_slot(run_every, now) * run_every
        return Tick(name, start, 2 * run_every + TICK_TTL_MARGIN)
    if is_interval(sched):
        run_every = sched.run_every
        return Tick(name, now.astimezone(timezone.utc), 2 * run_every + TICK_TTL_MARGIN, run_every=run_every)
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


def _entry_key_part(entry: str) -> str:
    if len(entry) > MAX_ENTRY_KEY_LENGTH:
        return "sha256-" + hashlib.sha256(entry.encode()).hexdigest()
    return entry


def tick_key(lock_key: str, tick: Tick) -> str:
    """Redis key of a tick claim; it shares the leader lease's hash tag (one Cluster slot)."""
    return f"{lock_key}:tick:{_entry_key_part(tick.entry)}:{tick.label}"


def last_run_key(lock_key: str, entry: str) -> str:
    """Redis key of an interval entry's last run; same hash tag as the leader lease."""
    return f"{lock_key}:last:{_entry_key_part(entry)}"


def _last_run_at(value: Any) -> datetime | None:
    """The time in a last-run record ("<microseconds since the epoch> <who>")."""
    text = value.decode() if isinstance(value, bytes) else str(value)
    try:
        return EPOCH + timedelta(microseconds=int(text.split(" ", 1)[0]))
    except ValueError:
        return None


# -- the scheduler ------------------------------------------------------------------


class LeaderLease:
    """Adds the leader lease and each-run-once claims to a ``celery.beat.Scheduler`` subclass.

    Put it first among the bases (``class S(LeaderLease, DatabaseScheduler)``), or use
    :func:`locked_scheduler`. Settings (``app.conf``): ``dlock_beat_lease`` (seconds,
    default 30), ``dlock_beat_lock_name`` (default ``"beat:<app name>"``),
    ``dlock_beat_align_intervals`` (default False), and the shared lock store settings
    (``dlock_redis_url``, ...) and ``dlock_prefix``.
    """

    # Provided by the scheduler class this is mixed into.
    app: Any
    schedule: Any
    max_interval: float
    _heap: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        app = kwargs["app"] if "app" in kwargs else args[0]
        # Validate first: a bad setting fails beat at start, before anything runs.
        self.lease = beat_lease(app.conf)
        self.lock_name = beat_lock_name(app)
        self.lock_prefix = lock_prefix(app.conf)
        self.align_intervals = align_intervals(app.conf)
        lock_store(app.conf)  # a missing or malformed lock store fails here, not at the first tick
        self.renew_every = self.lease / RENEWALS_PER_LEASE
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self._lock: DistributedLock | None = None
        self._leading = False
        self._standing_by = False
        self._next_renewal = 0.0
        # Claimed at apply_entry: the run reserve() just made, and the entry it returned.
        self._pending: dict[str, tuple[Tick, Any]] = {}
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
        self._take_last_runs()
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
        interval = float(super().tick(*args, **kwargs))  # type: ignore[misc]
        if self._leading:
            interval = min(interval, max(0.0, self._next_renewal - time.monotonic()))
        return interval

    def adjust(self, n: Any, drift: float = 0.001) -> Any:
        # Wake just after an entry is due rather than 10 ms before it (Celery's default),
        # which would only mean a few empty ticks.
        if n and n > 0:
            return n + drift
        return n

    def _align(self, entry: Any) -> None:
        """With ``dlock_beat_align_intervals``, give an interval entry epoch-aligned ticks."""
        sched = entry.schedule
        if self.align_intervals and is_interval(sched) and not isinstance(sched, AlignedInterval):
            entry.schedule = AlignedInterval.of(sched)

    def is_due(self, entry: Any) -> Any:
        self._align(entry)
        return super().is_due(entry)  # type: ignore[misc]

    def populate_heap(self, *args: Any, **kwargs: Any) -> None:
        for entry in self.schedule.values():
            self._align(entry)
        super().populate_heap(*args, **kwargs)  # type: ignore[misc]

    def reserve(self, entry: Any) -> Any:
        # The run is named from the new entry's last_run_at, so the entry's own state and
        # the claim agree on when this run happened.
        new_entry = super().reserve(entry)  # type: ignore[misc]
        ran_at = getattr(new_entry, "last_run_at", None) or entry.default_now()
        self._pending[entry.name] = (scheduled_tick(entry, _aware(entry.schedule, ran_at)), new_entry)
        return new_entry

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        # Celery's loop: reserve() named the run, claim it before anything is logged or sent.
        claimed = self._claimed(entry)
        if claimed is not None:
            super().apply_entry(claimed, producer=producer)  # type: ignore[misc]

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        # Schedulers that send from their own loop (RedBeat) come straight here.
        if not getattr(entry, CLAIMED, False):
            if advance:
                entry = self.reserve(entry)
            entry = self._claimed(entry)
            if entry is None:
                return None
        return super().apply_async(entry, producer=producer, advance=False, **kwargs)  # type: ignore[misc]

    def _claimed(self, entry: Any) -> Any:
        """A copy of ``entry`` to send, its headers naming the run, if this beat may send it; else None."""
        tick, new_entry = self._pending.pop(entry.name, (None, None))
        if tick is None:
            tick = scheduled_tick(entry, _aware(entry.schedule, entry.default_now()))
        fence = self._claim(tick, new_entry)
        return None if fence is None else self._with_headers(entry, tick, fence)

    def _take_last_runs(self) -> None:
        """On becoming leader: interval entries continue from their last run in Redis."""
        lock = self._lock
        if lock is None:
            return
        entries = [
            e
            for e in self.schedule.values()
            if is_interval(e.schedule) and not isinstance(e.schedule, AlignedInterval)
        ]
        if not entries:
            return
        try:
            keys = [last_run_key(lock.keys.lock, str(e.name)) for e in entries]
            values = redis_client_for_app(self.app).mget(keys)
        except RedisError as exc:
            self._warn("beat: cannot read the last runs of interval entries (%s); using this beat's own", exc)
            return
        for entry, value in zip(entries, values, strict=True):
            last = _last_run_at(value) if value is not None else None
            if last is not None:
                self._ran_at(entry, last)

    @staticmethod
    def _ran_at(entry: Any, last: datetime, later_only: bool = True) -> None:
        """Record that ``entry`` last ran at ``last`` (by default only if that is later than it knows)."""
        known = getattr(entry, "last_run_at", None)
        if not later_only or known is None or _aware(entry.schedule, known) < last:
            entry.last_run_at = last.astimezone(_aware(entry.schedule, entry.default_now()).tzinfo)

    def _claim(self, tick: Tick, new_entry: Any = None) -> int | None:
        """Claim the run ``tick`` for publishing; the leader's fence when claimed, else None."""
        lock = self._lock
        token = lock.token if lock is not None else None
        if not self._leading or lock is None or token is None or lock.fence is None:
            logger.info("beat: not publishing %r (tick %s): not the leader", tick.entry, tick.label)
            return None
        if lock.lost:
            self._step_down(lock.lost_reason or "its lease ran out before it was renewed")
            logger.info("beat: not publishing %r (tick %s): not the leader", tick.entry, tick.label)
            return None
        claimant = f"fence {lock.fence} {self.identity}"
        if tick.run_every is not None:
            script, key = CLAIM_INTERVAL_RUN, last_run_key(lock.keys.lock, tick.entry)
            args: list[Any] = [token, tick.micros, _micros(tick.run_every), claimant, tick.ttl_ms]
        else:
            script, key = CLAIM_TICK, tick_key(lock.keys.lock, tick)
            args = [token, claimant, tick.ttl_ms]
        try:
            status, holder = run_script(redis_client_for_app(self.app), script, [lock.keys.lock, key], args)
        except RedisError as exc:
            self._warn("beat: not publishing %r (tick %s): cannot claim it: %s", tick.entry, tick.label, exc)
            return None
        status = int(status)
        if status == 1:
            return int(lock.fence)
        if status == 0:
            holder = holder.decode() if isinstance(holder, bytes) else str(holder)
            if tick.run_every is None:
                logger.info(
                    "beat: skipped duplicate tick of %r scheduled at %s: already claimed by %s",
                    tick.entry,
                    tick.label,
                    holder,
                )
                return None
            last = _last_run_at(holder)
            if last is not None and new_entry is not None:
                self._ran_at(new_entry, last, later_only=False)  # the next run follows that one
            logger.info(
                "beat: skipped a run of %r at %s: it last ran at %s (%s), less than its interval (%gs) ago",
                tick.entry,
                tick.label,
                iso_utc(last) if last is not None else "?",
                holder.split(" ", 1)[-1],
                tick.run_every.total_seconds(),
            )
            return None
        self._step_down("a claim found the lease expired or held by another beat")
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
        setattr(clone, CLAIMED, True)
        return clone

    # -- shutdown --------------------------------------------------------------------

    def close(self) -> None:
        """Sync and close the schedule, then hand the lease over (a standby is woken at once)."""
        try:
            super().close()  # type: ignore[misc]
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
        base = str(super().info)  # type: ignore[misc]
        return (
            f"{base}\n    . leader lease -> {self.lock_prefix}{{{self.lock_name}}} "
            f"({self.lease:g}s, renewed every {self.renew_every:g}s)"
        )


class LockedScheduler(LeaderLease, PersistentScheduler):  # type: ignore[misc]
    """Celery's ``PersistentScheduler`` (the default, a local schedule file) with the leader
    lease and each-run-once claims of :class:`LeaderLease`."""


def locked_scheduler(base: type) -> type:
    """``base`` (a ``celery.beat.Scheduler`` subclass) with the leader lease and claims added."""
    if not isinstance(base, type) or not issubclass(base, Scheduler):
        raise TypeError(f"locked_scheduler() needs a celery.beat.Scheduler subclass, got {base!r}")
    if issubclass(base, LeaderLease):
        return base
    namespace = {"__module__": __name__, "__doc__": base.__doc__}
    return type(f"Locked{base.__name__}", (LeaderLease, base), namespace)


class _InsteadOfRedBeatsLock:
    """RedBeat's own beat lock (``redbeat_lock_key``) is replaced by the leader lease: with
    both, a standby would block in RedBeat's lock at start instead of standing by."""

    lock_key: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock_key = None


#: Schedulers of other packages, made on first use (``celery_dlock.beat:<name>``).
_OPTIONAL_SCHEDULERS = {
    "LockedDatabaseScheduler": ("django_celery_beat.schedulers", "DatabaseScheduler", "django-celery-beat"),
    "LockedRedBeatScheduler": ("redbeat", "RedBeatScheduler", "celery-redbeat"),
}


def __getattr__(name: str) -> Any:
    if name not in _OPTIONAL_SCHEDULERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, class_name, package = _OPTIONAL_SCHEDULERS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"celery_dlock.beat.{name} needs {package}: pip install {package} ({exc})") from exc
    base = getattr(module, class_name)
    if name == "LockedRedBeatScheduler":
        base = type("RedBeatScheduler", (_InsteadOfRedBeatsLock, base), {"__module__": __name__})
    made = locked_scheduler(base)
    made.__name__ = made.__qualname__ = name
    globals()[name] = made
    return made
