"""Waking blocked acquirers when a lock is handed to them (sync side).

A release that finds waiters hands the lock to the longest one and publishes that
waiter's token on the waiter's *inbox*: a channel of its process (see
:mod:`celery_dlock.inbox`), so one handover wakes one process. Every process keeps
**one** pub/sub connection per Redis server, read by one daemon thread; it
subscribes to its inbox on the first wait and stays subscribed. Any number of
waiters register on it by token.

A waiter whose queueing attempt went out before the subscription was confirmed
tries once more after the confirmation, so a handover in between is never missed.
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
from celery_dlock.deadline import call_before
from celery_dlock.inbox import CONFIRM_TIMEOUT, DEAD_CONNECTION, Inbox, Waiter, WaiterRegistry

logger = logging.getLogger("celery_dlock")

class ReleaseNotifier:
    """One pub/sub connection and reader thread shared by all waiters of a process."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._pubsub: Any = None
        self._mutex = threading.Lock()  # the registry's; never held during I/O
        self._writing = threading.Lock()  # one writer at a time on the pub/sub connection
        self._registry: WaiterRegistry[threading.Event] = WaiterRegistry(threading.Event)
        self._subscribed: set[str] = set()  # channels a SUBSCRIBE was sent for
        self._thread: threading.Thread | None = None

    @property
    def messages(self) -> int:
        """Handover messages this process has read (one per handover to one of its waiters)."""
        return self._registry.messages

    def inbox(self, prefix: str) -> Inbox[threading.Event]:
        """This process's inbox for locks under ``prefix`` (subscribed on the first :meth:`watch`)."""
        with self._mutex:
            return self._registry.inbox(prefix)[0]

    @contextmanager
    def watch(
        self, inbox: Inbox[threading.Event], token: str, confirm_timeout: float = CONFIRM_TIMEOUT
    ) -> Iterator[Waiter[threading.Event]]:
        """Register ``token`` for the block; yields its :class:`~celery_dlock.inbox.Waiter`,
        woken when ``token`` is handed a lock.

        Subscribes the inbox first if this is the process's first wait on it, and
        waits (at most ``confirm_timeout``) until the subscription is live.
        """
        waiter = Waiter(threading.Event())
        with self._mutex:
            self._registry.register(token, waiter)
            first = inbox.channel not in self._subscribed
            self._subscribed.add(inbox.channel)  # one SUBSCRIBE per channel, however long it takes
        if first:
            # On a helper thread, given up after confirm_timeout: a SUBSCRIBE that has to
            # connect runs under the client's own timeouts and retries.
            try:
                call_before(time.monotonic() + confirm_timeout, lambda: self._subscribe(inbox.channel))
            except Exception as exc:  # Redis down or slow: the waiter falls back to its timer.
                logger.debug("subscribe to %s failed: %r", inbox.channel, exc)
        try:
            if inbox.channel in self._subscribed and inbox.live_generation is None:
                inbox.confirmed.wait(confirm_timeout)
            yield waiter
        finally:
            with self._mutex:
                self._registry.unregister(token)

    def _subscribe(self, channel: str) -> None:
        try:
            with self._writing:
                if self._pubsub is None:
                    self._pubsub = self._client.pubsub()
                self._pubsub.subscribe(channel)
        except BaseException:
            with self._mutex:
                self._subscribed.discard(channel)  # the next waiter tries again
            raise
        with self._mutex:
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
                with self._mutex:
                    self._registry.connection_lost()
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            with self._mutex:
                action = self._registry.after_read(message, time.monotonic())
            try:
                if action == "ping":
                    with self._writing:  # a waiter's SUBSCRIBE writes on the same connection
                        self._pubsub.ping()
                elif action == "reconnect":
                    logger.warning(DEAD_CONNECTION)
                    self._pubsub.connection.disconnect()
            except Exception as exc:  # the next read sees (and handles) a broken connection
                logger.debug("release notifier health check: %r", exc)


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
