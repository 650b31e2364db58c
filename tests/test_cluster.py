"""The lock on a real three-primary Redis Cluster (sync and asyncio clients)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from redis.cluster import RedisCluster

from celery_dlock import DistributedLock
from tests.support.cluster import LocalCluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    nodes = LocalCluster().start()
    yield nodes
    nodes.stop()


def test_sync_lock_on_cluster(cluster: LocalCluster) -> None:
    client = RedisCluster(host="127.0.0.1", port=cluster.startup_port)
    names = [f"cluster-lock-{i}" for i in range(12)]  # spread over the three primaries
    locks = [DistributedLock(client, n, timeout=0.6, auto_renewal=True) for n in names]
    fences = []
    for lock in locks:
        assert lock.acquire(blocking=False)
        fences.append(lock.fence)
    time.sleep(1.5)  # renewal across nodes (one pipeline per node)
    assert all(lock.is_locked_by_me() and not lock.lost for lock in locks)
    rival = DistributedLock(client, names[0], blocking_timeout=10, retry_delay=20)
    threading.Timer(0.3, locks[0].release).start()
    started = time.monotonic()
    assert rival.acquire()  # woken by the release published through the cluster
    assert time.monotonic() - started < 5
    assert rival.fence is not None and fences[0] is not None and rival.fence > fences[0]
    assert rival.release()
    for lock in locks[1:]:
        assert lock.release()
    client.close()


def test_asyncio_lock_on_cluster(cluster: LocalCluster) -> None:
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    from celery_dlock.asyncio import DistributedLock as AsyncLock

    async def body() -> None:
        client = AsyncRedisCluster(host="127.0.0.1", port=cluster.startup_port)
        locks = [AsyncLock(client, f"acluster-{i}", timeout=0.6, auto_renewal=True) for i in range(9)]
        for lock in locks:
            assert await lock.acquire(blocking=False)
        await asyncio.sleep(1.5)
        assert all([await lock.is_locked_by_me() for lock in locks])
        for lock in locks:
            assert await lock.release()
        await client.aclose()

    asyncio.run(body())
