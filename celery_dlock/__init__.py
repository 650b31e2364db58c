"""celery-dlock: correct, fast, observable distributed locks on Redis, for Celery and beyond.

The core lock (this package's top level) never imports Celery; the Celery
integration lives in :mod:`celery_dlock.celery`.
"""

from celery_dlock.convenience import distributed_lock, distributed_lock_decorator, get_redis
from celery_dlock.errors import LockBackendUnavailable, LockError, LockLost, LockNotAcquired
from celery_dlock.fencing import fenced_get, fenced_set
from celery_dlock.keys import DEFAULT_PREFIX, LockKeys
from celery_dlock.lock import DistributedLock

__all__ = [
    "DEFAULT_PREFIX",
    "DistributedLock",
    "LockBackendUnavailable",
    "LockError",
    "LockKeys",
    "LockLost",
    "LockNotAcquired",
    "distributed_lock",
    "distributed_lock_decorator",
    "fenced_get",
    "fenced_set",
    "get_redis",
]

__version__ = "0.1.0"

# The Celery layer is imported on first use only, so the core works without Celery.
_CELERY_NAMES = {"install", "LockedTask"}


def __getattr__(name: str) -> object:
    if name in _CELERY_NAMES:
        from celery_dlock import celery as celery_layer

        return getattr(celery_layer, name)
    raise AttributeError(f"module 'celery_dlock' has no attribute {name!r}")
