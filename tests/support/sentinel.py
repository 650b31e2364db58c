"""A Redis Sentinel (``redis-server --sentinel``) watching one master, on a free port."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import redis

from celery_dlock.embedded import find_redis_server, free_port


class SentinelServer:
    def __init__(self, master_port: int, master_name: str = "mymaster") -> None:
        self.master_port = master_port
        self.master_name = master_name
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="celery-dlock-sentinel-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.port}"

    def start(self) -> SentinelServer:
        config = self._dir / "sentinel.conf"
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self._dir}\n"
            f"sentinel monitor {self.master_name} 127.0.0.1 {self.master_port} 1\n"
        )
        binary = find_redis_server()
        assert binary is not None
        self.process = subprocess.Popen(
            [binary, str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        client = redis.Redis(port=self.port, socket_timeout=0.5)
        while time.monotonic() < deadline:
            try:
                if client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name):
                    return self
            except redis.RedisError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sentinel on port {self.port} did not come up")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)

    def __enter__(self) -> SentinelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
