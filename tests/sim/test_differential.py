"""The simulated server against a real redis-server: the same calls, the same replies, keys and messages.

Each seed makes a random sequence of script calls on one lock (several tokens, every mode
of every script, queue members, notes, retried calls, foreign queue members) and runs it
on both. After every call the replies, the whole keyspace of the lock (types, values, the
queue's order, which keys expire and in how many seconds) and the messages published are
compared. Real time cannot be stopped, so expiry is not left to the clock: a "lapse" step
deletes a key on both sides, which is what its expiry does; leases are long, and
remaining leases are compared in whole seconds (rounded up).

Scores of the waiters queue come from the server's clock, so they are compared by what
they stand for: the member they were given to.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_dlock import scripts
from celery_dlock.inbox import inbox_channel, member_prefix
from celery_dlock.keys import LockKeys
from tests.sim.server import SimServer

SEEDS = int(os.environ.get("DLOCK_SIM_DIFF_SEEDS", "30"))
STEPS = 60
TOKENS = [b"tok-a:task1:w1:11", b"tok-b:task2:w1:12", b"tok-c:task3:w2:21", b"tok-d:task4:w2:22"]
SUFFIXES = [b":task1:w1:11", b":w2:22", b"nobody"]
LEASES = [30_000, 60_000]


@pytest.fixture(scope="module")
def real(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, protocol=2)
    for script in scripts.ALL_SCRIPTS:
        client.script_load(script.source_bytes)
    yield client
    client.close()


class World:
    """One side of the comparison: runs a step, and describes its lock's keyspace."""

    def __init__(self, keys: LockKeys, with_note: bool) -> None:
        self.keys = keys
        self.with_note = with_note
        self.score_member: dict[bytes, bytes] = {}  # a queue score -> the member it was given to

    def acquire_keys(self) -> list[str]:
        return [*self.keys.acquire_keys, *([self.keys.note] if self.with_note else [])]

    def release_keys(self) -> list[str]:
        return [*self.keys.release_keys, *([self.keys.note] if self.with_note else [])]

    def all_keys(self) -> list[str]:
        k = self.keys
        return [k.lock, k.fence, k.waiters, k.note, k.released]


def channel_of(index: int) -> bytes:
    return inbox_channel("simdiff:", f"inbox{index}").encode()


def member(token: bytes, inbox: int) -> bytes:
    return member_prefix(channel_of(inbox).decode()) + token


def random_step(rng: random.Random, with_note: bool) -> tuple[str, Any]:
    """One call the lock could make (a note only on a lock with notes: the lock refuses others)."""
    kind = rng.choices(
        ["acquire", "release", "extend", "is_owner", "lapse", "foreign"], weights=[8, 6, 3, 1, 2, 1]
    )[0]
    token = rng.choice(TOKENS)
    if kind == "acquire":
        mode = rng.choice([b"try", b"join", b"wait"])
        args = [token, rng.choice(LEASES), mode]
        if mode != b"try":
            args.append(member(token, rng.randrange(2)))
        return "acquire", args
    if kind == "release":
        how = rng.choice(["plain", "plain", "note" if with_note else "plain", "suffix"])
        if how == "suffix":
            return "release", [rng.choice(SUFFIXES), b"suffix"]
        if how == "note":
            return "release", [token, b"note", f"note-{rng.randrange(100)}".encode(), 90_000]
        return "release", [token]
    if kind == "extend":
        return "extend", [token, rng.choice([10_000, 40_000]), rng.choice([b"add", b"set", b"renew"]),
                          rng.choice([0, 50_000])]  # fmt: skip
    if kind == "is_owner":
        return "is_owner", [token]
    if kind == "lapse":
        return "lapse", rng.choice(["lock", "note", "released", "waiters"])
    # A queue member no waiter would write: no length prefix, or a length past its end
    # (then the whole rest is the channel and the token is empty).
    return "foreign", rng.choice([b"garbage-member", b"40:simdiff:inbox:short"])


def script_call(world: World, kind: str) -> tuple[scripts.Script, list[str]]:
    """The script a step runs, and its KEYS (the same on both sides)."""
    return {
        "acquire": (scripts.ACQUIRE, world.acquire_keys()),
        "release": (scripts.RELEASE, world.release_keys()),
        "extend": (scripts.EXTEND, [world.keys.lock]),
        "is_owner": (scripts.IS_OWNER, [world.keys.lock]),
    }[kind]


def run_real(real: redis.Redis, world: World, step: tuple[str, Any]) -> Any:
    kind, args = step
    if kind == "lapse":
        return real.delete(getattr(world.keys, args))
    if kind == "foreign":
        return real.zadd(world.keys.waiters, {args: 0})
    script, keys = script_call(world, kind)
    return real.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)


def run_sim(sim: SimServer, world: World, step: tuple[str, Any]) -> Any:
    kind, args = step
    if kind == "lapse":
        return int(sim._delete(getattr(world.keys, args).encode()) and True)
    if kind == "foreign":
        key = world.keys.waiters.encode()
        sim._alive(key)
        added = args not in sim.zsets.setdefault(key, {})
        sim.zsets[key][args] = 0
        return int(added)
    script, keys = script_call(world, kind)
    return sim.evalsha(script.sha, keys, args)


def seconds(ms: int) -> int:
    """A remaining lease in whole seconds, rounded up (-1/-2 as they are)."""
    return ms if ms < 0 else -(-ms // 1000)


def normal_reply(world: World, step: tuple[str, Any], reply: Any) -> Any:
    kind, args = step
    if kind == "acquire" and isinstance(reply, list) and len(reply) == 3 and reply[1] == b"queued":
        world.score_member[reply[2]] = args[3]
        return [seconds(reply[0]), b"queued", args[3]]
    if kind == "acquire" and isinstance(reply, list) and len(reply) == 1:
        return [seconds(reply[0])]
    if kind == "extend" and isinstance(reply, int) and reply > 0:
        return seconds(reply)
    return reply


def normal_message(world: World, payload: bytes) -> bytes:
    fence, score, token = payload.split(b":", 2)
    return b"%s:<%s>:%s" % (fence, world.score_member.get(score, b"?"), token)


def real_keyspace(real: redis.Redis, world: World) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key in world.all_keys():
        kind = real.type(key).decode()
        if kind == "none":
            continue
        if kind == "string":
            value: Any = real.get(key)
        elif kind == "zset":
            value = [m for m, _ in real.zrange(key, 0, -1, withscores=True)]
        else:
            value = real.hgetall(key)
        found[key] = (kind, value, seconds(int(real.pttl(key))))
    return found


def sim_keyspace(sim: SimServer, world: World) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key in world.all_keys():
        raw = key.encode()
        if not sim._alive(raw):
            continue
        if raw in sim.strings:
            value: Any = ("string", sim.strings[raw])
        elif raw in sim.zsets:
            value = ("zset", [m for m, _ in sim.ordered(raw)])
        else:
            value = ("hash", sim.hashes[raw])
        found[key] = (*value, seconds(sim.pttl(raw)))
    return found


def drain(pubsub: Any, expected: int) -> list[bytes]:
    """The messages published since the last drain: wait for ``expected``, then a moment for any extra."""
    got: list[bytes] = []
    deadline = time.monotonic() + 2
    while len(got) < expected and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.05)
        if message and message["type"] == "pmessage":
            got.append((message["channel"], message["data"]))
    message = pubsub.get_message(timeout=0.002)
    while message:
        if message["type"] == "pmessage":
            got.append((message["channel"], message["data"]))
        message = pubsub.get_message(timeout=0.002)
    return got


@pytest.mark.parametrize("seed", range(SEEDS))
def test_the_simulated_scripts_answer_as_the_real_ones(real: redis.Redis, seed: int) -> None:
    rng = random.Random(seed)
    keys = LockKeys.for_name(f"diff-{seed}-{uuid.uuid4().hex[:8]}", "simdiff:")
    with_note = seed % 2 == 0
    real_world, sim_world = World(keys, with_note), World(keys, with_note)
    sim = SimServer()
    pubsub = real.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(b"simdiff:inbox:*")
    trace: list[str] = []
    try:
        for index in range(STEPS):
            step = random_step(rng, with_note)
            real_reply = normal_reply(real_world, step, run_real(real, real_world, step))
            sim_reply = normal_reply(sim_world, step, run_sim(sim, sim_world, step))
            published, sim.published = sim.published, []
            real_messages = drain(pubsub, len(published))
            trace.append(f"{index}: {step!r} -> real {real_reply!r}, sim {sim_reply!r}")
            context = f"seed {seed}, step {index}\n" + "\n".join(trace[-12:])
            assert sim_reply == real_reply, context
            assert [(c, normal_message(sim_world, p)) for c, p in published] == [
                (c, normal_message(real_world, p)) for c, p in real_messages
            ], context
            assert sim_keyspace(sim, sim_world) == real_keyspace(real, real_world), context
    finally:
        pubsub.close()
        real.delete(*real_world.all_keys())


def test_the_comparison_sees_a_wrong_simulation(real: redis.Redis) -> None:
    """The check itself: a simulated RELEASE that forgets the released token is caught."""

    class Forgetful(SimServer):
        def script_release(self, keys: list[bytes], args: list[bytes]) -> Any:
            reply = super().script_release(keys, args)
            self._delete(keys[3])
            return reply

    keys = LockKeys.for_name(f"diff-wrong-{uuid.uuid4().hex[:8]}", "simdiff:")
    world = World(keys, with_note=False)
    sim = Forgetful()
    try:
        for step in [("acquire", [TOKENS[0], 30_000, b"try"]), ("release", [TOKENS[0]])]:
            run_real(real, world, step)
            run_sim(sim, world, step)
        assert sim_keyspace(sim, world) != real_keyspace(real, world)
    finally:
        real.delete(*world.all_keys())
