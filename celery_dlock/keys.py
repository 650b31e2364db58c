"""Redis key names of one lock.

All keys of a lock share one Redis Cluster hash tag (the part between braces),
so the scripts that touch several of them never cross slots. The lock name is
the hash tag itself, which is why names may not contain braces.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "dlock:"
MAX_NAME_LENGTH = 1024


def check_name(name: object, parameter: str = "lock_name") -> str:
    """Return ``name`` if it can name a lock, else raise a clear error."""
    if not isinstance(name, str):
        raise TypeError(f"{parameter} must be a str, got {type(name).__name__}: {name!r}")
    if not name:
        raise ValueError(f"{parameter} must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(
            f"{parameter} must be at most {MAX_NAME_LENGTH} characters, got {len(name)} "
            f"characters: {name[:40]!r}..."
        )
    if "{" in name or "}" in name:
        raise ValueError(
            f"{parameter} must not contain '{{' or '}}' (they would break the Redis Cluster "
            f"hash tag that keeps a lock's keys in one slot), got {name!r}"
        )
    return name


def check_prefix(prefix: object) -> str:
    """Return ``prefix`` if it can namespace lock keys, else raise a clear error."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}: {prefix!r}")
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"prefix must not contain '{{' or '}}', got {prefix!r}")
    if len(prefix) > MAX_NAME_LENGTH:
        raise ValueError(f"prefix must be at most {MAX_NAME_LENGTH} characters, got {prefix!r}")
    return prefix


@dataclass(frozen=True)
class LockKeys:
    """The Redis names that belong to one lock.

    ``lock``: the lease itself (value = owner token, server-side PX expiry). A
    release that finds waiters writes the longest waiter's token with a short lease
    instead of deleting the key: the lock is handed to that waiter, so the releaser
    cannot barge back in (see :data:`celery_dlock.scripts.HANDOFF_WINDOW_MS`).
    ``fence``: a counter incremented on every acquisition; it has no expiry, so
    fencing tokens never go backwards while the Redis dataset survives.
    ``waiters``: sorted set of blocked acquirers, by arrival (FIFO handoff); each
    member names the waiter's token and its process's inbox channel, where a
    release publishes the token of the waiter it chose (:mod:`celery_dlock.inbox`).
    ``note``: what the last holder left with its release (locks with ``note_ttl``).
    ``released``: the token of the last release, kept a short while, so a release whose
    reply was lost and that is sent again answers "released", not "lost".
    """

    lock: str
    fence: str
    waiters: str
    note: str
    released: str
    # The KEYS of the acquire and release scripts, built once.
    acquire_keys: tuple[str, str, str]
    release_keys: tuple[str, str, str, str]

    @classmethod
    def for_name(cls, name: str, prefix: str = DEFAULT_PREFIX) -> LockKeys:
        lock = f"{prefix}{{{name}}}"
        fence, waiters, released = f"{lock}:fence", f"{lock}:waiters", f"{lock}:released"
        # What cls(lock=lock, ...) makes, without a frozen dataclass's object.__setattr__
        # per field: keys are built per lock, so per Celery task run.
        keys = object.__new__(cls)
        keys.__dict__.update(
            lock=lock,
            fence=fence,
            waiters=waiters,
            note=f"{lock}:note",
            released=released,
            acquire_keys=(lock, fence, waiters),
            release_keys=(lock, waiters, fence, released),
        )
        return keys

    def extension(self, name: str) -> str:
        """A key for layers built on the lock (same hash tag), in a namespace the core never uses."""
        return f"{self.lock}:ext:{name}"
