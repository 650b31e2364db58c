"""Validation of lock options, shared by the sync and asyncio locks.

Every check raises ``TypeError`` (wrong type) or ``ValueError`` (wrong value)
naming the parameter and the value it got, before anything touches Redis.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery_dlock.keys import DEFAULT_PREFIX, check_name, check_prefix

# A lease longer than this is almost certainly a unit mistake (ms given as s).
MAX_TIMEOUT_SECONDS = 365 * 24 * 3600.0


def check_seconds(
    parameter: str,
    value: object,
    *,
    allow_zero: bool = False,
    allow_none: bool = False,
    maximum: float = MAX_TIMEOUT_SECONDS,
) -> float | None:
    """Return ``value`` as float seconds, or raise naming ``parameter``."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{parameter} must be a number of seconds, got None")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{parameter} must be a number of seconds (int or float), got {type(value).__name__}: {value!r}"
        )
    seconds = float(value)
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"{parameter} must be a finite number of seconds, got {value!r}")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{parameter} must be {bound} seconds, got {value!r}")
    if seconds > maximum:
        raise ValueError(f"{parameter} must be at most {maximum:g} seconds, got {value!r}")
    return seconds


def check_count(parameter: str, value: object) -> int:
    """Return ``value`` if it is a non-negative int, or raise naming ``parameter``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{parameter} must be an int, got {type(value).__name__}: {value!r}")
    if value < 0:
        raise ValueError(f"{parameter} must be >= 0, got {value!r}")
    return value


def check_bool(parameter: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{parameter} must be True or False, got {type(value).__name__}: {value!r}")
    return value


def to_millis(seconds: float) -> int:
    """Seconds to whole milliseconds for PX/PEXPIRE (at least 1 ms)."""
    return max(1, round(seconds * 1000))


@dataclass(frozen=True)
class LockOptions:
    """The validated settings of one lock."""

    name: str
    timeout: float
    retry_times: int
    retry_delay: float
    auto_renewal: bool
    renewal_interval: float
    blocking_timeout: float | None
    on_lost: Callable[[Any], object] | None
    prefix: str
    max_lease: float | None
    timeout_ms: int  # the lease as sent to Redis (PX), computed once
    note_ttl: float | None = None  # keep handover notes this long (None: no notes)

    @property
    def can_wait(self) -> bool:
        """Whether a blocking acquire makes more than one attempt."""
        return self.retry_times > 0 or self.blocking_timeout is not None

    @classmethod
    def build(
        cls,
        lock_name: object,
        *,
        timeout: object = 30,
        retry_times: object = 0,
        retry_delay: object = 0.1,
        auto_renewal: object = False,
        renewal_interval: object = None,
        blocking_timeout: object = None,
        on_lost: object = None,
        prefix: object = DEFAULT_PREFIX,
        max_lease: object = None,
        note_ttl: object = None,
    ) -> LockOptions:
        name = check_name(lock_name)
        settings = (timeout, retry_times, retry_delay, auto_renewal, renewal_interval, blocking_timeout)
        try:
            checked = _checked_settings(*settings, prefix, max_lease, note_ttl)
        except TypeError:  # an unhashable value, or a wrong type: check uncached for the right error
            checked = _checked_settings.__wrapped__(*settings, prefix, max_lease, note_ttl)
        if on_lost is not None and not callable(on_lost):
            raise TypeError(
                f"on_lost must be a callable taking the lock, got {type(on_lost).__name__}: {on_lost!r}"
            )
        # What cls(name=name, on_lost=on_lost, **checked) makes, without a frozen dataclass's
        # object.__setattr__ per field: a lock is built per Celery task run.
        options = object.__new__(cls)
        options.__dict__.update(checked, name=name, on_lost=on_lost)
        return options


# The longest renewal interval, as a share of the lease: the rest is the renewal's time to
# reach Redis (and a retry's) before the lease runs out.
MAX_RENEWAL_SHARE = 0.9


# Locks are often made over and over with the same settings (a Celery task makes
# one per run): their checks are remembered, keyed by value and type (so True is
# never taken for 1).
@functools.lru_cache(maxsize=256, typed=True)
def _checked_settings(
    timeout: object,
    retry_times: object,
    retry_delay: object,
    auto_renewal: object,
    renewal_interval: object,
    blocking_timeout: object,
    prefix: object,
    max_lease: object,
    note_ttl: object,
) -> dict[str, Any]:
    """Every LockOptions field but the name and on_lost, checked (the dict is shared: do not change it)."""
    lease = check_seconds("timeout", timeout)
    assert lease is not None
    if lease < 0.001:
        raise ValueError(f"timeout must be at least 0.001 seconds (1 ms), got {timeout!r}")
    delay = check_seconds("retry_delay", retry_delay, allow_zero=True)
    assert delay is not None
    interval = check_seconds("renewal_interval", renewal_interval, allow_none=True)
    if interval is None:
        interval = lease / 3
    elif interval > lease * MAX_RENEWAL_SHARE:
        raise ValueError(
            f"renewal_interval must be at most 90 % of timeout ({timeout!r} s), leaving room for "
            f"the renewal's round trip before the lease ends, got {renewal_interval!r}"
        )
    cap = check_seconds("max_lease", max_lease, allow_none=True)
    if cap is not None and cap < lease:
        raise ValueError(f"max_lease must be >= timeout ({timeout!r} s), got {max_lease!r}")
    return {
        "timeout": lease,
        "retry_times": check_count("retry_times", retry_times),
        "retry_delay": delay,
        "auto_renewal": check_bool("auto_renewal", auto_renewal),
        "renewal_interval": interval,
        "blocking_timeout": check_seconds(
            "blocking_timeout", blocking_timeout, allow_zero=True, allow_none=True
        ),
        "prefix": check_prefix(prefix),
        "max_lease": cap,
        "timeout_ms": to_millis(lease),
        "note_ttl": check_seconds("note_ttl", note_ttl, allow_none=True),
    }
