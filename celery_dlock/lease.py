"""The I/O-free half of a lock: its state, and every decision that needs no network.

Both :class:`celery_dlock.DistributedLock` and
:class:`celery_dlock.asyncio.DistributedLock` subclass :class:`LockCore`; they
only add the round trips. Keeping the decisions here (how long the lease is
trusted, how long a waiter sleeps, how a script reply is read) is what keeps
the two APIs from drifting apart.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery_dlock.errors import LockError, LockLost
from celery_dlock.keys import DEFAULT_PREFIX, LockKeys
from celery_dlock.options import LockOptions, check_seconds, to_millis
from celery_dlock.scripts import ACQUIRE, JOIN, RELEASE, TRY, BoundScript

logger = logging.getLogger("celery_dlock")

# The local clock may run a little fast relative to the server's; trust a lease
# for 99 % of its length minus 2 ms (the Redlock paper's margin). The lease is
# measured from the moment the request was *sent*, which is never later than the
# moment the server started the expiry.
CLOCK_DRIFT_FACTOR = 0.01
CLOCK_DRIFT_MARGIN = 0.002

TOKEN_BYTES = 16  # 128 bits from os.urandom

# Release waits at most this long for a renewal already on the wire to come back
# (a late renewal is harmless anyway: it is token-checked and finds no key).
RENEWAL_DRAIN_WAIT = 2.0

# A blocking waiter that cannot reach Redis tries again after at least this long.
MIN_WAIT_AFTER_ERROR = 0.05

# Every lock operation ends on its own deadline (see AttemptPlan.attempt_deadline and
# LockCore.operation_deadline). An attempt sent just before blocking_timeout still gets
# LAST_ATTEMPT_GRACE for its reply, and the one best-effort clean-up after a failed
# acquire (leaving the waiters queue, freeing a lock an unanswered attempt may have
# taken) gets CLEANUP_GRACE: acquire ends within blocking_timeout + 0.75 s.
LAST_ATTEMPT_GRACE = 0.25
CLEANUP_GRACE = 0.5


# How many times this process image was forked (counted in the child): a lock acquired
# in another generation belongs to the parent process, not to this one.
_forks = 0


def _count_fork_in_child() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork_in_child)


def process_generation() -> int:
    """Changes in a forked child, so a lock can cache per-process things (its notifier and
    inbox) safely."""
    return _forks


def new_token() -> str:
    """A fresh owner token: 128 random bits from the OS, hex-encoded."""
    return os.urandom(TOKEN_BYTES).hex()


def key_encoder(client: Any) -> Callable[[str], str | bytes]:
    """How ``client`` encodes a key (always a str here): redis-py's Encoder does
    ``str.encode(encoding, errors)`` after type checks that cost more than that."""
    get_encoder = getattr(client, "get_encoder", None)
    if get_encoder is None:
        return lambda key: key
    encoder = get_encoder()
    encoding, errors = getattr(encoder, "encoding", None), getattr(encoder, "encoding_errors", None)
    if isinstance(encoding, str) and isinstance(errors, str):
        return lambda key: key.encode(encoding, errors)
    encode: Callable[[str], str | bytes] = encoder.encode
    return encode


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def trusted_until(sent_at: float, lease_ms: int) -> float:
    """Monotonic time until which a lease granted for a request sent at ``sent_at`` is surely ours."""
    lease = lease_ms / 1000.0
    return sent_at + lease * (1 - CLOCK_DRIFT_FACTOR) - CLOCK_DRIFT_MARGIN


@dataclass(frozen=True)
class AcquireReply:
    """What one acquire attempt answered (or the error that kept it from answering)."""

    acquired: bool
    remaining_ms: int | None = None  # lease left on the other holder's lock; -1: no expiry
    error: LockError | None = None  # Redis unreachable: a blocking waiter keeps trying

    def give_up(self) -> bool:
        """What acquire returns when no attempt is left: False, or the last error raised."""
        if self.error is not None:
            raise self.error
        return False


# What every attempt that took the lock answers (the fence is on the lock object).
ACQUIRED = AcquireReply(acquired=True)


class AttemptPlan:
    """Decides, after a failed attempt, whether to try again and how long to wait first.

    ``blocking=False``: exactly one attempt. ``blocking=True``: ``1 + retry_times``
    attempts; with a ``blocking_timeout`` the waiter keeps trying until that
    deadline instead (a non-zero ``retry_times`` still caps the attempts).
    An attempt that cannot reach Redis counts as a failed attempt (the waiter
    keeps trying through a short outage); if the last attempt failed that way,
    acquire raises its error instead of returning False.
    Between attempts it waits at most ``retry_delay`` seconds, at most the other
    holder's remaining lease (expiry wakes nobody, so the waiter must look again
    by then) and never past the deadline; a release notification ends the wait
    earlier.
    """

    def __init__(self, options: LockOptions, blocking: bool, now: float) -> None:
        self._timeout = options.timeout
        self._retry_delay = options.retry_delay
        self._deadline: float | None = None
        self._attempts_left: float
        if not blocking:
            self._attempts_left = 0
        elif options.blocking_timeout is not None:
            self._deadline = now + options.blocking_timeout
            self._attempts_left = options.retry_times or math.inf
        else:
            self._attempts_left = options.retry_times

    def attempt_deadline(self, now: float) -> float:
        """When an attempt sent at ``now`` stops waiting for its reply: one lease from now,
        and never later than LAST_ATTEMPT_GRACE past ``blocking_timeout``. An attempt that got
        no reply by then ends the acquire (its late reply could take the lock for this
        acquire's token)."""
        if self._deadline is None:
            return now + self._timeout
        # The last attempt may start at blocking_timeout: it still gets a moment.
        return min(max(self._deadline, now) + LAST_ATTEMPT_GRACE, now + self._timeout)

    def may_retry(self, now: float) -> bool:
        """Whether another attempt will follow a failed one (checked before subscribing)."""
        if self._attempts_left <= 0:
            return False
        return self._deadline is None or now < self._deadline

    def next_wait(self, reply: AcquireReply, now: float) -> float | None:
        """Seconds to wait before the next attempt, or None to give up."""
        if self._attempts_left <= 0:
            return None
        if self._deadline is not None and now >= self._deadline:
            return None
        self._attempts_left -= 1
        wait = self._retry_delay
        if reply.error is not None:
            wait = max(wait, MIN_WAIT_AFTER_ERROR)  # Redis unreachable: do not spin
        if reply.remaining_ms is not None and reply.remaining_ms >= 0:
            # +1 ms: look again just after the server has expired the key.
            wait = min(wait, reply.remaining_ms / 1000.0 + 0.001)
        if self._deadline is not None:
            wait = min(wait, self._deadline - now)
        return max(0.0, wait)


def is_acquisition(reply: Any) -> bool:
    """Whether an ACQUIRE reply says the lock was taken (a fence, or {fence, note})."""
    return isinstance(reply, int) or (isinstance(reply, (list, tuple)) and len(reply) == 2)


def check_extension(additional_time: object, replace: object) -> int:
    seconds = check_seconds("additional_time", additional_time)
    assert seconds is not None
    if not isinstance(replace, bool):
        raise TypeError(f"replace must be True or False, got {type(replace).__name__}: {replace!r}")
    return to_millis(seconds)


class LockCore:
    """State and non-I/O behaviour shared by the sync and asyncio locks.

    The owner token lives on the lock object (never in thread-local storage),
    so each lock object is one owner: two coroutines or threads using two lock
    objects can never release each other's lock.
    """

    #: The driver's redis-py client (sync or asyncio); the protocol only names its server.
    redis: Any

    def __init__(
        self,
        redis: Any,
        lock_name: str,
        timeout: float = 30,
        retry_times: int = 0,
        retry_delay: float = 0.1,
        auto_renewal: bool = False,
        renewal_interval: float | None = None,
        blocking_timeout: float | None = None,
        on_lost: Callable[[Any], object] | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        max_lease: float | None = None,
        note_ttl: float | None = None,
    ) -> None:
        options = LockOptions.build(
            lock_name,
            timeout=timeout,
            retry_times=retry_times,
            retry_delay=retry_delay,
            auto_renewal=auto_renewal,
            renewal_interval=renewal_interval,
            blocking_timeout=blocking_timeout,
            on_lost=on_lost,
            prefix=prefix,
            max_lease=max_lease,
            note_ttl=note_ttl,
        )
        self.options = options
        self.keys = LockKeys.for_name(options.name, options.prefix)
        # The hot path's script calls, bound by the driver (_bind_scripts), and the
        # lease, encoded once.
        self._acquire_script: BoundScript
        self._release_script: BoundScript
        self._lease_arg = str(options.timeout_ms).encode()
        # The mode of a blocking acquire's first attempt: queue on failure only if
        # more attempts follow.
        self._blocking_mode = JOIN if options.can_wait else TRY
        self._token: str | None = None
        self._fence: int | None = None
        self._note: str | None = None
        self._lost = False
        self._lost_reason = ""
        self._lost_notified = False
        self._trusted_until = 0.0
        self._fork_generation = _forks  # of the process that holds the current acquisition
        # When the latest extend() got its reply: a renewal sent before that may have
        # run before the extend on the server, so its reply says nothing about the
        # lease now and must not raise the trust.
        self._extended_at = 0.0
        # Whether the watchdog watches every acquisition of this lock (auto_renewal
        # or on_lost); _tracked: whether it watches the current one, so release must
        # stop its renewal first.
        self._watched = self.options.auto_renewal or self.options.on_lost is not None
        self._tracked = False
        # The token a failed acquisition was last cleaned up after (protocol.abandon runs once).
        self._cleaned_up: str | None = None
        self.redis = self._check_client(redis)
        self._bind_scripts(self.redis)
        self._inbox_cache: Any = None  # the driver's notifier and inbox, see its _inbox()

    @staticmethod
    def _check_client(client: object) -> Any:
        """The driver's check that ``client`` is a client it can drive (a clear error if not)."""
        raise NotImplementedError

    # -- public, cheap, no round trip ---------------------------------------------

    @property
    def name(self) -> str:
        return self.options.name

    @property
    def timeout(self) -> float:
        return self.options.timeout

    @property
    def token(self) -> str | None:
        """The random owner token while this object holds the lock, else None."""
        return self._token

    @property
    def fence(self) -> int | None:
        """Fencing token of the current acquisition: larger than every earlier one for this name."""
        return self._fence

    @property
    def note(self) -> str | None:
        """The note the last holder left with its release, read with this acquisition.

        Only for locks made with ``note_ttl`` (None otherwise, and when no note
        was left or it expired). Acquisition and note are one atomic step, so the
        note is exactly what the previous holder released with.
        """
        return self._note

    @property
    def lost(self) -> bool:
        """True once the lock is known (or must be assumed) to be no longer ours.

        That is: renewal or extend found another token or no key, or the lease
        we last obtained has run out on the local monotonic clock.
        """
        if self._lost:
            return True
        if self._token is None:
            return False
        return self._fork_generation != _forks or time.monotonic() >= self._trusted_until

    @property
    def lost_reason(self) -> str:
        return self._lost_reason

    def ensure_held(self) -> None:
        """Raise :class:`LockLost` unless this object holds the lock right now (no round trip)."""
        if self._token is None:
            raise LockLost(f"lock {self.name!r} is not held by this object")
        if self._fork_generation != _forks:
            raise LockLost(
                f"lock {self.name!r} is held by the process this one was forked from, not by this one"
            )
        if self.lost:
            if not self._lost:
                self._mark_lost("its lease ran out before it was renewed")
                self._notify_lost()
            raise LockLost(f"lock {self.name!r} was lost: {self._lost_reason}")

    @property
    def trusted_until(self) -> float:
        """Monotonic deadline until which the current lease is surely ours."""
        return self._trusted_until

    def __repr__(self) -> str:
        state = "lost" if self._lost else ("held" if self._token else "free")
        return f"<{type(self).__name__} {self.name!r} {state} fence={self._fence}>"

    # -- transitions used by the drivers --------------------------------------------

    def operation_deadline(self, now: float) -> float:
        """When a release, an extend or a query started at ``now`` stops waiting: one lease."""
        return now + self.options.timeout

    def _bind_scripts(self, client: Any) -> None:
        """Bind the acquire and release scripts to this lock's KEYS, encoded as ``client`` encodes keys."""
        note_key = (self.keys.note,) if self.options.note_ttl is not None else ()
        acquire_keys = self.keys.acquire_keys + note_key
        release_keys = self.keys.release_keys + note_key
        # The scripts share most keys (in another order): encode each once.
        encode = key_encoder(client)
        encoded = {key: encode(key) for key in {*acquire_keys, *release_keys}}
        self._acquire_script = ACQUIRE.bind([encoded[key] for key in acquire_keys])
        self._release_script = RELEASE.bind([encoded[key] for key in release_keys])

    def make_token(self) -> str:
        """The owner token for a new acquisition: 128 random bits, hex.

        Subclasses may append owner information (the Celery layer adds the task id,
        worker and pid, so anyone can see who holds a lock); they must keep the
        random part, which is what makes the token unguessable.
        """
        return new_token()

    def _held_token(self) -> str | None:
        """The token to release or extend with, or None: not held, or held by the process
        this one was forked from (whose lock a child must never release or extend; the
        child's copy of the object forgets it)."""
        if self._token is not None and self._fork_generation != _forks:
            self._forget()
        return self._token

    def _start_attempt(self) -> str:
        if self._held_token() is not None:
            raise LockError(
                f"lock {self.name!r} is already held by this object (fence {self._fence}); "
                "release it first, or use another DistributedLock object"
            )
        return self.make_token()

    def _take_reply(self, reply: Any, token: str, sent_at: float) -> AcquireReply:
        """Read the ACQUIRE script's answer to an attempt sent at ``sent_at``.

        An integer is the fence of an acquisition, which is recorded here; otherwise
        it is [ms until it is worth trying again] (and, for a queued attempt, the
        queue entry's score, which the lock does not need).

        Every acquisition, a handed-over one included, is recorded here, from the
        reply of an attempt that set the full lease: a release hands the lock over
        with a short lease only, which the waiter's next attempt confirms.
        """
        if isinstance(reply, int):
            self._acquired(token, reply, sent_at)
            return ACQUIRED
        if len(reply) == 2:  # {fence, note}: a lock with notes
            self._acquired(token, int(reply[0]), sent_at)
            note = reply[1]
            if isinstance(note, bytes):
                self._note = note.decode("utf-8", "replace")
            else:  # a str (decode_responses), or no note: nil (RESP2) or false (RESP3 servers may say)
                self._note = note if isinstance(note, str) else None
            return ACQUIRED
        return AcquireReply(acquired=False, remaining_ms=int(reply[0]))

    def _acquired(self, token: str, fence: int, sent_at: float) -> None:
        self._fork_generation = _forks
        self._token = token
        self._fence = fence
        self._lost = False
        self._lost_reason = ""
        self._lost_notified = False
        self._trusted_until = trusted_until(sent_at, self.options.timeout_ms)

    def _renewed(self, lease_ms: int, sent_at: float) -> None:
        """A renewal sent at ``sent_at`` set the lease to ``lease_ms`` (ignored if an
        extend() returned after it was sent: the extend's result is the later word)."""
        if not self._lost and sent_at >= self._extended_at:
            self._trusted_until = max(self._trusted_until, trusted_until(sent_at, lease_ms))

    def _extended(self, lease_ms: int, sent_at: float, now: float) -> None:
        """An extend() sent at ``sent_at`` set the lease to ``lease_ms``; its reply came at ``now``."""
        self._trusted_until = trusted_until(sent_at, lease_ms)
        self._extended_at = now

    def _extend_started(self, lease_ms: int | None, sent_at: float) -> None:
        """An extend() sent at ``sent_at`` is on its way. Until its answer no renewal reply
        raises the trust (the extend may run after that renewal and shorten the lease), and
        one that sets the lease (``lease_ms``, ``replace=True``) is trusted no further than
        that lease already: it may run even if no answer ever comes."""
        self._extended_at = math.inf
        if lease_ms is not None:
            self._trusted_until = min(self._trusted_until, trusted_until(sent_at, lease_ms))

    def _extend_unanswered(self, now: float) -> None:
        """The extend() got no answer: renewals sent from ``now`` on count again."""
        self._extended_at = now

    def _mark_lost(self, reason: str) -> bool:
        """Record that the lock is lost; True if this call is the one that found out."""
        if self._lost or self._token is None:
            return False
        self._lost = True
        self._lost_reason = reason
        logger.warning("lock %r (fence %s) lost: %s", self.name, self._fence, reason)
        return True

    def _notify_lost(self) -> None:
        """Call ``on_lost`` once per acquisition; its exceptions are logged, never raised."""
        if self._lost_notified:
            return
        self._lost_notified = True
        callback: Callable[[Any], object] | None = self.options.on_lost
        if callback is None:
            return
        try:
            callback(self)
        except Exception:
            logger.exception("on_lost callback of lock %r raised", self.name)

    def _extend_args(self, token: str, lease_ms: int, replace: bool) -> list[Any]:
        """ARGV of the EXTEND script for ``extend(additional_time, replace)``."""
        cap = to_millis(self.options.max_lease) if self.options.max_lease else 0
        return [token, lease_ms, "set" if replace else "add", cap]

    def _release_args(self, token: str, note: str | None) -> tuple[str | bytes, ...]:
        """ARGV of the RELEASE script after its KEYS; checks ``note`` before anything is sent."""
        if note is None:
            return (token,)
        if not isinstance(note, str):
            raise TypeError(f"note must be a str or None, got {type(note).__name__}: {note!r}")
        note_ttl = self.options.note_ttl
        if note_ttl is None:
            raise ValueError(
                f"lock {self.name!r} keeps no notes: create it with note_ttl=<seconds> to release with a note"
            )
        # The note goes as UTF-8 whatever the client's encoding, as it is read back.
        return (token, "note", note.encode(), str(to_millis(note_ttl)))

    def _finish_release(self, token: str, reply: Any) -> bool:
        """After the release script answered: True if it released. A lock that was not
        ours any more was lost. Raises LockError, once the object holds nothing, when the
        lock was released and handed over but the waiter's wake-up was refused."""
        refused = reply if isinstance(reply, (list, tuple)) else None
        released = refused is not None or bool(reply)
        if not released and self._mark_lost("at release it had expired or been taken over"):
            self._notify_lost()
        if self._token == token:
            self._forget()
        if refused is not None:
            channel, error = (_text(part) for part in refused[1:3])
            raise LockError(
                f"lock {self.name!r} was released and handed to the next waiter, but Redis refused "
                f"to PUBLISH its wake-up on {channel!r} ({error}); the waiter finds the lock on its "
                f"next timed attempt. Grant the lock's user the channel pattern "
                f"&{self.options.prefix}* (ACL SETUSER ... &{self.options.prefix}*)"
            )
        return released

    def _forget(self) -> None:
        self._tracked = False
        self._token = None
        self._fence = None
        self._trusted_until = 0.0
