"""Exceptions raised by celery-dlock.

Every error derives from :class:`LockError`, so ``except LockError`` catches
anything this library raises on purpose. :class:`LockNotAcquired` also derives
from :class:`RuntimeError` so code written against the original ``SET NX``
snippet (``except RuntimeError``) keeps working.
"""

from __future__ import annotations

from redis.exceptions import TimeoutError as RedisTimeoutError


class LockError(Exception):
    """Base class of every error raised by celery-dlock."""


class LockNotAcquired(LockError, RuntimeError):
    """The lock is held by someone else and waiting for it did not succeed."""


class LockLost(LockError):
    """The lock is no longer ours: it expired, was deleted, or could not be renewed in time."""


class LockBackendUnavailable(LockError):
    """Redis could not be reached (or answered with an error) while talking about a lock.

    The message names the server, so an operator knows where to look.
    """


class DeadlineExceeded(RedisTimeoutError):
    """A lock operation got no answer before its deadline (a redis-py TimeoutError, so
    callers treat it as an unreachable server; the lock's methods raise
    :class:`LockBackendUnavailable` for it)."""
