"""Skip, made independent of timing: a call requested while an identical one was queued or running.

"Skip" drops a call whose lock is held: one requested while an identical call
runs is dropped if a worker happens to take it during that run. Queued copies
slip through: ten identical calls sent together, one runs, and every copy a
worker takes *after* that run ended finds the lock free and runs again. So with
``on_contention="skip"`` (and ``lock_skip_covered``, on by default) a call is
also skipped when it is *covered*: the last successful run with its lock key
was the very same call (same task, same arguments) and the call was requested
before that run ended, i.e. while an identical call was queued or running.
(Several tasks, or calls with different arguments, may share a lock key: those
are never covered by each other, only skipped while the lock is held.) This is the
rule celery-once and celery-singleton apply at publish time, applied when the
message runs instead (so ``send_task``, beat and canvas paths are covered too,
and a run that did not succeed covers nothing):

* every message is stamped at publish with when it asked to run
  (:data:`REQUESTED_HEADER`: the publish time, or its ETA/countdown if later);
* a run that ends in SUCCESS leaves a note beside its lock, written atomically
  with its release: when it ended, which call it was (a digest of the task
  name and arguments) and its task id (:class:`RunNote`);
* a run reads that note atomically with its acquisition; if it is the same call
  and this message's stamp is not later than that run's end, it is skipped
  (``TaskSkipped`` naming that run) and the lock released at once.

A run that fails, is retried or dies leaves no note, so its duplicates still run.
A message without a stamp (published by a process that does not import
celery-dlock) is only skipped while the lock is held.

The stamp and the note are wall-clock times of two hosts (publisher and
worker): clock skew between them moves the boundary by the skew. The lease
never depends on it (leases are server-side PX expiries); only which of two
near-simultaneous calls counts as "requested before that run ended" does.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from celery.signals import before_task_publish

from celery_dlock.celery.keys import canonical, digest

#: Message header: wall-clock time (seconds since the epoch) the call asked to run.
REQUESTED_HEADER = "dlock_requested_at"


@dataclass(frozen=True)
class RunNote:
    """What a successful run leaves beside its lock: when it ended, which call it was, its task id."""

    finished_at: float
    call: str
    task_id: str

    def text(self) -> str:
        return f"{self.finished_at!r}|{self.call}|{self.task_id}"

    @classmethod
    def parse(cls, text: Any) -> RunNote | None:
        if text is None:
            return None
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        parts = str(text).split("|", 2)
        if len(parts) != 3:
            return None
        finished, call, task_id = parts
        try:
            finished_at = float(finished)
        except ValueError:
            return None
        if not math.isfinite(finished_at):
            return None
        return cls(finished_at, call, task_id)

    def covers(self, call: str, requested_at: float) -> bool:
        """Whether ``call`` (requested at ``requested_at``) is this run's call, requested before it ended."""
        return call == self.call and self.finished_at >= requested_at


def call_identity(task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
    """A digest naming one call (task and arguments as given), or None if an argument has no stable form.

    Positional and keyword spellings of the same call differ here: that only
    means fewer calls count as identical, never that different calls do.
    """
    try:
        data = {
            "task": task_name,
            "args": [canonical(value) for value in args],
            "kwargs": {str(name): canonical(value) for name, value in kwargs.items()},
        }
    except (TypeError, ValueError):
        return None
    return digest(data)


def name_digest(lock_name: str) -> str:
    """The call of a lock key made of the task name and all its arguments: its lock name, hashed
    (one sha256 instead of canonicalising the arguments a second time)."""
    return hashlib.sha256(lock_name.encode()).hexdigest()


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
        # A naive ETA means the app's timezone to the worker (celery.worker.request).
        moment = moment.replace(tzinfo=_app_timezone())
    return moment.timestamp()


def _app_timezone() -> Any:
    try:
        from celery import current_app

        return current_app.timezone
    except Exception:  # no usable app: Celery's own default is UTC
        return timezone.utc


def stamp(headers: dict[str, Any], now: float | None = None) -> None:
    """Stamp a message about to be published (a stamp the caller set is kept)."""
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
