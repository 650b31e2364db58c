"""The lock store is never silently wrong: it is the broker's Redis server (however the
broker URL is given), the one the dlock_* settings name, or an error naming them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_dlock import DistributedLock
from celery_dlock.celery import LockedTask
from celery_dlock.celery.config import LockStoreNotConfigured, redis_client_for_app
from celery_dlock.embedded import RedisServer
from tests.support.cluster import LocalCluster
from tests.support.sentinel import SentinelServer


def takes_a_lock_on(app: Celery) -> str:
    """Take and keep a lock through the app's lock store; its key."""
    lock = DistributedLock(redis_client_for_app(app), f"store-{uuid.uuid4().hex}", timeout=30)
    assert lock.acquire(blocking=False)
    return lock.keys.lock


def test_the_broker_url_from_the_environment_is_the_lock_store(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", own_redis.url)
    app = Celery(f"env-{uuid.uuid4().hex}")
    key = takes_a_lock_on(app)
    assert redis.Redis(port=own_redis.port).exists(key)


def test_a_redis_socket_broker_shares_its_server(tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    with RedisServer(extra_args=["--unixsocket", str(socket_path), "--unixsocketperm", "700"]) as server:
        app = Celery(f"socket-{uuid.uuid4().hex}", broker=f"redis+socket://{socket_path}?virtual_host=3")
        key = takes_a_lock_on(app)
        assert redis.Redis(port=server.port, db=3).exists(key)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["broker_url", "dlock_redis_url"])
def test_a_sentinel_url_reaches_the_master(own_redis: RedisServer, setting: str) -> None:
    with SentinelServer(own_redis.port, master_name="locks") as sentinel:
        if setting == "broker_url":
            app = Celery(f"sentinel-{uuid.uuid4().hex}", broker=sentinel.url)
            app.conf.broker_transport_options = {"master_name": "locks"}
        else:
            app = Celery(f"sentinel-{uuid.uuid4().hex}", broker="memory://")
            app.conf.dlock_redis_url = sentinel.url
            app.conf.dlock_redis_transport_options = {"master_name": "locks"}
        key = takes_a_lock_on(app)
        assert redis.Redis(port=own_redis.port).exists(key)


def test_a_sentinel_url_without_a_master_name_names_the_setting() -> None:
    app = Celery(f"sentinel-{uuid.uuid4().hex}", broker="sentinel://127.0.0.1:1")
    with pytest.raises(LockStoreNotConfigured, match="master_name.*broker_transport_options"):
        redis_client_for_app(app)


@pytest.mark.parametrize("broker", ["amqp://guest:guest@127.0.0.1:5672//", "memory://", "sqs://", None])
def test_any_other_broker_without_a_lock_store_is_an_error_naming_dlock_redis_url(
    broker: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")  # not a Celery setting: never used
    app = Celery(f"other-{uuid.uuid4().hex}", broker=broker)
    with pytest.raises(LockStoreNotConfigured, match="dlock_redis_url"):
        redis_client_for_app(app)

    @app.task(base=LockedTask, name=f"job-{uuid.uuid4().hex}")
    def job() -> None: ...

    with pytest.raises(LockStoreNotConfigured, match="dlock_redis_url"):
        job.apply_async()  # the first publish of a locked task says so too


def test_a_worker_without_a_lock_store_fails_at_start_naming_dlock_redis_url(tmp_path: Path) -> None:
    (tmp_path / "nostore.py").write_text(
        "from celery import Celery\n"
        "from celery_dlock.celery import LockedTask\n"
        "app = Celery('nostore', broker='memory://')\n"
        "@app.task(base=LockedTask)\n"
        "def job(): ...\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.getcwd()}"}
    env.pop("CELERY_BROKER_URL", None)
    worker = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "nostore", "worker", "--pool", "solo", "-l", "WARNING"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode != 0
    assert "dlock_redis_url" in worker.stdout + worker.stderr


def test_a_client_factory_setting_is_used_by_dotted_path_or_callable(own_redis: RedisServer) -> None:
    made: list[Any] = []

    def factory() -> redis.Redis:
        client = redis.Redis(port=own_redis.port)
        made.append(client)
        return client

    app = Celery(f"factory-{uuid.uuid4().hex}", broker="memory://")
    app.conf.dlock_redis_client = factory
    assert redis_client_for_app(app) is made[0] is redis_client_for_app(app)  # one per process
    app.conf.dlock_redis_client = "tests.celery.test_lock_store:not_a_factory_at_all"
    with pytest.raises(LockStoreNotConfigured, match="dlock_redis_client"):
        redis_client_for_app(app)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    nodes = LocalCluster().start()
    yield nodes
    nodes.stop()


@pytest.mark.slow
def test_a_cluster_client_from_the_factory_runs_locked_tasks(cluster: LocalCluster, name: str) -> None:
    from redis.cluster import RedisCluster

    app = Celery(f"cluster-{name}", broker="memory://", backend="cache+memory://")
    app.conf.dlock_redis_client = lambda: RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)

    @app.task(base=LockedTask, bind=True, name=f"cluster.job-{name}", lock_key=["n"])
    def job(self: Any, n: int) -> int:
        assert self.lock is not None and self.lock.is_locked_by_me()
        return int(self.lock.fence)

    assert job.apply(args=(1,)).get() >= 1


@pytest.mark.slow
@pytest.mark.parametrize("store", ["cluster", "sentinel"])
def test_workers_and_publishers_use_a_cluster_or_sentinel_store(
    store: str, celery_env: dict[str, str], own_redis: RedisServer, cluster: LocalCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    from tests.celery.conftest import start_worker

    with SentinelServer(own_redis.port, master_name="locks") as sentinel:
        monkeypatch.setenv("DLOCK_TEST_STORE", store)
        monkeypatch.setenv("DLOCK_TEST_CLUSTER_PORT", str(cluster.nodes[0].port))
        monkeypatch.setenv("DLOCK_TEST_SENTINEL_URL", sentinel.url)
        sys.modules.pop("tests.celery.apps.otherstores", None)
        module = importlib.import_module("tests.celery.apps.otherstores")
        worker = start_worker(module, concurrency=1)
        try:
            results = [module.fenced.delay(n).get(timeout=60) for n in (1, 1, 2)]
        finally:
            worker.stop()
            sys.modules.pop("tests.celery.apps.otherstores", None)
        assert results[1]["fence"] > results[0]["fence"]  # the same key, one store
        prefix = module.app.conf.dlock_prefix
        fence_key = f"{prefix}{{{results[0]['key']}}}:fence"
        if store == "cluster":
            from redis.cluster import RedisCluster

            where = RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
        else:
            where = redis.Redis(port=own_redis.port)  # the master the Sentinel names
        assert int(where.get(fence_key)) == results[1]["fence"]


class SettingsModule:
    dlock_redis_url = "redis://127.0.0.1:1/0"


def test_a_setting_changed_after_first_use_chooses_the_store_from_then_on(
    own_redis: RedisServer, redis_url: str
) -> None:
    """The client is remembered per app, never past a change of the settings that chose it."""
    app = Celery(f"changed-{uuid.uuid4().hex}", broker="memory://")
    app.config_from_object(SettingsModule)
    first = redis_client_for_app(app)
    assert first.connection_pool.connection_kwargs["port"] == 1
    assert redis_client_for_app(app) is first
    app.conf.dlock_redis_url = own_redis.url
    second = redis_client_for_app(app)
    assert second.connection_pool.connection_kwargs["port"] == own_redis.port
    assert redis_client_for_app(app) is second
    app.conf.dlock_redis_url = "memcached://nope"
    with pytest.raises(ValueError, match="dlock_redis_url"):
        redis_client_for_app(app)
    del app.conf["dlock_redis_url"]  # the config module's value again
    assert redis_client_for_app(app) is first
