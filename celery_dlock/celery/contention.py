"""What a run does about its lock: the contention policies as one table, no I/O.

The runner (:mod:`celery_dlock.celery.runner`) makes an attempt, describes what it
found as a :class:`Situation`, asks :func:`decide` for the :class:`Decision`, and
carries it out; an outcome that waits (``WAIT``, ``WAIT_OWN``, ``RETRY_HERE``) ends in
another attempt and another decision. Every policy x situation is decided here and
only here, so a new policy touches this table and the runner's code for any new
outcome, nothing else.

The table, for a run whose attempt did not get the lock (``in_process``: a direct or
eager call, or a call nested in a running body; ``own``: the holder is an earlier
delivery of this very task id):

================================  ============================================================
situation                         outcome
================================  ============================================================
lock taken                        RUN
Redis down, on_redis_error=run    RUN_UNLOCKED
Redis down                        the policy, without waiting: Wait -> its ``then``; Retry ->
                                  RETRY (in a worker; FAIL when the lock retries are used up,
                                  or in-process); Skip -> SKIP; Fail -> FAIL
own, in a worker, not yet waited  WAIT_OWN (up to ``lock_redelivery_wait``)
own, in a worker, waited          REQUEUE_OWN
Wait, not yet waited              WAIT (up to ``Wait.timeout``)
Wait, waited                      its ``then``, as below
Retry, in a worker                RETRY; FAIL once ``max_retries`` lock retries were made
Retry, in-process                 RETRY_HERE (the n-th waits ``countdown_for(n)``); FAIL after
                                  ``max_retries`` of them
Skip                              SKIP
Fail                              FAIL
================================  ============================================================
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from celery_dlock.celery.policies import Fail, Policy, Retry, Skip, Wait


class Outcome(enum.Enum):
    """What the runner does next; the value is the action ``lock_contended`` reports."""

    RUN = "run"  # the lock is ours: run the body
    RUN_UNLOCKED = "run-unlocked"  # Redis is unreachable and lock_on_redis_error="run"
    WAIT = "wait"  # wait for a release, up to Decision.wait seconds, then decide again
    WAIT_OWN = "wait-own"  # the same, for an earlier delivery of this task id
    REQUEUE_OWN = "requeue-own"  # publish this message again behind it, and end storing nothing
    RETRY = "retry"  # publish this message again after Decision.wait seconds (a lock retry)
    RETRY_HERE = "retry-here"  # in-process: wait Decision.wait seconds in the caller, then decide again
    SKIP = "skip"
    FAIL = "fail"


@dataclass(frozen=True)
class Situation:
    """What a run knows about its lock after an attempt (plain values, no I/O)."""

    #: The attempt took the lock.
    acquired: bool = False
    #: Redis could not be reached (the attempt, or reading the holder, failed).
    redis_down: bool = False
    #: A direct or eager call, or a call nested in a running body: no message to re-publish.
    in_process: bool = False
    #: The holder is an earlier delivery of this same task id.
    held_by_own_delivery: bool = False
    #: This run already waited for the Wait policy (or for its own earlier delivery).
    waited: bool = False
    waited_for_own: bool = False
    #: Lock retries already made: by earlier deliveries (a message header) or in-process.
    lock_retries: int = 0

    def after(
        self,
        decision: Decision,
        *,
        acquired: bool = False,
        redis_down: bool = False,
        held_by_own_delivery: bool = False,
    ) -> Situation:
        """The situation after carrying out a waiting ``decision``: what its attempt found."""
        return replace(
            self,
            acquired=acquired,
            redis_down=redis_down,
            held_by_own_delivery=held_by_own_delivery,
            waited=self.waited or decision.outcome is Outcome.WAIT,
            waited_for_own=self.waited_for_own or decision.outcome is Outcome.WAIT_OWN,
            lock_retries=self.lock_retries + (decision.outcome is Outcome.RETRY_HERE),
        )


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    #: Seconds to wait (WAIT, WAIT_OWN, RETRY_HERE) or the countdown of a RETRY.
    wait: float = 0.0
    #: The policy that chose it (a Wait's ``then`` once the wait is over).
    policy: Policy | None = None
    #: Why the run gives up, for FAIL after lock retries: how many were made.
    gave_up_after: int | None = None


def decide(policy: Policy, situation: Situation, on_redis_error: str, redelivery_wait: float) -> Decision:
    """The table in the module docstring."""
    s = situation
    if s.acquired:
        return Decision(Outcome.RUN)
    if s.redis_down:
        if on_redis_error == "run":
            return Decision(Outcome.RUN_UNLOCKED)
        return _apply(_after_wait(policy), s, redis_down=True)
    if s.held_by_own_delivery and not s.in_process:
        if not s.waited_for_own:
            return Decision(Outcome.WAIT_OWN, wait=redelivery_wait)
        return Decision(Outcome.REQUEUE_OWN)
    if isinstance(policy, Wait) and not s.waited:
        assert policy.timeout is not None
        return Decision(Outcome.WAIT, wait=policy.timeout, policy=policy)
    return _apply(_after_wait(policy), s, redis_down=False)


def _after_wait(policy: Policy) -> Skip | Fail | Retry:
    if isinstance(policy, Wait):
        assert policy.then is not None and not isinstance(policy.then, str)
        return policy.then
    return policy


def _apply(policy: Skip | Fail | Retry, s: Situation, redis_down: bool) -> Decision:
    if isinstance(policy, Skip):
        return Decision(Outcome.SKIP, policy=policy)
    if isinstance(policy, Retry):
        assert policy.max_retries is not None
        if s.lock_retries >= policy.max_retries:
            return Decision(Outcome.FAIL, policy=policy, gave_up_after=s.lock_retries)
        if not s.in_process:
            return Decision(Outcome.RETRY, wait=policy.countdown_for(s.lock_retries), policy=policy)
        if not redis_down:
            return Decision(Outcome.RETRY_HERE, wait=policy.countdown_for(s.lock_retries), policy=policy)
    return Decision(Outcome.FAIL, policy=policy)
