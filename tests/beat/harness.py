"""Real ``celery beat`` / ``celery worker`` subprocesses of :mod:`tests.beat.app`, and their logs."""

from __future__ import annotations

import itertools
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

    def env(self, schedule: str, align: bool = False) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DLOCK_TEST_REDIS_URL=self.redis_url,
            DLOCK_TEST_PREFIX=self.prefix,
            DLOCK_TEST_QUEUE=self.queue,
            DLOCK_TEST_LEASE=str(self.lease),
            DLOCK_TEST_LOCK_URL=self.lock_url,
            DLOCK_TEST_SCHEDULE=schedule,
            DLOCK_TEST_ALIGN="1" if align else "0",
            DLOCK_TEST_DJANGO_DB=str(self.workdir / "django-beat.sqlite3"),
            PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
            PYTHONUNBUFFERED="1",
        )
        return env

    def _spawn(
        self, name: str, args: list[str], schedule: str, align: bool = False, app: str = "tests.beat.app"
    ) -> Proc:
        log = self.workdir / f"{name}.log"
        out = log.open("ab")
        popen = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", app, *args],
            cwd=ROOT,
            env=self.env(schedule, align),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def beat(
        self,
        name: str,
        schedule: str = "fast",
        schedule_file: str | None = None,
        align: bool = False,
        scheduler: str = SCHEDULER,
    ) -> Proc:
        """A ``celery beat`` process; ``scheduler`` may be any of celery_dlock.beat's schedulers."""
        db = self.workdir / (schedule_file or f"{name}-schedule")
        app = "tests.beat.django_app" if "Database" in scheduler else "tests.beat.app"
        args = ["beat", "-S", scheduler, "--schedule", str(db), "-l", "info"]
        return self._spawn(name, args, schedule, align, app)

    def migrate_django(self) -> None:
        """Create django-celery-beat's tables in this cluster's SQLite database."""
        subprocess.run(
            [sys.executable, "-m", "django", "migrate", "-v", "0", "--settings=tests.beat.django_settings"],
            cwd=ROOT,
            env=self.env("fast"),
            check=True,
            timeout=120,
        )

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
    """``2024-01-01T00:00:05Z`` (or with a fraction) -> whole Unix seconds."""
    return int(tick_time(label))


def tick_time(label: str) -> float:
    """``2024-01-01T00:00:05.250000Z`` -> Unix time."""
    return datetime.fromisoformat(label.replace("Z", "+00:00")).astimezone(timezone.utc).timestamp()


def run_gaps(executions: list[dict[str, Any]], entry: str) -> list[float]:
    """Seconds between consecutive runs of ``entry``, by the run times the leaders claimed."""
    times = sorted(tick_time(e["tick"]) for e in executions if e["entry"] == entry)
    return [b - a for a, b in itertools.pairwise(times)]


def duplicates(executions: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    counts = Counter((e["entry"], e["tick"]) for e in executions)
    return {key: n for key, n in counts.items() if n > 1}
