"""Real Celery workers in subprocesses, on the real redis-server of tests/conftest.py.

``celery_env`` (session) exports the settings the app modules in
``tests/celery/apps`` read at import time: broker, result backend and lock
store URLs, and a run id that makes queue names, lock prefixes and record lists
unique per session (so parallel or repeated runs never collide; nothing is
ever flushed). Test modules import their app through :func:`load_app` after
that, and start workers with :func:`start_worker`; every worker is stopped by
PID, and its log is attached to the report of any test that fails while it runs.
"""

from __future__ import annotations

import importlib
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOG_DIR_ENV = "DLOCK_TEST_LOG_DIR"
_live_workers: list[WorkerProcess] = []


class WorkerProcess:
    """``celery -A tests.celery.apps.<module> worker`` in a subprocess, with its log in a file."""

    _counter = itertools.count(1)

    def __init__(
        self,
        app_module: str,
        queue: str,
        log_dir: Path,
        pool: str = "prefork",
        concurrency: int = 2,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.app_module = app_module
        self.queue = queue
        self.nodename = f"{app_module}-{next(self._counter)}-{uuid.uuid4().hex[:6]}@%h"
        self.log_path = log_dir / f"{self.nodename.split('@')[0]}.log"
        self.args = [
            sys.executable, "-m", "celery", "-A", f"tests.celery.apps.{app_module}", "worker",
            f"--pool={pool}", "-c", str(concurrency), "-l", "info", "-Q", queue, "-n", self.nodename,
            "--without-gossip", "--without-mingle", "--without-heartbeat", *extra_args,
        ]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env,
                start_new_session=True,  # its own process group: we can always clean up its children
            )
        _live_workers.append(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log():
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        log = self.log()
        self.stop()
        raise RuntimeError(f"worker {self.nodename} did not become ready; log:\n{log[-5000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL the worker's main process only (its pool children die with it: pdeathsig)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # leftovers of our own process group, if any
        except (ProcessLookupError, PermissionError):
            pass
        if process.poll() is None:
            process.wait(5)
        if self in _live_workers:
            _live_workers.remove(self)


@pytest.fixture(scope="session")
def celery_env(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    run = f"dlock-test-{uuid.uuid4().hex[:10]}"
    env = {
        "DLOCK_TEST_RUN": run,
        "DLOCK_TEST_BROKER": redis_url,
        "DLOCK_TEST_BACKEND": redis_url,
        "DLOCK_TEST_LOCK_URL": redis_url,
        LOG_DIR_ENV: str(tmp_path_factory.mktemp("celery-workers")),
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    yield env
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def tag() -> str:
    """A fresh id that keeps one test's records, gates and lock keys apart from every other's."""
    return uuid.uuid4().hex


def load_app(module: str) -> ModuleType:
    """Import ``tests.celery.apps.<module>`` (after ``celery_env`` exported its settings)."""
    assert "DLOCK_TEST_RUN" in os.environ, "use the celery_env fixture before loading an app"
    loaded = importlib.import_module(f"tests.celery.apps.{module}")
    assert loaded.app.conf.dlock_prefix.startswith(os.environ["DLOCK_TEST_RUN"]), (
        f"{module} was imported before celery_env exported the test settings"
    )
    return loaded


def start_worker(module: ModuleType, **options: Any) -> WorkerProcess:
    app_module = module.__name__.rsplit(".", 1)[1]
    worker = WorkerProcess(
        app_module, module.app.conf.task_default_queue, Path(os.environ[LOG_DIR_ENV]), **options
    )
    return worker.start()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for worker in list(_live_workers):
            report.sections.append((f"worker {worker.nodename} log (tail)", worker.log()[-8000:]))
