"""Waking blocked acquirers when a lock is handed to them (asyncio side).

The asyncio twin of :mod:`celery_dlock.notify`: per event loop and Redis server,
one pub/sub connection read by one task, subscribed to the loop's inbox channel
(:mod:`celery_dlock.inbox`) on its first wait and staying subscribed; waiters
register by token, so a release wakes only the waiter it handed the lock to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

from celery_dlock.connection import notifier_key
from celery_dlock.inbox import CONFIRM_TIMEOUT, DEAD_CONNECTION, Inbox, Waiter, WaiterRegistry

logger = logging.getLogger("celery_dlock")


class AsyncReleaseNotifier:
    """One pub/sub connection and reader task shared by all waiters on one event loop."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._pubsub: Any = None
        self._registry: WaiterRegistry[asyncio.Event] = WaiterRegistry(asyncio.Event)
        self._subscribed: set[str] = set()  # channels a SUBSCRIBE was sent for
        self._subscribing: set[asyncio.Task[None]] = set()  # SUBSCRIBEs under way (kept referenced)
        self._reader: asyncio.Task[None] | None = None

    @property
    def messages(self) -> int:
        """Handover messages this loop has read (one per handover to one of its waiters)."""
        return self._registry.messages

    def inbox(self, prefix: str) -> Inbox[asyncio.Event]:
        """This loop's inbox for locks under ``prefix`` (subscribed on the first :meth:`watch`)."""
        return self._registry.inbox(prefix)[0]

    @contextlib.asynccontextmanager
    async def watch(
        self, inbox: Inbox[asyncio.Event], token: str, confirm_timeout: float = CONFIRM_TIMEOUT
    ) -> AsyncIterator[Waiter[asyncio.Event]]:
        """Register ``token`` for the block; yields its :class:`~celery_dlock.inbox.Waiter`,
        woken when ``token`` is handed a lock.

        Subscribes the inbox first if this is the loop's first wait on it, and waits
        (at most ``confirm_timeout``) until the subscription is live.
        """
        waiter = Waiter(asyncio.Event())
        self._registry.register(token, waiter)
        try:
            if inbox.channel not in self._subscribed:
                self._subscribed.add(inbox.channel)  # before awaiting: one SUBSCRIBE per inbox
                # A task of its own, waited for at most confirm_timeout: a SUBSCRIBE that
                # has to connect runs under the client's own timeouts and retries.
                subscribing = asyncio.get_running_loop().create_task(self._subscribe(inbox.channel))
                self._subscribing.add(subscribing)
                subscribing.add_done_callback(self._subscribing.discard)
                try:
                    await asyncio.wait_for(asyncio.shield(subscribing), confirm_timeout)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Redis down or slow: the waiter falls back to its timer.
                    logger.debug("subscribe to %s failed: %r", inbox.channel, exc)
            if inbox.channel in self._subscribed and inbox.live_generation is None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(inbox.confirmed.wait(), confirm_timeout)
            yield waiter
        finally:
            self._registry.unregister(token)

    async def _subscribe(self, channel: str) -> None:
        try:
            if self._pubsub is None:
                self._pubsub = self._client.pubsub()
            await self._pubsub.subscribe(channel)
        except BaseException:
            self._subscribed.discard(channel)  # the next waiter tries again
            raise
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_forever())

    async def _read_forever(self) -> None:
        backoff = 0.05
        while True:
            # Each read runs in a task of its own that this one waits for without
            # passing a cancellation on to it: redis-py can turn a cancellation that
            # races its read timeout into an ordinary timeout, which would keep this
            # loop (and the event loop's shutdown) going. The read ends by itself
            # within its 1 s timeout.
            read = asyncio.ensure_future(self._pubsub.get_message(timeout=1.0))
            try:
                await asyncio.wait({read})
            except asyncio.CancelledError:
                read.cancel()
                raise
            try:
                message = read.result()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("release notifier connection error: %r", exc)
                self._registry.connection_lost()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            action = self._registry.after_read(message, time.monotonic())
            try:
                if action == "ping":
                    await self._pubsub.ping()
                elif action == "reconnect":
                    logger.warning(DEAD_CONNECTION)
                    await self._pubsub.connection.disconnect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next read sees (and handles) a broken connection
                logger.debug("release notifier health check: %r", exc)


_notifiers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], AsyncReleaseNotifier]]
_notifiers = weakref.WeakKeyDictionary()


def notifier_for(client: Any) -> AsyncReleaseNotifier:
    """The notifier of the running event loop for the server ``client`` talks to."""
    per_loop = _notifiers.setdefault(asyncio.get_running_loop(), {})
    key = notifier_key(client)
    notifier = per_loop.get(key)
    if notifier is None:
        notifier = per_loop[key] = AsyncReleaseNotifier(client)
    return notifier


def _forget_in_child() -> None:
    _notifiers.clear()


os.register_at_fork(after_in_child=_forget_in_child)
