"""The contention table (celery_dlock.celery.contention.decide): every policy x situation.

Pure: no Redis, no worker. What the runner does with each outcome is tested end to end
in the other modules of this folder (skip, retry, wait, fail, redelivery, Redis down).
"""

from __future__ import annotations

import itertools

import pytest

from celery_dlock.celery.contention import Decision, Outcome, Situation, decide
from celery_dlock.celery.policies import Fail, Policy, Retry, Skip, Wait

RETRY = Retry(backoff=2.0, backoff_max=60.0, max_retries=3, jitter=False, delay=180.0)
SKIP, FAIL = Skip(), Fail()
POLICIES: dict[str, Policy] = {
    "skip": SKIP,
    "fail": FAIL,
    "retry": RETRY,
    "wait-then-retry": Wait(timeout=5.0, then=RETRY),
    "wait-then-skip": Wait(timeout=5.0, then=SKIP),
    "wait-then-fail": Wait(timeout=5.0, then=FAIL),
}
REDELIVERY_WAIT = 7.0

# (situation, {policy: expected outcome}); one row per situation a run can be in after an
# attempt that did not get the lock (in a worker unless said otherwise).
HELD = Situation()
HELD_IN_PROCESS = Situation(in_process=True)
WAITED = Situation(waited=True)
WAITED_IN_PROCESS = Situation(waited=True, in_process=True)
RETRIES_USED_UP = Situation(waited=True, lock_retries=3)
IN_PROCESS_RETRIES_USED_UP = Situation(waited=True, in_process=True, lock_retries=3)
REDIS_DOWN = Situation(redis_down=True)
REDIS_DOWN_IN_PROCESS = Situation(redis_down=True, in_process=True)
REDIS_DOWN_RETRIES_USED_UP = Situation(redis_down=True, lock_retries=3)

#: The columns of TABLE, and the letters of its outcomes.
COLUMNS = ("skip", "fail", "retry", "wait-then-retry", "wait-then-skip", "wait-then-fail")
LETTERS = {
    "W": Outcome.WAIT,
    "R": Outcome.RETRY,
    "H": Outcome.RETRY_HERE,
    "S": Outcome.SKIP,
    "F": Outcome.FAIL,
}
TABLE: list[tuple[str, Situation, str]] = [
    # one letter per policy, in the order of COLUMNS
    ("held",                                    HELD,                       "S F R W W W"),
    ("held, in-process",                        HELD_IN_PROCESS,            "S F H W W W"),
    ("held after the wait",                     WAITED,                     "S F R R S F"),
    ("held after the wait, in-process",         WAITED_IN_PROCESS,          "S F H H S F"),
    ("lock retries used up",                    RETRIES_USED_UP,            "S F F F S F"),
    ("in-process retries used up",              IN_PROCESS_RETRIES_USED_UP, "S F F F S F"),
    ("Redis down",                              REDIS_DOWN,                 "S F R R S F"),
    ("Redis down, in-process",                  REDIS_DOWN_IN_PROCESS,      "S F F F S F"),
    ("Redis down, lock retries used up",        REDIS_DOWN_RETRIES_USED_UP, "S F F F S F"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("situation", "policy", "expected"),
    [
        pytest.param(situation, POLICIES[name], LETTERS[letter], id=f"{label}-{name}")
        for label, situation, row in TABLE
        for name, letter in zip(COLUMNS, row.split(), strict=True)
    ],
)
def test_every_policy_in_every_situation(situation: Situation, policy: Policy, expected: Outcome) -> None:
    decision = decide(policy, situation, "contention", REDELIVERY_WAIT)
    assert decision.outcome is expected


def test_the_table_covers_every_policy_in_every_row() -> None:
    assert set(COLUMNS) == set(POLICIES)
    assert all(len(row.split()) == len(COLUMNS) for _, _, row in TABLE)


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
def test_a_taken_lock_runs_whatever_the_rest(policy: Policy) -> None:
    for in_process, own, waited, down in itertools.product([False, True], repeat=4):
        situation = Situation(
            acquired=True, in_process=in_process, held_by_own_delivery=own, waited=waited, redis_down=down
        )
        assert decide(policy, situation, "contention", REDELIVERY_WAIT).outcome is Outcome.RUN


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
def test_redis_down_with_on_redis_error_run_runs_unlocked(policy: Policy) -> None:
    for situation in (REDIS_DOWN, REDIS_DOWN_IN_PROCESS, REDIS_DOWN_RETRIES_USED_UP):
        assert decide(policy, situation, "run", REDELIVERY_WAIT).outcome is Outcome.RUN_UNLOCKED


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
def test_an_earlier_delivery_of_the_same_task_id_is_waited_for_then_requeued_behind(policy: Policy) -> None:
    """Whatever the policy: skipping or failing would store a result over the running delivery's."""
    first = decide(policy, Situation(held_by_own_delivery=True), "contention", REDELIVERY_WAIT)
    assert first == Decision(Outcome.WAIT_OWN, wait=REDELIVERY_WAIT)
    still = Situation(held_by_own_delivery=True).after(first, held_by_own_delivery=True)
    assert decide(policy, still, "contention", REDELIVERY_WAIT).outcome is Outcome.REQUEUE_OWN
    # Another holder by then: the policy decides, as for any other holder.
    other = Situation(held_by_own_delivery=True).after(first)
    assert decide(policy, other, "contention", REDELIVERY_WAIT) == decide(
        policy, HELD, "contention", REDELIVERY_WAIT
    )


def test_in_process_the_own_task_id_is_no_earlier_delivery() -> None:
    """A direct call inside a running body shares its request's id: the policy decides."""
    situation = Situation(held_by_own_delivery=True, in_process=True)
    assert decide(SKIP, situation, "contention", REDELIVERY_WAIT).outcome is Outcome.SKIP


def test_waits_and_countdowns_follow_the_policy() -> None:
    wait = decide(POLICIES["wait-then-retry"], HELD, "contention", REDELIVERY_WAIT)
    assert (wait.outcome, wait.wait) == (Outcome.WAIT, 5.0)
    after_wait = HELD.after(wait)
    assert after_wait.waited and not after_wait.acquired
    # The n-th lock retry's countdown is the backoff schedule's n-th: 2, 4, 8 s.
    for done, countdown in enumerate([2.0, 4.0, 8.0]):
        decision = decide(RETRY, Situation(lock_retries=done), "contention", REDELIVERY_WAIT)
        assert (decision.outcome, decision.wait) == (Outcome.RETRY, countdown)
    # In-process: each RETRY_HERE waits the same schedule, and counts itself.
    situation = HELD_IN_PROCESS
    waits = []
    while (decision := decide(RETRY, situation, "contention", REDELIVERY_WAIT)).outcome is Outcome.RETRY_HERE:
        waits.append(decision.wait)
        situation = situation.after(decision)
    assert waits == [2.0, 4.0, 8.0]
    assert decision.outcome is Outcome.FAIL and decision.gave_up_after == 3


def test_a_zero_wait_still_decides_through_the_wait_step() -> None:
    """Wait(timeout=0): the run reports the wait, makes no attempt, and goes on to ``then``."""
    policy = Wait(timeout=0.0, then=SKIP)
    first = decide(policy, HELD, "contention", REDELIVERY_WAIT)
    assert (first.outcome, first.wait) == (Outcome.WAIT, 0.0)
    assert decide(policy, HELD.after(first), "contention", REDELIVERY_WAIT).outcome is Outcome.SKIP
