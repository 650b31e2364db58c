"""Where a release sends its wake-up: one inbox channel per process (per event loop).

A blocked acquirer queues under a *member* that names its process's inbox channel
as well as its own token (``<length>:<channel><token>``). The release that hands
the lock to the longest waiter publishes that waiter's token on that channel only,
so a handover wakes exactly one process. With one channel per *lock*, every process
with a waiter on the lock was woken to read a message meant for another (at 8
processes, 7 wake-ups per handover, which is what made handovers slow on 2 cores).

A process subscribes to its inbox on its first wait and stays subscribed, so later
waits cost no SUBSCRIBE, no confirmation and no extra attempt. Inboxes are per key
prefix (``<prefix>inbox:<id>``), so a Redis ACL that grants ``&<prefix>*`` covers them.

This module holds everything about inboxes that is not I/O: names, the member
encoding, which waiter a message wakes, and whether the subscription was live when a
waiter queued. :mod:`celery_dlock.notify` (a reader thread) and
:mod:`celery_dlock.asyncio.notify` (a reader task) do the I/O.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

INBOX_ID_BYTES = 8  # 64 random bits: unique among the processes sharing a server

# How long a waiter waits for the server to confirm its process's first SUBSCRIBE
# before falling back to retrying on its timer alone.
CONFIRM_TIMEOUT = 2.0

# The pub/sub connection's health check: after this long without hearing anything the
# reader sends a PING, and a PING unanswered this long means the connection is dead
# (a NAT or firewall dropped it silently): the reader drops it and reconnects, and
# every waiter wakes to try again meanwhile. So a dead connection is noticed within
# HEALTH_BOUND (plus the reader's 1 s read timeout).
PING_AFTER_SILENCE = 2.0
PONG_TIMEOUT = 2.0
HEALTH_BOUND = PING_AFTER_SILENCE + PONG_TIMEOUT
DEAD_CONNECTION = "release notifier: no answer to PING on the pub/sub connection; reconnecting"

# A release message whose waiter had not registered yet (its queueing attempt was
# still being answered) is kept this long, for that waiter to find when it registers.
UNCLAIMED_KEEP = 5.0
UNCLAIMED_MAX = 1024


class Wakeable(Protocol):
    def set(self) -> None: ...


W = TypeVar("W", bound=Wakeable)


def message_text(value: object) -> str:
    """A pub/sub message field as text, whatever the client's decode_responses.

    Anyone allowed to publish can put any bytes on a channel: undecodable bytes are
    replaced, never raised (an exception would stop the reader, and every later
    wake-up of the process with it).
    """
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def handover_token(payload: str) -> str:
    """The token a release message ``'<fence>:<score>:<token>'`` (the RELEASE script's) is for.

    The message only wakes that token's waiter, which then asks the server: a lock
    is granted by what the server holds, never by a message (anyone who may publish
    could forge one). A payload of another shape is taken as a bare token.
    """
    fence, _, rest = payload.partition(":")
    _score, _, token = rest.partition(":")
    if not token or not fence.isdigit():
        return payload
    return token


class Waiter(Generic[W]):
    """One blocked acquirer: the event a release message for its token sets."""

    def __init__(self, wake: W) -> None:
        self.wake = wake


def inbox_channel(prefix: str, inbox_id: str) -> str:
    """The pub/sub channel on which releases wake the waiters of one process."""
    return f"{prefix}inbox:{inbox_id}"


def member_prefix(channel: str) -> bytes:
    """The start of every waiters-queue member of an inbox: ``<byte length>:<channel>``.

    The token follows it; the release script splits the two by the length, so
    neither a channel nor a token needs a reserved separator.
    """
    encoded = channel.encode()
    return b"%d:%s" % (len(encoded), encoded)


class Heartbeat:
    """When the pub/sub reader should PING its connection, and when silence means it is dead."""

    def __init__(self, now: float) -> None:
        self._last_heard = now
        self._ping_sent_at: float | None = None

    def heard(self, now: float) -> None:
        """Anything arrived (a message, a confirmation, a PONG): the connection is alive."""
        self._last_heard = now
        self._ping_sent_at = None

    def should_ping(self, now: float) -> bool:
        return self._ping_sent_at is None and now - self._last_heard >= PING_AFTER_SILENCE

    def pinged(self, now: float) -> None:
        self._ping_sent_at = now

    def dead(self, now: float) -> bool:
        return self._ping_sent_at is not None and now - self._ping_sent_at >= PONG_TIMEOUT


class Inbox(Generic[W]):
    """One inbox channel: its name, its member prefix, and the state of its subscription."""

    def __init__(self, channel: str, confirmed: W) -> None:
        self.channel = channel
        self.member_prefix = member_prefix(channel)
        # Set by the reader when the server confirms the subscription; reset on
        # connection loss (the driver's event type: threading or asyncio).
        self.confirmed = confirmed
        # The registry's connection generation when confirmed; None until then, and
        # after a connection loss until the reader has subscribed again. A waiter
        # reads it before its queueing attempt: if the same generation is still live
        # afterwards, any handover to it after that attempt is delivered.
        self.live_generation: int | None = None

    def member(self, token: str) -> bytes:
        """The waiters-queue member of ``token`` queued through this inbox."""
        return self.member_prefix + token.encode()


class WaiterRegistry(Generic[W]):
    """The inboxes of one notifier and the waiters registered on them, by token.

    No I/O and no locking: the sync notifier calls it under its mutex, the asyncio
    one from its event loop. Tokens are random, so one flat table serves every lock.
    """

    def __init__(self, make_event: Callable[[], W]) -> None:
        self.inbox_id = os.urandom(INBOX_ID_BYTES).hex()
        self.inboxes: dict[str, Inbox[W]] = {}  # by channel
        self._make_event = make_event
        self._waiters: dict[str, Waiter[W]] = {}
        # token -> when a release message for it arrived before its waiter registered
        self._unclaimed: OrderedDict[str, float] = OrderedDict()
        # Bumped on every connection loss: a subscription confirmed in an older
        # generation may have missed messages.
        self.generation = 0
        self.messages = 0  # handover messages read (tests check one per handover)
        self._heartbeat = Heartbeat(time.monotonic())

    def inbox(self, prefix: str) -> tuple[Inbox[W], bool]:
        """The inbox for keys under ``prefix``; True when it is new (not subscribed yet)."""
        channel = inbox_channel(prefix, self.inbox_id)
        inbox = self.inboxes.get(channel)
        if inbox is not None:
            return inbox, False
        inbox = self.inboxes[channel] = Inbox(channel, self._make_event())
        return inbox, True

    def register(self, token: str, waiter: Waiter[W]) -> None:
        """Wake ``waiter`` when ``token`` is handed a lock (at once, if that already happened)."""
        self._waiters[token] = waiter
        if self._unclaimed.pop(token, None) is not None:
            waiter.wake.set()

    def unregister(self, token: str) -> None:
        self._waiters.pop(token, None)

    def confirmed(self, channel: str) -> None:
        """The server confirmed the subscription to ``channel``.

        Each inbox is subscribed once; a second confirmation means the client
        reconnected and resubscribed by itself (redis-py retries a dropped pub/sub
        connection without raising), so handovers may have been lost in between.
        """
        inbox = self.inboxes.get(channel)
        if inbox is None:
            return
        if inbox.live_generation is not None:
            self.connection_lost()
        inbox.live_generation = self.generation
        inbox.confirmed.set()

    def after_read(self, message: dict[Any, Any] | None, now: float) -> str | None:
        """What the reader does after one read (``message``, or None when it timed out):
        None, ``"ping"`` (send a PING on the pub/sub connection), or ``"reconnect"`` (the
        connection is silently dead: drop it; the next read reconnects and resubscribes,
        and every waiter has been woken to try again meanwhile)."""
        if message is not None:
            self._heartbeat.heard(now)
            self.on_message(message)
            return None
        if self._heartbeat.dead(now):
            self._heartbeat.heard(now)  # a fresh start for the new connection
            self.connection_lost()
            return "reconnect"
        if self._heartbeat.should_ping(now):
            self._heartbeat.pinged(now)
            return "ping"
        return None

    def on_message(self, message: dict[Any, Any]) -> None:
        """One message the pub/sub reader read (``get_message``'s dict): a release's
        wake-up, or the server's confirmation of a subscription; anything else is ignored."""
        kind = message_text(message.get("type", ""))
        if kind == "message":
            self.handed_over(message_text(message.get("data", "")))
        elif kind == "subscribe":
            self.confirmed(message_text(message.get("channel", "")))

    def handed_over(self, payload: str) -> None:
        """A release handed a lock to a token of ours: wake its waiter, or keep the news for it."""
        self.messages += 1
        token = handover_token(payload)
        waiter = self._waiters.get(token)
        if waiter is not None:
            waiter.wake.set()
            return
        now = time.monotonic()
        self._unclaimed[token] = now
        while self._unclaimed:
            oldest_token, received = next(iter(self._unclaimed.items()))
            if len(self._unclaimed) <= UNCLAIMED_MAX and now - received <= UNCLAIMED_KEEP:
                break
            del self._unclaimed[oldest_token]

    def connection_lost(self) -> None:
        """Messages may have been lost: no subscription counts as live until confirmed
        again, and every waiter wakes to look for itself (tries again)."""
        self.generation += 1
        for inbox in self.inboxes.values():
            inbox.live_generation = None
        for waiter in self._waiters.values():
            waiter.wake.set()
