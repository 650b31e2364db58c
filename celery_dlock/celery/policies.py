"""What a run does when its lock is held by another run: the ``on_contention`` policies.

``on_contention`` takes a name (``"skip"``, ``"retry"``, ``"wait"``, ``"fail"``)
or one of the objects below. A parameter left as ``None`` in an object comes
from the task's options (``lock_retry_backoff``, ``lock_wait``, ...), which in
turn default to the app's ``dlock_*`` settings. :func:`resolve_policy` fills
them in once, when the task is bound, so a running task only reads plain values.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Union

from celery_dlock.options import check_count, check_seconds


@dataclass(frozen=True)
class Skip:
    """Do not run. The result is a FAILURE with :class:`TaskSkipped` naming the holder's task id."""

    name = "skip"


@dataclass(frozen=True)
class Fail:
    """Fail at once with :class:`celery_dlock.LockNotAcquired`."""

    name = "fail"


@dataclass(frozen=True)
class Retry:
    """Re-queue the message on Celery's autoretry schedule; fail when the lock retries run out.

    The parameters mean what Celery's ``retry_backoff``, ``retry_backoff_max`` and
    ``retry_jitter`` mean for ``autoretry_for``:

    * ``backoff``: ``True`` (a 1 s factor), a number of seconds (the factor; unlike
      Celery, fractions are allowed), or ``False`` (no backoff: every lock retry
      waits the task's ``default_retry_delay``). The n-th lock retry (n = 0, 1, ...)
      waits ``min(backoff_max, backoff * 2**n)`` seconds...
    * ``jitter``: ...or, when on, a random time between 0 and that ("full jitter"),
      so duplicates spread out instead of retrying in lockstep.

    Lock retries are counted in a message header of their own: they never consume the
    task's ``max_retries``.
    """

    backoff: float | bool | None = None
    backoff_max: float | None = None
    max_retries: int | None = None
    jitter: bool | None = None
    #: Every lock retry's delay when ``backoff`` is False: the task's ``default_retry_delay``.
    delay: float | None = None

    name = "retry"

    def __post_init__(self) -> None:
        if self.backoff is not None:
            check_backoff("Retry(backoff=...)", self.backoff)
        check_seconds("Retry(backoff_max=...)", self.backoff_max, allow_none=True)
        check_seconds("Retry(delay=...)", self.delay, allow_zero=True, allow_none=True)
        if self.max_retries is not None:
            check_count("Retry(max_retries=...)", self.max_retries)
        if self.jitter is not None and not isinstance(self.jitter, bool):
            raise TypeError(f"Retry(jitter=...) must be True or False, got {self.jitter!r}")

    @property
    def factor(self) -> float:
        """Seconds before the first lock retry, before jitter (when ``backoff`` is not False)."""
        return 1.0 if self.backoff is True or self.backoff is None else float(self.backoff)

    def countdown_for(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds before lock retry number ``attempt`` (0-based)."""
        if self.backoff is False:
            assert self.delay is not None
            return self.delay
        assert self.backoff_max is not None
        delay = float(min(self.backoff_max, self.factor * (2 ** min(attempt, 60))))
        if self.jitter:
            delay = (rng or random).uniform(0, delay)
        return delay


def check_backoff(parameter: str, value: object) -> float | bool:
    """``value`` as a backoff (True, False or a factor in seconds), or raise naming ``parameter``."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, (int, float)):
        raise TypeError(
            f"{parameter} must be True, False or a number of seconds, got {type(value).__name__}: {value!r}"
        )
    seconds = check_seconds(parameter, value)
    assert seconds is not None
    return seconds


@dataclass(frozen=True)
class Wait:
    """Block in the worker up to ``timeout`` seconds, woken at once when the holder releases.

    If the lock is still held then, ``then`` decides: ``"retry"`` (default),
    ``"fail"``, ``"skip"``, or a :class:`Retry`/:class:`Fail`/:class:`Skip` object.
    """

    timeout: float | None = None
    then: Union[Skip, Fail, Retry, str, None] = None  # noqa: UP007 (dataclass field, py3.10)

    name = "wait"

    def __post_init__(self) -> None:
        check_seconds("Wait(timeout=...)", self.timeout, allow_zero=True, allow_none=True)
        if self.then is not None:
            _fallback(self.then, "Wait(then=...)")


Policy = Union[Skip, Fail, Retry, Wait]  # noqa: UP007
POLICY_NAMES = ("skip", "retry", "wait", "fail")
FALLBACK_NAMES = ("retry", "fail", "skip")


def _fallback(value: object, option: str) -> Skip | Fail | Retry:
    if isinstance(value, (Skip, Fail, Retry)):
        return value
    if isinstance(value, str):
        if value in FALLBACK_NAMES:
            fallbacks: dict[str, Skip | Fail | Retry] = {"retry": Retry(), "fail": Fail(), "skip": Skip()}
            return fallbacks[value]
        raise ValueError(f"{option} must be one of {', '.join(map(repr, FALLBACK_NAMES))}, got {value!r}")
    raise TypeError(
        f"{option} must be 'retry', 'fail', 'skip' or a Retry/Fail/Skip object, "
        f"got {type(value).__name__}: {value!r}"
    )


def parse_policy(value: object, option: str = "on_contention") -> Policy:
    """A policy object from a name or an object, with a clear error for anything else."""
    if isinstance(value, (Skip, Fail, Retry, Wait)):
        return value
    if isinstance(value, str):
        if value in POLICY_NAMES:
            policies: dict[str, Policy] = {"skip": Skip(), "retry": Retry(), "wait": Wait(), "fail": Fail()}
            return policies[value]
        raise ValueError(f"{option} must be one of {', '.join(map(repr, POLICY_NAMES))}, got {value!r}")
    raise TypeError(
        f"{option} must be 'skip', 'retry', 'wait', 'fail' or a Skip/Retry/Wait/Fail object, "
        f"got {type(value).__name__}: {value!r}"
    )


@dataclass(frozen=True)
class PolicyDefaults:
    """The task options a policy object inherits when it leaves a parameter as None."""

    retry_backoff: float | bool
    retry_backoff_max: float
    retry_jitter: bool
    max_retries: int
    wait: float
    wait_fallback: Skip | Fail | Retry
    #: The task's ``default_retry_delay``: every lock retry's delay when backoff is off.
    retry_delay: float = 180.0


def _complete_retry(policy: Retry, defaults: PolicyDefaults) -> Retry:
    return Retry(
        backoff=policy.backoff if policy.backoff is not None else defaults.retry_backoff,
        backoff_max=policy.backoff_max if policy.backoff_max is not None else defaults.retry_backoff_max,
        max_retries=policy.max_retries if policy.max_retries is not None else defaults.max_retries,
        jitter=policy.jitter if policy.jitter is not None else defaults.retry_jitter,
        delay=policy.delay if policy.delay is not None else defaults.retry_delay,
    )


def resolve_policy(value: object, defaults: PolicyDefaults, option: str = "on_contention") -> Policy:
    """``value`` as a policy object with every parameter filled in."""
    policy = parse_policy(value, option)
    if isinstance(policy, Retry):
        return _complete_retry(policy, defaults)
    if isinstance(policy, Wait):
        then = defaults.wait_fallback if policy.then is None else _fallback(policy.then, "Wait(then=...)")
        if isinstance(then, Retry):
            then = _complete_retry(then, defaults)
        return Wait(timeout=defaults.wait if policy.timeout is None else policy.timeout, then=then)
    return policy


def parse_fallback(value: object, option: str) -> Skip | Fail | Retry:
    return _fallback(value, option)
