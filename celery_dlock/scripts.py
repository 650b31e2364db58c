"""The Lua scripts that make every check-and-act on a lock one atomic server step.

Each script receives all key names through KEYS (never builds them in Lua), so
they run unchanged on Redis Cluster: the keys share one hash tag. No script
reads a client clock: leases are server-side PX expiries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Script:
    """A Lua script and its SHA1, so drivers can call EVALSHA and fall back to EVAL."""

    name: str
    source: str
    sha: str = field(init=False)
    sha_bytes: bytes = field(init=False, repr=False)
    # The source as sent: UTF-8 bytes, whatever encoding the client uses for values
    # (the SHA is of these bytes; a client encoding of e.g. UTF-16 would garble the Lua).
    source_bytes: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "source_bytes", self.source.encode())
        object.__setattr__(self, "sha", hashlib.sha1(self.source_bytes).hexdigest())
        object.__setattr__(self, "sha_bytes", self.sha.encode())

    def bind(self, encoded_keys: Sequence[str | bytes]) -> BoundScript:
        """This script with its KEYS fixed, for a caller that runs it over and over.

        ``encoded_keys``: the keys as the redis-py client encodes them
        (``client.get_encoder().encode``), so they are encoded once, not on every call.
        """
        return BoundScript(self, tuple(encoded_keys))


class BoundScript:
    """A script and its KEYS, with the leading arguments of EVALSHA (and of EVAL, its
    fallback) built once: a driver appends only the ARGV of each call.

    The SHA, the KEYS count and the keys (with the client's own key encoder) go in
    already encoded, as bytes, which redis-py sends as they are instead of encoding
    them again on every call. The command name stays a str: redis-py's cluster
    client routes EVALSHA by it. (A plain class: one is made per lock, so per
    Celery task run, and a frozen dataclass costs several times more to build.)
    """

    __slots__ = ("eval", "evalsha")

    def __init__(self, script: Script, encoded_keys: tuple[str | bytes, ...]) -> None:
        numkeys = _NUMKEYS.get(len(encoded_keys)) or str(len(encoded_keys)).encode()
        self.evalsha: tuple[str | bytes, ...] = ("EVALSHA", script.sha_bytes, numkeys, *encoded_keys)
        self.eval: tuple[str | bytes, ...] = ("EVAL", script.source_bytes, numkeys, *encoded_keys)


_NUMKEYS = {n: str(n).encode() for n in range(8)}


# A release that finds waiters makes the longest one the holder, with a lease of
# this long: the waiter, woken by the release's message, confirms it with an
# attempt, which sets its full lease (acquire never returns a lock on this short
# lease). A waiter that died in the queue thus keeps the lock from everyone for this
# long, after which the next waiter takes it on its next timed attempt (within its
# retry_delay). Long enough for a live waiter's wake-up and confirming round trip
# even on a loaded machine; one missed window only costs that waiter its place.
HANDOFF_WINDOW_MS = 500
# A release remembers the token it released this long (see RELEASE): longer than a
# client's retries of a request whose reply was lost.
RELEASED_MEMORY_MS = 60 * 1000
# The waiters queue of a lock expires this long after the last waiter joined.
WAITERS_TTL_MS = 10 * 60 * 1000

# The uncontended acquire and release are the hot path: both scripts take no
# argument that is the same on every call (the two windows above are written into
# their source), since each KEYS/ARGV entry costs the client an encode and the
# server a Lua string, and the acquire answers a bare integer when it succeeds.

# The modes of ACQUIRE (its ARGV[3]), as bytes, which redis-py sends as they are.
TRY, JOIN, WAIT = b"try", b"join", b"wait"

# KEYS[1] lock, KEYS[2] fence counter, KEYS[3] waiters (sorted set), KEYS[4] (only
# for locks with notes) the note the last holder left at release;
# ARGV[1] token, ARGV[2] lease in ms, ARGV[3] mode, ARGV[4] (modes 'join' and
# 'wait') the waiter's queue member: '<length>:<inbox channel><token>' (see
# celery_dlock.inbox), which tells a release where to send the wake-up.
# Modes: 'try' (one attempt, never queue), 'join' (the first attempt of a blocking
# acquire: queue on failure), 'wait' (a later attempt: already queued).
# Takes the lock if it is free. A lock that already holds this token is this
# attempt's own: a release handed it over (see RELEASE), or this is a client's
# retry of an attempt whose reply was lost; either way the attempt answers the
# current fence and sets the full lease (from now: later than the attempt was sent).
# A failed 'join'/'wait' attempt keeps its place in the queue (ZADD NX), which
# expires WAITERS_TTL_MS after the last waiter joined.
# Returns the new fence (an integer) when acquired, or {fence, note or nil} when
# KEYS[4] is given. Otherwise {ms until it is worth trying again} (-1: held
# without expiry), and for a queued attempt {ms, 'queued', the member's score}:
# a handover names that score, so the waiter knows the handover came after this
# attempt was sent.
ACQUIRE = Script(
    "acquire",
    f"local waiters_ttl_ms = {WAITERS_TTL_MS}\n"
    """
-- The reply of an acquisition: the fence, with the note beside it for locks with notes.
local function granted(fence)
  if KEYS[4] then
    return {fence, redis.call('GET', KEYS[4])}
  end
  return fence
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[4] then
    -- 'wait': we were queued; 'join': a retried request may have queued us already.
    redis.call('ZREM', KEYS[3], ARGV[4])
  end
  return granted(redis.call('INCR', KEYS[2]))
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  -- Already ours: handed over by a release, or a retried request (see above).
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if ARGV[4] then
    redis.call('ZREM', KEYS[3], ARGV[4])
  end
  return granted(tonumber(redis.call('GET', KEYS[2]) or redis.call('INCR', KEYS[2])))
end
if ARGV[3] == 'try' then
  return {redis.call('PTTL', KEYS[1])}
end
local now = redis.call('TIME')
redis.call('ZADD', KEYS[3], 'NX', now[1] * 1000000 + now[2], ARGV[4])
redis.call('PEXPIRE', KEYS[3], waiters_ttl_ms)
return {redis.call('PTTL', KEYS[1]), 'queued', redis.call('ZSCORE', KEYS[3], ARGV[4])}
""",
)

# KEYS[1] lock, KEYS[2] waiters, KEYS[3] fence counter, KEYS[4] the last released
# token, KEYS[5] (only for locks with notes) the note; ARGV[1] token; ARGV[2] absent
# (the value must equal ARGV[1]), 'note' (the same, and ARGV[3] is a note kept ARGV[4]
# ms, written only if the lock was ours) or 'suffix' (the value must end with ARGV[1]:
# how a Celery worker's main process frees the lock of a pool process that died,
# knowing only the owner part of its token; queued members of that owner are removed
# as well).
# Releases the lock only if it matches. If someone is waiting, hands the lock over:
# the longest waiter becomes the holder (with a new fence, for HANDOFF_WINDOW_MS)
# and '<fence>:<score>:<token>' is published on its inbox channel (named in its
# queue member), which wakes just that waiter's process; the score is the one its
# queued attempt saw. A queued member of the releasing token itself (left by a
# retried request) is dropped, never handed the lock. Every release remembers the
# released token for RELEASED_MEMORY_MS, so the same release sent again (its reply
# was lost, and the client retried it) answers 1 instead of "not ours".
# Returns 1 when released, 0 when the lock was not ours (expired or taken over), and
# {1, channel, error} when it was released and handed over but the wake-up could not
# be published.
RELEASE = Script(
    "release",
    f"local handoff_window_ms = {HANDOFF_WINDOW_MS}\n"
    f"local released_memory_ms = {RELEASED_MEMORY_MS}\n"
    """
if ARGV[2] == 'suffix' then
  -- The owner is gone: it waits in no queue either (else a release would hand it the lock).
  local n = string.len(ARGV[1])
  for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    if string.sub(member, -n) == ARGV[1] then
      redis.call('ZREM', KEYS[2], member)
    end
  end
end
local value = redis.call('GET', KEYS[1])
if ARGV[2] == 'suffix' then
  local n = string.len(ARGV[1])
  if not value or string.len(value) <= n or string.sub(value, -n) ~= ARGV[1] then
    return 0
  end
elseif value ~= ARGV[1] then
  -- Not ours now; but this very release may have run already (a retried request).
  if redis.call('GET', KEYS[4]) == ARGV[1] then
    return 1
  end
  return 0
elseif ARGV[2] == 'note' then
  redis.call('SET', KEYS[5], ARGV[3], 'PX', ARGV[4])
end
redis.call('SET', KEYS[4], value, 'PX', released_memory_ms)
while true do
  local head = redis.call('ZPOPMIN', KEYS[2])
  if not head[1] then
    break
  end
  -- '<length>:<inbox channel><token>'
  local length, rest = string.match(head[1], '^(%d+):(.*)$')
  if length then
    length = tonumber(length)
    local token = string.sub(rest, length + 1)
    -- The releaser's own token is no waiter (a retried request queued it after its
    -- first execution took the lock): drop it, like a malformed member.
    if token ~= value then
      redis.call('SET', KEYS[1], token, 'PX', handoff_window_ms)
      local fence = redis.call('INCR', KEYS[3])
      local channel = string.sub(rest, 1, length)
      local sent = redis.pcall('PUBLISH', channel, fence .. ':' .. head[2] .. ':' .. token)
      if type(sent) == 'table' and sent.err then
        -- Handed over all the same (the waiter finds it on its next timed attempt): say
        -- why the wake-up failed, e.g. an ACL without the channel.
        return {1, channel, sent.err}
      end
      return 1
    end
  end
end
redis.call('DEL', KEYS[1])
return 1
""",
)

# KEYS[1] lock; ARGV[1] token, ARGV[2] milliseconds, ARGV[3] mode, ARGV[4] cap on
# the resulting lease in ms (0: no cap).
# Modes: 'add' adds to the remaining lease; 'set' replaces it; 'renew' (what the
# watchdog uses) sets it to max(remaining, milliseconds), so renewal never grows a
# lease past the lock's timeout and never shortens a lease the holder extended.
# Returns the new lease in ms, or -1 when the lock is not ours any more.
EXTEND = Script(
    "extend",
    """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local lease = tonumber(ARGV[2])
local mode = ARGV[3]
if mode ~= 'set' then
  local remaining = redis.call('PTTL', KEYS[1])
  if mode == 'add' and remaining > 0 then
    lease = lease + remaining
  elseif mode == 'renew' and remaining > lease then
    lease = remaining
  end
end
local cap = tonumber(ARGV[4])
if cap > 0 and lease > cap then
  lease = cap
end
redis.call('PEXPIRE', KEYS[1], lease)
return lease
""",
)

# KEYS[1] lock; ARGV[1] token. 1 if the lock holds this token, else 0.
IS_OWNER = Script(
    "is_owner",
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return 1
end
return 0
""",
)


# KEYS[1] a hash holding a protected value and the highest fence that wrote it;
# ARGV[1] fence, ARGV[2] value. Refuses (returns {0, highest}) a write whose fence
# is lower than the highest seen, so a holder that lost its lock while paused
# cannot overwrite what a later holder wrote. Returns {1, fence} when written.
FENCED_SET = Script(
    "fenced_set",
    """
local highest = tonumber(redis.call('HGET', KEYS[1], 'fence') or '-1')
local fence = tonumber(ARGV[1])
if fence < highest then
  return {0, highest}
end
redis.call('HSET', KEYS[1], 'fence', ARGV[1], 'value', ARGV[2])
return {1, fence}
""",
)
ALL_SCRIPTS = (ACQUIRE, RELEASE, EXTEND, IS_OWNER, FENCED_SET)
