"""The Celery app: Redis as broker, result backend and lock store (``REDIS_URL``).

Run a worker:   celery -A examples.celery_app worker -l info
Run beat (any number of them; one publishes):
                celery -A examples.celery_app beat -l info
"""

from __future__ import annotations

import os

from celery import Celery

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")

app = Celery("celery_app", broker=REDIS_URL, backend=REDIS_URL, include=["examples.celery_app.tasks"])
app.conf.update(
    task_default_queue=os.environ.get("DEMO_QUEUE", "celery"),
    result_expires=3600,
    # celery-dlock settings (all optional): the lock store defaults to the broker when it is Redis.
    dlock_prefix=os.environ.get("DLOCK_PREFIX", "dlock:"),
    dlock_timeout=30,
    # Several beat processes may run; exactly one publishes, each tick once.
    beat_scheduler="celery_dlock.beat:LockedScheduler",
    dlock_beat_lease=15,
    beat_schedule={
        "refresh-exchange-rates": {
            "task": "examples.celery_app.tasks.refresh_exchange_rates",
            "schedule": 10.0,
        },
    },
)
