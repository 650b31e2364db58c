"""Real ``celery beat`` / ``celery worker`` subprocesses of :mod:`tests.beat.app`, and their logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[2]
SCHEDULER = "celery_dlock.beat:LockedScheduler"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def count(self, needle: str) -> int:
        return self.text().count(needle)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for(self, needle: str, timeout: float, occurrences: int = 1) -> float:
        """Block until ``needle`` appears ``occurrences`` times in the log; the time.time() it was seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(needle) >= occurrences:
                return time.time()
            if not self.alive():
                raise AssertionError(
                    f"{self.name} exited ({self.popen.returncode}) waiting for {needle!r}:\n"
                    f"{self.text()[-3000:]}"
                )
            time.sleep(0.02)
        raise AssertionError(f"{self.name}: no {needle!r} within {timeout} s:\n{self.text()[-3000:]}")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM by PID, SIGKILL if it does not exit in time; the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.popen.wait(5)


@dataclass
class BeatCluster:
    """Processes sharing one Redis, a per-run key prefix and queue; cleaned up by ``close``."""

    redis_url: str
    workdir: Path
    lease: float = 3.0
    lock_url: str = ""  # lock store when it is not the broker's server
    prefix: str = field(default_factory=lambda: f"dlock-beat-test-{uuid.uuid4().hex[:12]}:")
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.queue = f"{self.prefix}queue"
        self.client = redis.Redis.from_url(self.redis_url, socket_timeout=10)

    @property
    def lock_key(self) -> str:
        return f"{self.prefix}{{beat:dlock_beat_test}}"

    @property
    def executions_key(self) -> str:
        return f"{self.prefix}executions"

    def env(self, schedule: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DLOCK_TEST_REDIS_URL=self.redis_url,
            DLOCK_TEST_PREFIX=self.prefix,
            DLOCK_TEST_QUEUE=self.queue,
            DLOCK_TEST_LEASE=str(self.lease),
            DLOCK_TEST_LOCK_URL=self.lock_url,
            DLOCK_TEST_SCHEDULE=schedule,
            PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
            PYTHONUNBUFFERED="1",
        )
        return env

    def _spawn(self, name: str, args: list[str], schedule: str) -> Proc:
        log = self.workdir / f"{name}.log"
        out = log.open("ab")
        popen = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.beat.app", *args],
            cwd=ROOT,
            env=self.env(schedule),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def beat(self, name: str, schedule: str = "fast", schedule_file: str | None = None) -> Proc:
        db = self.workdir / (schedule_file or f"{name}-schedule")
        return self._spawn(name, ["beat", "-S", SCHEDULER, "--schedule", str(db), "-l", "info"], schedule)

    def worker(self, name: str = "worker") -> Proc:
        args = [
            "worker",
            "--pool=solo",
            "-Q",
            self.queue,
            "-l",
            "info",
            "-n",
            f"{name}-{uuid.uuid4().hex[:6]}@%h",
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
        ]
        proc = self._spawn(name, args, "fast")
        proc.wait_for("ready.", timeout=30)
        return proc

    def drain(self, timeout: float = 15.0) -> None:
        """Wait until the worker has taken every message off the queue (and ran the last one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.client.llen(self.queue):
            time.sleep(0.05)
        time.sleep(0.5)

    def executions(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.client.lrange(self.executions_key, 0, -1)]

    def close(self) -> None:
        for proc in self.procs:
            if proc.alive():
                proc.signal(signal.SIGKILL)
                proc.popen.wait(5)
        keys = list(self.client.scan_iter(match=f"{self.prefix}*", count=1000))
        if keys:
            self.client.delete(*keys)
        self.client.delete(self.queue)
        self.client.close()


def tick_seconds(label: str) -> int:
    """``2024-01-01T00:00:05Z`` -> Unix seconds."""
    return int(datetime.strptime(label, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())


def duplicates(executions: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    counts = Counter((e["entry"], e["tick"]) for e in executions)
    return {key: n for key, n in counts.items() if n > 1}
