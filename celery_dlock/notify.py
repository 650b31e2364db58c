"""Waking blocked acquirers when a lock is handed to them (sync side).

A release that finds waiters hands the lock to the longest one and publishes
that waiter's token on the lock's channel (inside the release script). Every
process keeps **one** pub/sub connection per Redis server, read by one daemon
thread, and any number of waiters register on it by token, so a release wakes
exactly the waiter it chose (the payload ``*`` wakes all). A waiter subscribes
(and waits for the server to confirm) *before* its next attempt, so a handover
that happens between a failed attempt and the wait is never missed.

Expiry publishes nothing, so waiters never sleep longer than the holder's
remaining lease (see :class:`celery_dlock.lease.AttemptPlan`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery_dlock.connection import notifier_key

logger = logging.getLogger("celery_dlock")

# How long a waiter waits for the server to confirm its SUBSCRIBE before falling
# back to retrying on its timer alone.
CONFIRM_TIMEOUT = 2.0


def message_text(value: Any) -> str:
    """A pub/sub message field as text, whatever the client's decode_responses."""
    return value.decode() if isinstance(value, bytes) else str(value)


class ReleaseNotifier:
    """One pub/sub connection and reader thread shared by all waiters of a process."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._pubsub: Any = None
        self._mutex = threading.Lock()
        self._waiters: dict[str, dict[str, threading.Event]] = {}
        self._confirmed: dict[str, threading.Event] = {}
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(
        self, channel: str, token: str, confirm_timeout: float = CONFIRM_TIMEOUT
    ) -> Iterator[threading.Event]:
        """Subscribe to ``channel`` for the block; yields an Event set when ``token`` is handed the lock."""
        wake = threading.Event()
        subscribed = True
        with self._mutex:
            waiters = self._waiters.setdefault(channel, {})
            if not waiters:
                self._confirmed[channel] = threading.Event()
                try:
                    self._subscribe(channel)
                except Exception as exc:  # Redis down: the waiter falls back to its timer.
                    logger.debug("subscribe to %s failed: %r", channel, exc)
                    subscribed = False
            confirmed = self._confirmed[channel]
            waiters[token] = wake
        try:
            if subscribed:
                confirmed.wait(confirm_timeout)
            yield wake
        finally:
            with self._mutex:
                waiters.pop(token, None)
                if not waiters and self._waiters.get(channel) is waiters:
                    del self._waiters[channel]
                    del self._confirmed[channel]
                    try:
                        self._pubsub.unsubscribe(channel)
                    except Exception as exc:
                        logger.debug("unsubscribe from %s failed: %r", channel, exc)

    def _subscribe(self, channel: str) -> None:
        if self._pubsub is None:
            self._pubsub = self._client.pubsub()
        self._pubsub.subscribe(channel)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._read_forever, name="celery-dlock-notify", daemon=True
            )
            self._thread.start()

    def _read_forever(self) -> None:
        backoff = 0.05
        while True:
            try:
                message = self._pubsub.get_message(timeout=1.0)
                backoff = 0.05
            except Exception as exc:
                # Connection lost: wake everyone so they retry (and see the error
                # themselves); redis-py reconnects and resubscribes on the next read.
                logger.debug("release notifier connection error: %r", exc)
                self._wake_all(confirm=True)
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            if message is None:
                continue
            kind = message_text(message.get("type", ""))
            channel = message_text(message.get("channel", ""))
            with self._mutex:
                if kind == "subscribe":
                    confirmed = self._confirmed.get(channel)
                    if confirmed is not None:
                        confirmed.set()
                elif kind == "message":
                    self._dispatch(channel, message_text(message.get("data", "*")))

    def _dispatch(self, channel: str, payload: str) -> None:
        """Wake the waiter the lock was handed to (called with the mutex held)."""
        waiters = self._waiters.get(channel, {})
        chosen = waiters.get(payload)
        if chosen is not None:
            chosen.set()
        elif payload == "*":
            for wake in waiters.values():
                wake.set()

    def _wake_all(self, confirm: bool) -> None:
        with self._mutex:
            for channel, waiters in self._waiters.items():
                if confirm:
                    self._confirmed[channel].set()
                for wake in waiters.values():
                    wake.set()


_notifiers: dict[tuple[Any, ...], ReleaseNotifier] = {}
_notifiers_lock = threading.Lock()


def notifier_for(client: Any) -> ReleaseNotifier:
    """The process-wide notifier for the server ``client`` talks to."""
    key = notifier_key(client)
    with _notifiers_lock:
        notifier = _notifiers.get(key)
        if notifier is None:
            notifier = _notifiers[key] = ReleaseNotifier(client)
        return notifier


def _forget_notifiers_in_child() -> None:
    # The parent's reader threads do not exist in a forked child; start afresh.
    global _notifiers_lock
    _notifiers.clear()
    _notifiers_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_notifiers_in_child)
