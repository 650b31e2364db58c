"""A simulated Redis that runs the lock's scripts in Python, on a simulated clock.

Each script call is one atomic step, as on a real server. The scripts' semantics are
written here from their contract in ``celery_dlock/scripts.py`` (the comment above each
script), not translated line by line from the Lua, and
``tests/sim/test_differential.py`` checks that both give the same replies, keys and
messages for the same calls on a real redis-server.

Replies are what redis-py gives for RESP2 without ``decode_responses``: Lua integers as
int, strings as bytes, tables as lists, false/nil as None.

Time is ``now_ms`` (simulated milliseconds); a key whose expiry is reached is gone.
Messages a script publishes are appended to ``published`` as (channel, payload); the
simulation decides when (and whether) they are delivered.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from celery_dlock import scripts

Reply = Any


class SimServer:
    def __init__(self, now_ms: int = 1_000_000) -> None:
        self.now_ms = now_ms
        self.strings: dict[bytes, bytes] = {}
        self.zsets: dict[bytes, dict[bytes, int]] = {}
        self.hashes: dict[bytes, dict[bytes, bytes]] = {}
        self.expires: dict[bytes, int] = {}  # key -> absolute ms
        self.published: list[tuple[bytes, bytes]] = []
        self._tick = 0  # makes TIME strictly increase within one simulated millisecond

    # -- the keyspace ---------------------------------------------------------------

    def advance(self, ms: int) -> None:
        self.now_ms += ms

    def _alive(self, key: bytes) -> bool:
        expires = self.expires.get(key)
        if expires is not None and self.now_ms >= expires:
            self._delete(key)
        return key in self.strings or key in self.zsets or key in self.hashes

    def _delete(self, key: bytes) -> bool:
        existed = False
        for space in (self.strings, self.zsets, self.hashes):
            existed = space.pop(key, None) is not None or existed
        self.expires.pop(key, None)
        return existed

    def keys(self) -> list[bytes]:
        return sorted(k for k in {*self.strings, *self.zsets, *self.hashes} if self._alive(k))

    def get(self, key: bytes) -> bytes | None:
        return self.strings.get(key) if self._alive(key) else None

    def set(self, key: bytes, value: bytes, px: int | None = None, nx: bool = False) -> bool:
        if nx and self._alive(key):
            return False
        self._delete(key)
        self.strings[key] = value
        if px is not None:
            self.expires[key] = self.now_ms + px
        return True

    def incr(self, key: bytes) -> int:
        value = int(self.get(key) or b"0") + 1
        self.strings[key] = str(value).encode()  # INCR keeps the key's expiry (the fence has none)
        return value

    def pexpire(self, key: bytes, ms: int) -> None:
        if self._alive(key):
            self.expires[key] = self.now_ms + ms

    def pttl(self, key: bytes) -> int:
        if not self._alive(key):
            return -2
        expires = self.expires.get(key)
        return -1 if expires is None else expires - self.now_ms

    def time_us(self) -> int:
        self._tick += 1
        return self.now_ms * 1000 + self._tick % 1000

    def zset(self, key: bytes) -> dict[bytes, int]:
        return self.zsets.get(key, {}) if self._alive(key) else {}

    def zrem(self, key: bytes, member: bytes) -> int:
        members = self.zset(key)
        if member not in members:
            return 0
        del members[member]
        if not members:
            self._delete(key)
        return 1

    def ordered(self, key: bytes) -> list[tuple[bytes, int]]:
        """ZRANGE WITHSCORES: by score, then member."""
        return sorted(self.zset(key).items(), key=lambda item: (item[1], item[0]))

    def publish(self, channel: bytes, payload: bytes) -> None:
        self.published.append((channel, payload))

    # -- script calls, as EVALSHA would make them -------------------------------------

    def evalsha(self, sha: str | bytes, keys: Sequence[Any], args: Sequence[Any]) -> Reply:
        sha = sha.decode() if isinstance(sha, bytes) else sha
        run = {script.sha: getattr(self, f"script_{script.name}") for script in scripts.ALL_SCRIPTS}[sha]
        return run([_bytes(k) for k in keys], [_bytes(a) for a in args])

    def script_acquire(self, keys: list[bytes], args: list[bytes]) -> Reply:
        """Take a free lock (a new fence); a lock already holding the token is this attempt's own
        (full lease, the current fence); else say when to try again, queueing a 'join'/'wait'."""
        lock, fence, waiters = keys[:3]
        note = keys[3] if len(keys) > 3 else None
        token, lease, mode = args[0], int(args[1]), args[2]
        member = args[3] if len(args) > 3 else None

        def granted(number: int) -> Reply:
            return number if note is None else [number, self.get(note)]

        if self.set(lock, token, px=lease, nx=True):
            if member is not None:
                self.zrem(waiters, member)
            return granted(self.incr(fence))
        if self.get(lock) == token:
            self.pexpire(lock, lease)
            if member is not None:
                self.zrem(waiters, member)
            current = self.get(fence)
            return granted(int(current) if current is not None else self.incr(fence))
        if mode == b"try":
            return [self.pttl(lock)]
        assert member is not None
        self._alive(waiters)
        self.zsets.setdefault(waiters, {}).setdefault(member, self.time_us())
        self.pexpire(waiters, scripts.WAITERS_TTL_MS)
        return [self.pttl(lock), b"queued", str(self.zset(waiters)[member]).encode()]

    def script_release(self, keys: list[bytes], args: list[bytes]) -> Reply:
        """Release if the token matches (or, 'suffix', ends the value; that owner's queue
        entries go too), hand over to the longest waiter, remember the released token."""
        lock, waiters, fence, released = keys[:4]
        note = keys[4] if len(keys) > 4 else None
        token = args[0]
        mode = args[1] if len(args) > 1 else None
        if mode == b"suffix":
            for member in [m for m in self.zset(waiters) if m.endswith(token)]:
                self.zrem(waiters, member)
        value = self.get(lock)
        if mode == b"suffix":
            if value is None or len(value) <= len(token) or not value.endswith(token):
                return 0
        elif value != token:
            return 1 if self.get(released) == token else 0
        elif mode == b"note":
            assert note is not None
            self.set(note, args[2], px=int(args[3]))
        assert value is not None
        self.set(released, value, px=scripts.RELEASED_MEMORY_MS)
        while self.zset(waiters):
            head, score = self.ordered(waiters)[0]
            self.zrem(waiters, head)
            parsed = re.fullmatch(rb"(\d+):(.*)", head, re.DOTALL)
            if parsed is None:
                continue  # not a member a waiter would write: dropped
            length, rest = int(parsed[1]), parsed[2]
            waiter = rest[length:]
            if waiter == value:
                continue  # the releaser's own entry (a retried join): never handed the lock
            self.set(lock, waiter, px=scripts.HANDOFF_WINDOW_MS)
            number = self.incr(fence)
            self.publish(rest[:length], b"%d:%d:%s" % (number, score, waiter))
            return 1
        self._delete(lock)
        return 1

    def script_extend(self, keys: list[bytes], args: list[bytes]) -> Reply:
        """'add' to the remaining lease, 'set' it, or 'renew' to max(remaining, ms); capped."""
        lock = keys[0]
        token, ms, mode, cap = args[0], int(args[1]), args[2], int(args[3])
        if self.get(lock) != token:
            return -1
        lease = ms
        if mode != b"set":
            remaining = self.pttl(lock)
            if mode == b"add" and remaining > 0:
                lease = ms + remaining
            elif mode == b"renew" and remaining > ms:
                lease = remaining
        if cap > 0 and lease > cap:
            lease = cap
        self.pexpire(lock, lease)
        return lease

    def script_is_owner(self, keys: list[bytes], args: list[bytes]) -> Reply:
        return 1 if self.get(keys[0]) == args[0] else 0

    def script_fenced_set(self, keys: list[bytes], args: list[bytes]) -> Reply:
        """Write unless a higher fence wrote before; {1, fence} or {0, highest}."""
        stored = self.hashes.get(keys[0], {}) if self._alive(keys[0]) else {}
        highest = int(stored.get(b"fence", b"-1"))
        fence = int(args[0])
        if fence < highest:
            return [0, highest]
        self.hashes[keys[0]] = {**stored, b"fence": args[0], b"value": args[1]}
        return [1, fence]


def _bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value).encode()
    raise TypeError(f"cannot send {value!r}")
