"""Queued markers of dedup_on_publish can be listed and removed: a marker whose message
vanished (purged queue, lost broker data) never blocks new publishes with no way out."""

from __future__ import annotations

import uuid

from celery import Celery

from celery_dlock.celery import LockedTask, clear_queued_marker, queued_markers


def test_a_vanished_messages_marker_is_listed_and_can_be_cleared(redis_url: str) -> None:
    name = uuid.uuid4().hex[:10]
    app = Celery(f"markers-{name}", broker="memory://", backend="cache+memory://")
    app.conf.update(dlock_redis_url=redis_url, dlock_prefix=f"{name}:")

    @app.task(base=LockedTask, name=f"{name}.report", lock_key=["day"], dedup_on_publish=True,
              dedup_timeout=600, shared=False)
    def report(day: str) -> None: ...

    first = report.delay("monday")  # nobody consumes it: as good as a purged message
    assert report.delay("monday").id == first.id  # deduplicated against the marker
    other = report.delay("tuesday")
    markers = {m.name: m for m in queued_markers(app)}
    monday = report.lock_name_for("monday")
    assert set(markers) == {monday, report.lock_name_for("tuesday")}
    assert markers[monday].task_id == first.id
    assert markers[monday].expires_in is not None and 590 < markers[monday].expires_in <= 600
    assert [m.task_id for m in queued_markers(app, match=f"{name}.report:*")] != []
    assert clear_queued_marker(app, monday) is True
    assert clear_queued_marker(app, monday) is False
    assert report.delay("monday").id != first.id  # published again
    assert report.delay("tuesday").id == other.id  # the other marker is untouched


