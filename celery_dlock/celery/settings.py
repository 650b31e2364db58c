"""The lock options of a task, with their app-wide defaults, checked once when the task is bound.

Every option is a task attribute (``@app.task(base=LockedTask, lock_timeout=10)``)
whose ``None`` means "use the app setting"; each setting is the attribute name
with ``lock_`` dropped and ``dlock_`` in front (``lock_timeout`` <-
``dlock_timeout``). This is Celery's own ``from_config`` convention: the
settings are read once per task class, when Celery binds it to the app.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from celery_dlock.celery.config import lock_prefix, setting
from celery_dlock.celery.keys import LockKey, build_lock_key
from celery_dlock.celery.policies import (
    Policy,
    PolicyDefaults,
    Retry,
    check_backoff,
    parse_fallback,
    resolve_policy,
)
from celery_dlock.options import check_bool, check_count, check_seconds

REDIS_ERROR_CHOICES = ("contention", "run")
#: How a skipped run ends: FAILURE holding TaskSkipped (task-failed event, errbacks run),
#: or REVOKED (task-revoked event; get() raises TaskRevokedError).
SKIP_STATE_CHOICES = ("failure", "revoked")


@dataclass(frozen=True)
class Option:
    attribute: str
    setting: str | None  # None: no app-wide default (lock_key)
    default: Any


OPTIONS: tuple[Option, ...] = (
    Option("lock_key", None, None),
    Option("lock_timeout", "dlock_timeout", 30.0),
    Option("on_contention", "dlock_on_contention", "skip"),
    Option("lock_retry_backoff", "dlock_retry_backoff", True),
    Option("lock_retry_backoff_max", "dlock_retry_backoff_max", 60.0),
    Option("lock_retry_jitter", "dlock_retry_jitter", True),
    Option("lock_max_retries", "dlock_max_retries", 20),
    Option("lock_wait", "dlock_wait", 10.0),
    Option("lock_wait_fallback", "dlock_wait_fallback", "retry"),
    Option("lock_on_redis_error", "dlock_on_redis_error", "contention"),
    Option("dedup_on_publish", "dlock_dedup_on_publish", False),
    Option("dedup_timeout", "dlock_dedup_timeout", 3600.0),
    Option("lock_skip_covered", "dlock_skip_covered", True),
    Option("lock_skip_state", "dlock_skip_state", "failure"),
    Option("lock_redelivery_wait", "dlock_redelivery_wait", 5.0),
)
OPTION_NAMES = tuple(option.attribute for option in OPTIONS)
#: Options and settings that were renamed to Celery's own names: using the old name is
#: an error that says the new one (never silently ignored).
RENAMED = {
    "lock_retry_countdown": "lock_retry_backoff",
    "dlock_retry_countdown": "dlock_retry_backoff",
}
DEFAULT_REDELIVERY_BACKOFF = Retry(backoff=1.0, backoff_max=60.0, max_retries=0, jitter=True)


@dataclass(frozen=True)
class TaskLockConfig:
    """Everything a locked task needs at run and publish time, already validated."""

    task_name: str
    key: LockKey
    timeout: float
    policy: Policy
    on_redis_error: str
    dedup_on_publish: bool
    dedup_timeout: float
    prefix: str
    #: With the skip policy: also skip a call requested while the identical call was queued or running.
    skip_covered: bool = True
    #: How a skipped run ends in a worker: "failure" or "revoked" (SKIP_STATE_CHOICES).
    skip_state: str = "failure"
    #: Longest time a redelivered message waits in a pool process for the earlier
    #: delivery of its own task id; then it re-queues itself (see runner.py).
    redelivery_wait: float = 5.0
    #: The countdowns of those re-queues (the lock retry schedule, never running out).
    redelivery_backoff: Retry = DEFAULT_REDELIVERY_BACKOFF


def effective_options(given: Mapping[str, Any], conf: Any) -> dict[str, tuple[Any, str]]:
    """Each option's value and where it came from (the option name, or the setting that filled it)."""
    check_not_renamed(lambda name: given.get(name) is not None, "a lock option")
    check_not_renamed(lambda name: setting(conf, name) is not None, "an app setting")
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown lock option {unknown[0]!r}; the options are: {', '.join(OPTION_NAMES)}")
    values: dict[str, tuple[Any, str]] = {}
    for option in OPTIONS:
        value = given.get(option.attribute)
        source = option.attribute
        if value is None and option.setting is not None:
            value = setting(conf, option.setting)
            source = option.setting
            if value is None:
                value = option.default
        values[option.attribute] = (value, source)
    return values


def check_not_renamed(present: Callable[[str], bool], where: str) -> None:
    """Raise naming the new name if an old, renamed option or setting is given."""
    for old, new in RENAMED.items():
        if present(old):
            raise TypeError(f"{old!r} ({where}) is now called {new!r}, with Celery's meaning; rename it")


def build_config(
    given: Mapping[str, Any],
    conf: Any,
    task_name: str,
    signature: inspect.Signature,
    default_retry_delay: float = 180.0,
) -> TaskLockConfig:
    """Validate ``given`` options (missing ones from ``conf``) into a :class:`TaskLockConfig`.

    Errors are ``TypeError``/``ValueError`` naming the task, the option (or the
    app setting it came from) and the offending value.
    """
    values = effective_options(given, conf)

    def named(option: str) -> str:
        return f"{values[option][1]} of task {task_name!r}"

    try:
        timeout = check_seconds(named("lock_timeout"), values["lock_timeout"][0])
        assert timeout is not None
        if timeout < 0.01:
            raise ValueError(f"{named('lock_timeout')} must be at least 0.01 seconds, got {timeout!r}")
        backoff = check_backoff(named("lock_retry_backoff"), values["lock_retry_backoff"][0])
        backoff_max = check_seconds(named("lock_retry_backoff_max"), values["lock_retry_backoff_max"][0])
        assert backoff_max is not None
        jitter = check_bool(named("lock_retry_jitter"), values["lock_retry_jitter"][0])
        retry_delay = check_seconds(
            f"default_retry_delay of task {task_name!r}", default_retry_delay, allow_zero=True
        )
        assert retry_delay is not None
        max_retries = check_count(named("lock_max_retries"), values["lock_max_retries"][0])
        wait = check_seconds(named("lock_wait"), values["lock_wait"][0], allow_zero=True)
        assert wait is not None
        fallback = parse_fallback(values["lock_wait_fallback"][0], named("lock_wait_fallback"))
        defaults = PolicyDefaults(
            retry_backoff=backoff,
            retry_backoff_max=backoff_max,
            retry_jitter=jitter,
            retry_delay=retry_delay,
            max_retries=max_retries,
            wait=wait,
            wait_fallback=fallback,
        )
        policy = resolve_policy(values["on_contention"][0], defaults, named("on_contention"))
        on_redis_error = check_choice(
            named("lock_on_redis_error"), values["lock_on_redis_error"][0], REDIS_ERROR_CHOICES
        )
        skip_state = check_choice(named("lock_skip_state"), values["lock_skip_state"][0], SKIP_STATE_CHOICES)
        dedup = check_bool(named("dedup_on_publish"), values["dedup_on_publish"][0])
        dedup_timeout = check_seconds(named("dedup_timeout"), values["dedup_timeout"][0])
        assert dedup_timeout is not None
        skip_covered = check_bool(named("lock_skip_covered"), values["lock_skip_covered"][0])
        redelivery_wait = check_seconds(
            named("lock_redelivery_wait"), values["lock_redelivery_wait"][0], allow_zero=True
        )
        assert redelivery_wait is not None
        key = build_lock_key(values["lock_key"][0], task_name, signature)
    except (TypeError, ValueError) as exc:
        # Name the task even when the message came from a shared checker.
        message = str(exc)
        if task_name not in message:
            message = f"task {task_name!r}: {message}"
        raise type(exc)(message) from None
    return TaskLockConfig(
        task_name=task_name,
        key=key,
        timeout=timeout,
        policy=policy,
        on_redis_error=on_redis_error,
        dedup_on_publish=dedup,
        dedup_timeout=dedup_timeout,
        prefix=lock_prefix(conf),
        skip_covered=skip_covered,
        skip_state=skip_state,
        redelivery_wait=redelivery_wait,
        redelivery_backoff=Retry(
            backoff=backoff, backoff_max=backoff_max, max_retries=0, jitter=jitter, delay=retry_delay
        ),
    )


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    allowed = " or ".join(repr(choice) for choice in choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__}: {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def run_signature(task_class: type, instance: Any = None) -> inspect.Signature:
    """The signature a call to the task binds to (``self`` of bound tasks left out).

    Function tasks store ``run`` as a staticmethod (``bind=False``) or as a plain
    function taking ``self`` (``bind=True``); class-based tasks define ``run(self, ...)``.
    """
    if instance is not None:
        return inspect.signature(instance.run)
    raw = inspect.getattr_static(task_class, "run")
    if isinstance(raw, staticmethod):
        return inspect.signature(raw.__func__)
    signature = inspect.signature(raw)
    parameters = list(signature.parameters.values())
    if parameters and parameters[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        parameters = parameters[1:]
    return signature.replace(parameters=parameters)
