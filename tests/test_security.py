"""Passwords, a Redis ACL user limited to the lock prefix, and TLS (issue #4)."""

from __future__ import annotations

import inspect
import pathlib
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from celery_dlock import DistributedLock, LockError
from celery_dlock.embedded import RedisServer, free_port

pytestmark = pytest.mark.slow

# What a lock client needs: the scripts (and every command they call inside), the
# inbox channels, EXISTS for is_locked_by_anyone, HMGET for fenced_get.
LOCK_USER_RULES = [
    "on", ">locker-password",
    "~dlock:*", "resetchannels", "&dlock:*",
    "+ping", "+hello", "+exists",
    "+evalsha", "+eval", "+script|load",
    "+set", "+get", "+del", "+incr", "+pttl", "+pexpire", "+publish", "+time",
    "+zadd", "+zrem", "+zpopmin", "+zscore", "+zrange",
    "+subscribe", "+unsubscribe",
]  # fmt: skip


@pytest.fixture(scope="module")
def secured_redis() -> Iterator[RedisServer]:
    server = RedisServer(
        extra_args=["--requirepass", "admin-password"],
        probe_url="redis://:admin-password@127.0.0.1:{port}/0",
    )
    server.start()
    admin = redis.Redis(port=server.port, password="admin-password")
    admin.execute_command("ACL", "SETUSER", "locker", *LOCK_USER_RULES)
    yield server
    server.stop()


def test_password_protected_server(secured_redis: RedisServer) -> None:
    client = redis.Redis(port=secured_redis.port, password="admin-password")
    with DistributedLock(client, "with-password") as lock:
        assert lock.is_locked_by_me()
    wrong = redis.Redis(port=secured_redis.port, password="wrong")
    with pytest.raises(LockError, match="refused the credentials|WRONGPASS|invalid"):
        DistributedLock(wrong, "with-password").acquire()


def test_acl_user_limited_to_the_lock_prefix(secured_redis: RedisServer) -> None:
    client = redis.Redis(port=secured_redis.port, username="locker", password="locker-password")
    holder = DistributedLock(client, "acl", timeout=5, auto_renewal=True)
    waiter = DistributedLock(client, "acl", timeout=5, blocking_timeout=5)
    assert holder.acquire()
    assert holder.extend(5)
    assert holder.is_locked_by_anyone() and holder.is_locked_by_me()
    import threading

    threading.Timer(0.3, holder.release).start()
    assert waiter.acquire()  # the inbox channel is allowed too
    assert waiter.release()
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.get("not-a-lock-key")  # the user really is confined
    outside = DistributedLock(client, "acl", prefix="other:")
    with pytest.raises(LockError, match="NOPERM|No permissions|no permissions"):
        outside.acquire()


def test_client_without_the_token_cannot_release_or_extend(secured_redis: RedisServer) -> None:
    client = redis.Redis(port=secured_redis.port, username="locker", password="locker-password")
    holder = DistributedLock(client, "token-only")
    holder.acquire()
    intruder = DistributedLock(client, "token-only")
    intruder._token = "0" * 32  # a guessed token
    assert intruder.release() is False
    assert intruder.extend(100) is False
    assert client.pttl(holder.keys.lock) <= 30_000
    assert holder.is_locked_by_me()
    holder.release()


def test_a_release_whose_wake_up_is_refused_leaves_a_consistent_lock_and_names_the_permission(
    secured_redis: RedisServer, name: str
) -> None:
    admin = redis.Redis(port=secured_redis.port, password="admin-password")
    no_channels = [rule for rule in LOCK_USER_RULES if rule != "&dlock:*"]
    admin.execute_command("ACL", "SETUSER", "no-channels", "reset", *no_channels)
    client = redis.Redis(port=secured_redis.port, username="no-channels", password="locker-password")
    holder = DistributedLock(client, name, timeout=30)
    assert holder.acquire()
    waiter = DistributedLock(client, name, timeout=30, retry_delay=0.2, blocking_timeout=10)
    got: list[bool] = []
    import threading

    thread = threading.Thread(target=lambda: got.append(waiter.acquire()))
    thread.start()
    deadline = time.monotonic() + 5
    while admin.zcard(holder.keys.waiters) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(LockError, match=r"PUBLISH.*&dlock:\*") as caught:
        holder.release()
    assert "publish to the channel" in str(caught.value)  # the server's own words
    # Released and handed over all the same: the object holds nothing any more.
    assert holder.token is None and not holder.lost
    assert holder.release() is False
    thread.join(10)
    assert got == [True]  # the waiter found its lock on its next timed attempt
    assert waiter.release()


def _make_certs(directory: pathlib.Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(args, cwd=directory, check=True, capture_output=True)

    run(
        "openssl",
        "req",
        "-x509",
        "-new",
        "-nodes",
        "-newkey",
        "rsa:2048",
        "-days",
        "2",
        "-subj",
        "/CN=celery-dlock test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    for name in ("server", "client"):
        run(
            "openssl",
            "req",
            "-new",
            "-nodes",
            "-newkey",
            "rsa:2048",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
        )
        (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", f"{name}.crt")  # fmt: skip


def test_tls(tmp_path: pathlib.Path) -> None:
    try:
        _make_certs(tmp_path)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl cannot make test certificates here: {exc}")
    port = free_port()
    url = (
        f"rediss://127.0.0.1:{{port}}/0?ssl_ca_certs={tmp_path}/ca.crt"
        f"&ssl_certfile={tmp_path}/client.crt&ssl_keyfile={tmp_path}/client.key"
    )
    server = RedisServer(
        port=port,
        extra_args=[
            "--port", "0", "--tls-port", str(port),
            "--tls-cert-file", str(tmp_path / "server.crt"), "--tls-key-file", str(tmp_path / "server.key"),
            "--tls-ca-cert-file", str(tmp_path / "ca.crt"), "--tls-auth-clients", "yes",
        ],
        probe_url=url,
    )  # fmt: skip
    try:
        server.start(timeout=5)
    except RuntimeError as exc:
        pytest.skip(f"this redis-server has no TLS support: {exc}")
    try:
        client = redis.Redis.from_url(url.format(port=port))
        holder = DistributedLock(client, "tls", timeout=2, auto_renewal=True)
        assert holder.acquire()
        import threading

        waiter = DistributedLock(client, "tls", blocking_timeout=5)
        threading.Timer(0.3, holder.release).start()
        assert waiter.acquire()
        assert waiter.release()
        plain = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
        with pytest.raises(LockError):
            DistributedLock(plain, "tls").acquire()  # no TLS: refused
    finally:
        server.stop()


def test_no_pickle_anywhere_in_the_package() -> None:
    import celery_dlock

    root = pathlib.Path(inspect.getfile(celery_dlock)).parent
    offenders = [
        p for p in root.rglob("*.py") if "import pickle" in p.read_text() or "pickle." in p.read_text()
    ]
    assert offenders == []
