"""Skip's second half: a call is a duplicate if a run with its key *started after it was requested*.

"Skip" drops a call whose lock is held. That alone lets duplicates through when
they wait in the queue: ten identical calls sent together, one runs, and any
copy consumed after that run ended finds the lock free and runs again, though
the run it duplicates began after it was sent and did exactly what it asked.
So with ``on_contention="skip"`` (and ``lock_skip_covered``, on by default) a
call is also skipped when it is *covered*:

* every message is stamped at publish with when it asked to run
  (:data:`REQUESTED_HEADER`: the publish time, or its ETA/countdown if later);
* a run that ends in SUCCESS leaves a note beside its lock, written atomically
  with its release: when it started and its task id (:class:`RunNote`);
* a run reads that note atomically with its acquisition; if the last successful
  run started at or after this message's stamp, this message is skipped
  (``TaskSkipped`` naming that run) and the lock released at once.

A run that fails, is retried or dies leaves no note, so its duplicates still run.
A message without a stamp (published by a process that does not import
celery-dlock) is only skipped while the lock is held.

The stamp and the note are wall-clock times of two hosts (publisher and
worker): clock skew between them moves the boundary by the skew. The lease
never depends on it (leases are server-side PX expiries); only which of two
near-simultaneous duplicates counts as "sent before the run started" does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from celery.signals import before_task_publish

#: Message header: wall-clock time (seconds since the epoch) the call asked to run.
REQUESTED_HEADER = "dlock_requested_at"


@dataclass(frozen=True)
class RunNote:
    """What a successful run leaves beside its lock: when it started, and its task id."""

    started_at: float
    task_id: str

    def text(self) -> str:
        return f"{self.started_at!r}|{self.task_id}"

    @classmethod
    def parse(cls, text: Any) -> RunNote | None:
        if text is None:
            return None
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        started, sep, task_id = str(text).partition("|")
        try:
            started_at = float(started)
        except ValueError:
            return None
        if not sep or not math.isfinite(started_at):
            return None
        return cls(started_at, task_id)

    def covers(self, requested_at: float) -> bool:
        """Whether this run started at or after a call requested at ``requested_at``."""
        return self.started_at >= requested_at


def requested_at(request: Any) -> float | None:
    """The stamp of the message behind ``request`` (None if it has none, or a malformed one)."""
    value = request.__dict__.get(REQUESTED_HEADER)
    if value is None and isinstance(getattr(request, "headers", None), dict):
        value = request.headers.get(REQUESTED_HEADER)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        stamp = float(value)
    except ValueError:
        return None
    return stamp if math.isfinite(stamp) else None


def _eta_seconds(eta: Any) -> float | None:
    if isinstance(eta, datetime):
        moment = eta
    elif isinstance(eta, str):
        try:
            moment = datetime.fromisoformat(eta)
        except ValueError:
            return None
    else:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def stamp(headers: dict[str, Any], now: float | None = None) -> None:
    """Stamp a message about to be published (kept if it already has one: a retry is the same call)."""
    if headers.get(REQUESTED_HEADER) is not None:
        return
    moment = time.time() if now is None else now
    eta = _eta_seconds(headers.get("eta"))
    headers[REQUESTED_HEADER] = max(moment, eta) if eta is not None else moment


def _stamp_before_publish(sender: Any = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    # Every message this process publishes: a task published by name
    # (send_task, beat) may be locked in the worker though unknown here.
    if isinstance(headers, dict):
        stamp(headers)


before_task_publish.connect(_stamp_before_publish, weak=False)
