"""The asyncio API of celery-dlock: the same names and parameters as :mod:`celery_dlock`, awaitable.

>>> from celery_dlock.asyncio import DistributedLock, distributed_lock
>>> async with distributed_lock("reports:daily", timeout=60, auto_renewal=True) as lock:
...     await build_report(fence=lock.fence)
"""

from celery_dlock.errors import LockBackendUnavailable, LockError, LockLost, LockNotAcquired

from .convenience import distributed_lock, distributed_lock_decorator, get_redis
from .lock import DistributedLock

__all__ = [
    "DistributedLock",
    "LockBackendUnavailable",
    "LockError",
    "LockLost",
    "LockNotAcquired",
    "distributed_lock",
    "distributed_lock_decorator",
    "get_redis",
]
