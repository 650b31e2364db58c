"""Every lock option is checked when the task is registered, with a message naming option and value."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from celery import Celery, Task

import celery_dlock
from celery_dlock.celery import Fail, LockedTask, Retry, Skip, Wait
from celery_dlock.celery.policies import resolve_policy


def finalized_app(**conf: Any) -> Celery:
    app = Celery("options-test", broker="memory://", backend="cache+memory://")
    app.conf.update(conf)
    app.finalize()
    return app


_names = itertools.count()


def register(app: Celery, **options: Any) -> Any:
    @app.task(base=LockedTask, shared=False, name=f"tests.job{next(_names)}", **options)
    def job(order_id: int, note: str = "") -> None: ...

    return job


BAD_OPTIONS = [
    ({"lock_timeout": "30"}, TypeError, "lock_timeout of task .* must be a number of seconds .*str: '30'"),
    ({"lock_timeout": -1}, ValueError, "lock_timeout of task .* must be > 0 seconds, got -1"),
    ({"lock_timeout": 0}, ValueError, "lock_timeout .* got 0"),
    ({"lock_timeout": math.nan}, ValueError, "lock_timeout .* finite .* nan"),
    ({"lock_timeout": 0.001}, ValueError, "lock_timeout .* at least 0.01 seconds"),
    ({"lock_timeout": True}, TypeError, "lock_timeout .* bool: True"),
    ({"on_contention": "sometimes"}, ValueError, "on_contention of task .* one of 'skip', 'retry', 'wait'"),
    ({"on_contention": 3}, TypeError, "on_contention .* got int: 3"),
    ({"on_contention": Wait}, TypeError, "on_contention .* got type"),
    ({"lock_retry_backoff": 0}, ValueError, "lock_retry_backoff .* > 0 seconds, got 0"),
    ({"lock_retry_backoff": "fast"}, TypeError, "lock_retry_backoff .* True, False or .* str: 'fast'"),
    ({"lock_retry_backoff_max": -1}, ValueError, "lock_retry_backoff_max .* > 0 seconds, got -1"),
    ({"lock_retry_jitter": "full"}, TypeError, "lock_retry_jitter .* True or False, got str: 'full'"),
    ({"lock_redelivery_wait": -1}, ValueError, "lock_redelivery_wait .* >= 0 seconds, got -1"),
    ({"lock_max_retries": -1}, ValueError, "lock_max_retries .* >= 0, got -1"),
    ({"lock_max_retries": 2.5}, TypeError, "lock_max_retries .* int, got float: 2.5"),
    ({"lock_wait": -2}, ValueError, "lock_wait .* >= 0 seconds, got -2"),
    ({"lock_wait_fallback": "wait"}, ValueError, "lock_wait_fallback .* 'retry', 'fail', 'skip', got 'wait'"),
    ({"lock_wait_fallback": Wait()}, TypeError, "lock_wait_fallback .* Wait"),
    ({"lock_on_redis_error": "ignore"}, ValueError, "lock_on_redis_error .* or 'run', got 'ignore'"),
    ({"lock_on_redis_error": 1}, TypeError, "lock_on_redis_error .* int: 1"),
    ({"dedup_on_publish": "yes"}, TypeError, "dedup_on_publish .* True or False, got str: 'yes'"),
    ({"dedup_timeout": 0}, ValueError, "dedup_timeout .* > 0 seconds, got 0"),
    ({"lock_skip_covered": "no"}, TypeError, "lock_skip_covered of task .* True or False, got str: 'no'"),
    ({"lock_skip_covered": 0}, TypeError, "lock_skip_covered .* True or False, got int: 0"),
    ({"lock_key": 42}, TypeError, "lock_key of .* got int: 42"),
    ({"lock_key": ["orderid"]}, ValueError, "names 'orderid', which is not an argument"),
    ({"lock_key": "order:{orderid}"}, ValueError, "refers to 'orderid'"),
]


@pytest.mark.parametrize("options, error, message", BAD_OPTIONS, ids=[str(o) for o, _, _ in BAD_OPTIONS])
def test_bad_option_is_rejected_at_registration(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    app = finalized_app()
    with pytest.raises(error, match=message) as raised:
        register(app, **options)
    assert "job" in str(raised.value)  # names the task


def test_bad_option_fails_when_a_lazy_app_is_finalized() -> None:
    app = Celery("options-lazy", broker="memory://")
    register(app, lock_timeout=-5)  # not finalized yet: evaluated at finalize
    with pytest.raises(ValueError, match="lock_timeout of task .* got -5"):
        app.finalize()


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("dlock_timeout", "x", "dlock_timeout of task .* str: 'x'"),
        ("dlock_on_contention", "maybe", "dlock_on_contention of task .* got 'maybe'"),
        ("dlock_max_retries", -3, "dlock_max_retries of task .* got -3"),
        ("dlock_on_redis_error", "open", "dlock_on_redis_error of task .* got 'open'"),
        ("dlock_skip_covered", "off", "dlock_skip_covered of task .* got str: 'off'"),
    ],
)
def test_bad_app_setting_is_rejected_naming_the_setting(setting: str, value: Any, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        register(finalized_app(**{setting: value}))


def test_app_settings_fill_options_once_per_task_class() -> None:
    app = finalized_app(dlock_timeout=7, dlock_on_contention="retry", dlock_retry_backoff=0.5,
                        dlock_max_retries=3, dlock_prefix="myapp:")
    job = register(app, lock_retry_backoff_max=2)
    config = job._dlock_config
    assert config.timeout == 7 and config.prefix == "myapp:"
    assert config.policy == Retry(backoff=0.5, backoff_max=2, max_retries=3, jitter=True, delay=180)
    assert job.lock_timeout == 7  # the from_config convention: the class attribute now holds the value
    own = register(app, lock_timeout=3, on_contention="fail")
    assert own._dlock_config.timeout == 3 and own._dlock_config.policy == Fail()


def test_policy_objects_validate_and_inherit_task_options() -> None:
    with pytest.raises(ValueError, match=r"Retry\(backoff=...\) must be > 0 seconds, got -1"):
        Retry(backoff=-1)
    with pytest.raises(TypeError, match=r"Retry\(max_retries=...\) must be an int"):
        Retry(max_retries="3")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Retry\(jitter=...\) must be True or False"):
        Retry(jitter="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Wait\(then=...\) must be one of"):
        Wait(then="later")
    app = finalized_app(dlock_wait=4, dlock_retry_backoff=2, dlock_retry_jitter=False)
    job = register(app, on_contention=Wait(then=Retry(max_retries=9)), default_retry_delay=30)
    assert job._dlock_config.policy == Wait(
        timeout=4, then=Retry(backoff=2, backoff_max=60, max_retries=9, jitter=False, delay=30)
    )
    assert register(app, on_contention=Skip())._dlock_config.policy == Skip()


def test_retry_backoff_follows_celerys_autoretry_schedule_with_full_jitter() -> None:
    from celery_dlock.celery.policies import PolicyDefaults

    defaults = PolicyDefaults(True, 8.0, True, 10, 1.0, Fail(), retry_delay=30.0)
    policy = resolve_policy(Retry(jitter=False), defaults)
    assert isinstance(policy, Retry)
    assert [policy.countdown_for(n) for n in range(6)] == [1, 2, 4, 8, 8, 8]  # backoff=True: factor 1 s
    halves = resolve_policy(Retry(backoff=0.5, jitter=False), defaults)
    assert isinstance(halves, Retry) and [halves.countdown_for(n) for n in range(3)] == [0.5, 1, 2]
    jittered = resolve_policy("retry", defaults)
    assert isinstance(jittered, Retry)
    samples = [jittered.countdown_for(3) for _ in range(400)]
    # Celery's full jitter: anywhere between 0 and the backoff, not only its upper half.
    assert all(0 <= s <= 8 for s in samples) and min(samples) < 2 and max(samples) > 6
    constant = resolve_policy(Retry(backoff=False), defaults)
    assert isinstance(constant, Retry)
    assert {constant.countdown_for(n) for n in range(5)} == {30.0}  # the task's default_retry_delay


@pytest.mark.parametrize(
    "options, conf",
    [({"lock_retry_countdown": 0.5}, {}), ({}, {"dlock_retry_countdown": 0.5})],
    ids=["option", "setting"],
)
def test_the_old_retry_option_names_are_an_error_naming_the_new_ones(
    options: dict[str, Any], conf: dict[str, Any]
) -> None:
    # (An app setting is read when the app binds its locked tasks: at finalize at the latest.)
    with pytest.raises(TypeError, match="retry_countdown.* is now called '.*retry_backoff'"):
        register(finalized_app(**conf), on_contention="retry", **options)

    def install_on_fresh_app() -> None:
        other = Celery("options-install", broker="memory://", backend="cache+memory://")
        other.conf.update(conf)

        @other.task(shared=False, name="tests.plain")
        def plain(order_id: int) -> None: ...

        other.finalize()
        celery_dlock.install(other, tasks={"tests.plain": dict(options)})

    with pytest.raises(TypeError, match="retry_countdown.* is now called '.*retry_backoff'"):
        install_on_fresh_app()


def test_install_rejects_unknown_options_and_locked_tasks() -> None:
    app = finalized_app()
    with pytest.raises(TypeError, match="unknown lock option 'lock_timeuot'"):
        celery_dlock.install(app, tasks={"x": {"lock_timeuot": 3}})
    with pytest.raises(TypeError, match="must be a dict of lock options"):
        celery_dlock.install(app, tasks={"x": 3})  # type: ignore[dict-item]
    locked = register(app)
    with pytest.raises(TypeError, match="already uses base=LockedTask"):
        celery_dlock.install(app, tasks={locked.name: {}})


def test_install_checks_option_values_when_the_task_registers() -> None:
    app = Celery("install-values", broker="memory://")
    celery_dlock.install(app, tasks={"tests.celery.test_options.foreign_job": {"on_contention": "never"}})

    class Foreign(Task):  # type: ignore[misc]
        pass

    @app.task(base=Foreign, name="tests.celery.test_options.foreign_job", shared=False)
    def foreign_job(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="on_contention of task 'tests.celery.test_options.foreign_job'"):
        app.finalize()


def test_celery_before_5_5_is_refused_because_a_task_call_would_lose_its_request() -> None:
    from celery import Task

    from celery_dlock.celery.compat import task_call_keeps_the_request

    class BeforeFiveFive(Task):  # type: ignore[misc]
        def push_request(self, *args: Any, **kwargs: Any) -> None:
            from celery.app.task import Context

            self.request_stack.push(Context(*args, **kwargs))  # Celery 5.3/5.4: an empty request

    assert task_call_keeps_the_request()  # the installed Celery
    assert not task_call_keeps_the_request(BeforeFiveFive)
