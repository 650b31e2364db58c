"""What a run does when its lock is held by another run: the ``on_contention`` policies.

``on_contention`` takes a name (``"skip"``, ``"retry"``, ``"wait"``, ``"fail"``)
or one of the objects below. A parameter left as ``None`` in an object comes
from the task's options (``lock_retry_countdown``, ``lock_wait``, ...), which in
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
    """Re-queue the message with exponential backoff and jitter; fail when the lock retries run out.

    The n-th lock retry (n = 0, 1, ...) waits ``min(backoff_max, countdown * 2**n)``
    seconds, of which a random half is dropped when ``jitter`` is on (so
    duplicates spread out instead of retrying in lockstep). Lock retries are
    counted in a message header of their own: they never consume the task's
    ``max_retries``.
    """

    countdown: float | None = None
    backoff_max: float | None = None
    max_retries: int | None = None
    jitter: bool = True

    name = "retry"

    def __post_init__(self) -> None:
        check_seconds("Retry(countdown=...)", self.countdown, allow_none=True)
        check_seconds("Retry(backoff_max=...)", self.backoff_max, allow_none=True)
        if self.max_retries is not None:
            check_count("Retry(max_retries=...)", self.max_retries)
        if not isinstance(self.jitter, bool):
            raise TypeError(f"Retry(jitter=...) must be True or False, got {self.jitter!r}")
        if self.countdown is not None and self.backoff_max is not None and self.backoff_max < self.countdown:
            raise ValueError(
                f"Retry(backoff_max=...) must be >= countdown ({self.countdown!r}), got {self.backoff_max!r}"
            )

    def countdown_for(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds before lock retry number ``attempt`` (0-based)."""
        assert self.countdown is not None and self.backoff_max is not None
        delay = float(min(self.backoff_max, self.countdown * (2 ** min(attempt, 60))))
        if self.jitter:
            delay = delay / 2 + (rng or random).uniform(0, delay / 2)
        return delay


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

    retry_countdown: float
    retry_backoff_max: float
    max_retries: int
    wait: float
    wait_fallback: Skip | Fail | Retry


def _complete_retry(policy: Retry, defaults: PolicyDefaults) -> Retry:
    countdown = policy.countdown if policy.countdown is not None else defaults.retry_countdown
    backoff_max = policy.backoff_max if policy.backoff_max is not None else defaults.retry_backoff_max
    return Retry(
        countdown=countdown,
        backoff_max=max(backoff_max, countdown),
        max_retries=policy.max_retries if policy.max_retries is not None else defaults.max_retries,
        jitter=policy.jitter,
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
