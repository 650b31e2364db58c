"""Ending a blocking call on the lock's own deadline, whatever the client's timeouts.

A redis-py call can block far longer than a lock operation may take: with redis-py's
defaults there is no socket timeout, and a retry policy sleeps between tries. Where
the call can be bounded on the caller's thread (the script channel reading a reply on
a connected connection), it is; where it may block first (connecting, a client we do
not drive ourselves), :func:`call_before` runs it on a helper thread and stops waiting
at the deadline. The call then finishes on its own, under the client's own settings,
and ``on_late`` sees its result (a late acquisition is released there).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger("celery_dlock")

T = TypeVar("T")


class DeadlineExceeded(RedisTimeoutError):
    """A lock operation got no answer before its deadline (a redis-py TimeoutError, so
    callers treat it as an unreachable server)."""


def call_before(deadline: float, call: Callable[[], T], on_late: Callable[[Any], object] | None = None) -> T:
    """``call()``'s result if it ends before ``deadline`` (monotonic), else DeadlineExceeded."""
    outcome: list[Any] = []  # [result] or [None, error]
    guard = threading.Lock()
    done = threading.Event()
    abandoned = False

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as error:
            outcome.extend((None, error))
        with guard:
            done.set()
            late = abandoned
        if late and on_late is not None and len(outcome) == 1:
            try:
                on_late(outcome[0])
            except Exception:
                logger.exception("clean-up after a late reply failed")

    threading.Thread(target=run, name="celery-dlock-bounded-call", daemon=True).start()
    done.wait(max(0.0, deadline - time.monotonic()))
    with guard:
        if not done.is_set():
            abandoned = True
            raise DeadlineExceeded("no answer from Redis before the lock operation's deadline")
    if len(outcome) == 2:
        raise outcome[1]
    result: T = outcome[0]
    return result
