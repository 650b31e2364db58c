"""What CI promises: with CI=true, the RabbitMQ-broker tests fail when there is no RabbitMQ
(instead of skipping); elsewhere they skip, saying why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from celery_dlock.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("ci", [True, False], ids=["ci", "local"])
def test_a_missing_rabbitmq_fails_in_ci_and_skips_elsewhere(ci: bool) -> None:
    env = {**os.environ, "DLOCK_TEST_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}//"}
    env.pop("CI", None)
    if ci:
        env["CI"] = "true"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/celery/test_rabbitmq.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    if ci:
        assert run.returncode != 0 and "RabbitMQ is not listening" in run.stdout, run.stdout[-2000:]
    else:
        assert run.returncode == 0 and "skipped" in run.stdout, run.stdout[-2000:]
