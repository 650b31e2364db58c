"""docs/lock.md's state table of one lock name, played row by row on the simulated server.

The simulated server is checked against the real scripts (test_differential.py), so a row
that holds here holds for the Lua. The table is read from the document itself: a row
edited to say something the scripts do not do fails here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from celery_dlock import scripts
from celery_dlock.inbox import inbox_channel, member_prefix
from celery_dlock.keys import LockKeys
from tests.sim.server import SimServer

DOC = Path(__file__).resolve().parents[2] / "docs" / "lock.md"
HEADER = "| from | event (script) | to | reply |"
KEYS = LockKeys.for_name("report", "doc:")
FENCE = 5  # the fence counter before each row: "a new fence" is 6
LEASE = 30_000


def table_rows() -> list[tuple[str, str, str, str]]:
    lines = DOC.read_text().splitlines()
    start = lines.index(HEADER) + 2  # the header and its |---| line
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append((cells[0], cells[1], cells[2], cells[3]))
    return rows


def token(who: str) -> bytes:
    return f"tok-{who}:owner-{who}".encode()


def channel(who: str) -> bytes:
    return inbox_channel("doc:", f"inbox-{who}").encode()


def member(who: str) -> bytes:
    return member_prefix(channel(who).decode()) + token(who)


def parse_state(text: str) -> dict[str, Any]:
    state: dict[str, Any] = {"lock": None, "queue": [], "remembered": None, "woken": []}
    for part in (p.strip() for p in re.split(r",\s*(?![^\[]*\])", text)):
        if part == "free":
            continue
        if found := re.fullmatch(r"(held|handed)\((\w)\)", part):
            state["lock"] = (found[1], found[2])
        elif found := re.fullmatch(r"Q \[(.*)\]", part):
            state["queue"] = [w.strip() for w in found[1].split(",") if w.strip()]
        elif found := re.fullmatch(r"remembered (\w)", part):
            state["remembered"] = found[1]
        elif found := re.fullmatch(r"wake-up to (\w)", part):
            state["woken"].append(found[1])
        else:
            raise ValueError(f"cannot read the state {part!r} of {text!r}")
    return state


def build(state: dict[str, Any]) -> SimServer:
    sim = SimServer()
    sim.set(KEYS.fence.encode(), str(FENCE).encode())
    if state["lock"] is not None:
        kind, who = state["lock"]
        lease = scripts.HANDOFF_WINDOW_MS if kind == "handed" else LEASE
        sim.set(KEYS.lock.encode(), token(who), px=lease)
    for index, who in enumerate(state["queue"]):
        sim.zsets.setdefault(KEYS.waiters.encode(), {})[member(who)] = 1000 + index
    if state["remembered"] is not None:
        sim.set(KEYS.released.encode(), token(state["remembered"]), px=scripts.RELEASED_MEMORY_MS)
    return sim


def observe(sim: SimServer) -> dict[str, Any]:
    """The state as the table names it, read back from the simulated keyspace."""
    state: dict[str, Any] = {"lock": None, "queue": [], "remembered": None, "woken": []}
    value = sim.get(KEYS.lock.encode())
    if value is not None:
        who = value.decode().removeprefix("tok-")[0]
        handed = 0 <= sim.pttl(KEYS.lock.encode()) <= scripts.HANDOFF_WINDOW_MS
        state["lock"] = ("handed" if handed else "held", who)
    state["queue"] = [m.decode()[-1] for m, _ in sim.ordered(KEYS.waiters.encode())]
    remembered = sim.get(KEYS.released.encode())
    if remembered is not None:
        state["remembered"] = remembered.decode().removeprefix("tok-")[0]
    for published_on, payload in sim.published:
        who = payload.decode().rsplit("owner-", 1)[1]
        assert published_on == channel(who), (published_on, payload)
        state["woken"].append(who)
    return state


def play(sim: SimServer, event: str) -> Any:
    if event == "lease ends":
        sim.advance(LEASE + 1)
        return None
    found = re.fullmatch(r"(acquire|release|extend)\((.*)\)", event)
    assert found, f"cannot read the event {event!r}"
    what, args = found[1], [a.strip() for a in found[2].split(",")]
    if what == "acquire":
        who, mode = args
        queue = [member(who)] if mode != "try" else []
        return sim.evalsha(scripts.ACQUIRE.sha, list(KEYS.acquire_keys), [token(who), LEASE, mode, *queue])
    if what == "release":
        if args[0].startswith("suffix of "):
            who = args[0].removeprefix("suffix of ")
            return sim.evalsha(scripts.RELEASE.sha, list(KEYS.release_keys), [f":owner-{who}", "suffix"])
        return sim.evalsha(scripts.RELEASE.sha, list(KEYS.release_keys), [token(args[0])])
    return sim.evalsha(scripts.EXTEND.sha, [KEYS.lock], [token(args[0]), LEASE, "set", 0])


def check_reply(expected: str, reply: Any) -> None:
    if expected == "a new fence":
        assert reply == FENCE + 1
    elif expected == "the same fence":
        assert reply == FENCE
    elif expected == "[lease left]":
        assert isinstance(reply, list) and len(reply) == 1 and reply[0] > 0
    elif expected == "[lease left, queued]":
        assert isinstance(reply, list) and len(reply) == 3 and reply[0] > 0 and reply[1] == b"queued"
    elif expected == "lease in ms":
        assert reply == LEASE
    elif expected == "-":
        assert reply is None
    else:
        assert reply == int(expected)


ROWS = table_rows()


def test_the_table_is_there() -> None:
    assert len(ROWS) >= 10


@pytest.mark.parametrize(("before", "event", "after", "reply"), ROWS, ids=[f"{r[0]} -- {r[1]}" for r in ROWS])
def test_each_row_of_the_state_table_holds(before: str, event: str, after: str, reply: str) -> None:
    sim = build(parse_state(before))
    check_reply(reply, play(sim, event))
    assert observe(sim) == parse_state(after)


def test_a_wrong_row_fails() -> None:
    """The check itself: a row claiming a release deletes another owner's lock is caught."""
    sim = build(parse_state("held(A)"))
    play(sim, "release(B)")
    assert observe(sim) != parse_state("free")
