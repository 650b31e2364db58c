"""Waking blocked acquirers when a lock is handed to them (asyncio side).

The asyncio twin of :mod:`celery_dlock.notify`: per event loop and Redis
server, one pub/sub connection read by one task; waiters register by token,
so a release wakes only the waiter it handed the lock to, and subscribe (and
wait for the server's confirmation) before their next attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from collections.abc import AsyncIterator
from typing import Any

from celery_dlock.connection import notifier_key
from celery_dlock.notify import CONFIRM_TIMEOUT, message_text

logger = logging.getLogger("celery_dlock")


class AsyncReleaseNotifier:
    """One pub/sub connection and reader task shared by all waiters on one event loop."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._pubsub: Any = None
        self._waiters: dict[str, dict[str, asyncio.Event]] = {}
        self._confirmed: dict[str, asyncio.Event] = {}
        self._reader: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def watch(
        self, channel: str, token: str, confirm_timeout: float = CONFIRM_TIMEOUT
    ) -> AsyncIterator[asyncio.Event]:
        """Subscribe to ``channel`` for the block; yields an Event set when ``token`` is handed the lock."""
        wake = asyncio.Event()
        waiters = self._waiters.setdefault(channel, {})
        first = not waiters
        waiters[token] = wake
        if first:
            self._confirmed[channel] = asyncio.Event()
        confirmed = self._confirmed[channel]
        try:
            subscribed = True
            if first:
                try:
                    await self._subscribe(channel)
                except Exception as exc:  # Redis down: the waiter falls back to its timer.
                    logger.debug("subscribe to %s failed: %r", channel, exc)
                    subscribed = False
            if subscribed:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(confirmed.wait(), confirm_timeout)
            yield wake
        finally:
            waiters.pop(token, None)
            if not waiters and self._waiters.get(channel) is waiters:
                del self._waiters[channel]
                del self._confirmed[channel]
                if self._pubsub is not None:
                    try:
                        await self._pubsub.unsubscribe(channel)
                    except Exception as exc:
                        logger.debug("unsubscribe from %s failed: %r", channel, exc)

    async def _subscribe(self, channel: str) -> None:
        if self._pubsub is None:
            self._pubsub = self._client.pubsub()
        await self._pubsub.subscribe(channel)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_forever())

    async def _read_forever(self) -> None:
        backoff = 0.05
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("release notifier connection error: %r", exc)
                for channel, waiters in self._waiters.items():
                    self._confirmed[channel].set()
                    for wake in waiters.values():
                        wake.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            if message is None:
                continue
            kind = message_text(message.get("type", ""))
            channel = message_text(message.get("channel", ""))
            if kind == "subscribe":
                confirmed = self._confirmed.get(channel)
                if confirmed is not None:
                    confirmed.set()
            elif kind == "message":
                waiters = self._waiters.get(channel, {})
                payload = message_text(message.get("data", "*"))
                chosen = waiters.get(payload)
                if chosen is not None:
                    chosen.set()
                elif payload == "*":
                    for wake in waiters.values():
                        wake.set()


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
