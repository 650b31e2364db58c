"""The Celery app the beat tests run as real ``celery beat`` and ``celery worker`` processes.

Configured from the environment so every test run gets its own Redis keys and queue:
``DLOCK_TEST_REDIS_URL`` (broker, executions list, and lock store unless
``DLOCK_TEST_LOCK_URL`` names another server), ``DLOCK_TEST_PREFIX`` (``dlock_prefix``
and the executions list), ``DLOCK_TEST_QUEUE``, ``DLOCK_TEST_LEASE`` (``dlock_beat_lease``),
``DLOCK_TEST_SCHEDULE`` (``fast``: one entry every second; ``slow``: one entry every hour,
with beat's default 300 s loop interval), ``DLOCK_TEST_ALIGN`` (``1``: epoch-aligned
interval ticks). RedBeat keeps its schedule under the same prefix.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

REDIS_URL = os.environ.get("DLOCK_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
LOCK_URL = os.environ.get("DLOCK_TEST_LOCK_URL") or REDIS_URL
PREFIX = os.environ.get("DLOCK_TEST_PREFIX", "dlock-beat-test:")
QUEUE = os.environ.get("DLOCK_TEST_QUEUE", "dlock-beat-test")
LEASE = float(os.environ.get("DLOCK_TEST_LEASE", "3"))
SCHEDULE = os.environ.get("DLOCK_TEST_SCHEDULE", "fast")
EXECUTIONS = f"{PREFIX}executions"

SCHEDULES: dict[str, dict[str, Any]] = {
    "fast": {"every-second": {"task": "tests.beat.record", "schedule": 1.0, "args": ("every-second",)}},
    "slow": {"hourly": {"task": "tests.beat.record", "schedule": 3600.0, "args": ("hourly",)}},
}

app = Celery("dlock_beat_test", broker=REDIS_URL)
app.conf.update(
    task_default_queue=QUEUE,
    dlock_redis_url=LOCK_URL,
    dlock_prefix=PREFIX,
    dlock_beat_lease=LEASE,
    dlock_beat_align_intervals=os.environ.get("DLOCK_TEST_ALIGN") == "1",
    redbeat_redis_url=REDIS_URL,
    redbeat_key_prefix=f"{PREFIX}redbeat",
    beat_schedule=SCHEDULES[SCHEDULE],
    beat_max_loop_interval=300,
    timezone="UTC",
    enable_utc=True,
    broker_connection_retry_on_startup=True,
    worker_enable_remote_control=False,
    beat_enable_remote_control=False,
    worker_hijack_root_logger=True,
)

_client: redis.Redis | None = None


@app.task(name="tests.beat.record", bind=True)
def record(self: Any, entry: str) -> None:
    """Append (entry, scheduled tick, leader fence) of this run to the executions list."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(REDIS_URL)
    _client.rpush(
        EXECUTIONS,
        json.dumps(
            {
                "entry": entry,
                "tick": getattr(self.request, "dlock_beat_tick", None),
                "fence": getattr(self.request, "dlock_beat_fence", None),
                "ran_at": time.time(),
            }
        ),
    )
