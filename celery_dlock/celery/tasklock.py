"""The lock of one task run: a core lock whose owner token also says which run holds it.

The token stored in Redis is ``<128 random bits in hex>|["<task id>","<worker>",<pid>]``.
The random part is what makes release and renewal safe (the core scripts compare
the whole token). The readable part lets others learn who holds the lock with
one ``GET``, with no extra key to keep in step with the lease:

* a skipped duplicate reports the holder's task id;
* ``dedup_on_publish`` returns the running call's ``AsyncResult``;
* the worker's main process can release the lock of a pool process that died
  (SIGKILL, hard time limit, ``revoke(terminate=True)``): it knows the task id,
  its node name and the child's pid, so it deletes the lock only if the token
  ends with exactly those (:func:`celery_dlock.lock.release_by_token_suffix`), never
  someone else's lock.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any

from celery_dlock.keys import LockKeys
from celery_dlock.lock import DistributedLock, release_by_token_suffix

SEPARATOR = "|"


@dataclass(frozen=True)
class Owner:
    """Which run holds a lock: task id, worker node name and process id."""

    task_id: str
    hostname: str
    pid: int

    def suffix(self) -> str:
        # json.dumps([task_id, hostname, pid], separators=(",", ":")), without building
        # an encoder on every call (once per task run)
        if type(self.task_id) is not str or type(self.hostname) is not str or type(self.pid) is not int:
            return SEPARATOR + json.dumps([self.task_id, self.hostname, self.pid], separators=(",", ":"))
        task_id, hostname = encode_basestring_ascii(self.task_id), encode_basestring_ascii(self.hostname)
        return f"{SEPARATOR}[{task_id},{hostname},{self.pid}]"

    @classmethod
    def current(cls, task_id: str | None, hostname: str | None) -> Owner:
        return cls(task_id or "", hostname or socket.gethostname(), os.getpid())

    @classmethod
    def parse(cls, value: Any) -> Owner | None:
        """The owner encoded in a lock value, or None for locks not taken by a task run."""
        if value is None:
            return None
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        _, sep, rest = text.partition(SEPARATOR)
        if not sep:
            return None
        try:
            task_id, hostname, pid = json.loads(rest)
            return cls(str(task_id), str(hostname), int(pid))
        except (ValueError, TypeError):
            return None


class TaskLock(DistributedLock):
    """A :class:`DistributedLock` held on behalf of one task run (see the module docstring).

    ``key`` is the lock name (what ``lock_key`` produced); ``fence`` and
    ``ensure_held()`` come from the core lock.
    """

    def __init__(self, redis: Any, name: str, *, owner: Owner, **options: Any) -> None:
        super().__init__(redis, name, **options)
        self.owner = owner

    def make_token(self) -> str:
        # The core's random token plus who we are, so anyone can see the holder.
        return super().make_token() + self.owner.suffix()

    @property
    def key(self) -> str:
        return self.name

    def holder(self) -> Owner | None:
        """Who holds this lock name right now (one GET); None if free or not held by a task run."""
        return Owner.parse(self.read_holder())


def release_owned_by(client: Any, keys: LockKeys, owner: Owner) -> bool:
    """Release the lock named by ``keys`` if ``owner`` holds it (for a run whose process died)."""
    return release_by_token_suffix(client, keys, owner.suffix())
