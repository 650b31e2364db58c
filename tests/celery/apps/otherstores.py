"""A locked task whose lock store is not the broker: a Redis Cluster given as
``dlock_redis_client`` (a dotted path), or a Sentinel master given as a ``sentinel://``
``dlock_redis_url`` - chosen by ``DLOCK_TEST_STORE`` before the module is imported."""

from __future__ import annotations

import os
from typing import Any

from redis.cluster import RedisCluster

from celery_dlock.celery import LockedTask
from tests.celery.apps.common import make_app


def cluster_client() -> RedisCluster:
    return RedisCluster(host="127.0.0.1", port=int(os.environ["DLOCK_TEST_CLUSTER_PORT"]))


_STORES: dict[str, dict[str, Any]] = {
    "cluster": {"dlock_redis_url": None, "dlock_redis_client": f"{__name__}:cluster_client"},
    "sentinel": {
        "dlock_redis_url": os.environ.get("DLOCK_TEST_SENTINEL_URL"),
        "dlock_redis_transport_options": {"master_name": "locks"},
    },
}

STORE = os.environ.get("DLOCK_TEST_STORE", "cluster")
app = make_app(f"store-{STORE}", **_STORES[STORE])


@app.task(base=LockedTask, bind=True, lock_key=["n"], name="otherstores.fenced", shared=False)
def fenced(self: Any, n: int) -> dict[str, Any]:
    assert self.lock is not None and self.lock.is_locked_by_me()
    return {"fence": self.lock.fence, "key": self.lock.key, "pid": os.getpid()}
