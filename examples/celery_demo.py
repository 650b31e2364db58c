"""End-to-end demo of examples/celery_app: real Celery workers, duplicates skipped, same-key runs serialized.

    python -m examples.celery_demo

Uses ``REDIS_URL`` when set (an error if no Redis answers there); unset, localhost:6379
if a Redis answers there, else an embedded ``redis-server`` it starts.
Starts two prefork workers (2 processes each) on a
private queue, sends duplicate and concurrent calls, prints what happened, and
exits non-zero if anything did not behave as promised. Leaves nothing behind.
Set ``DEMO_WORKER_LOGLEVEL=INFO`` to see the workers' log lines (skips are
logged at INFO with the holder's task id).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

from celery_dlock.embedded import ensure_redis_url

RUN_ID = uuid.uuid4().hex[:8]
LOG_LEVEL = os.environ.get("DEMO_WORKER_LOGLEVEL", "CRITICAL")
problems: list[str] = []


def expect(condition: bool, message: str) -> None:
    print(f"   {'ok ' if condition else 'FAIL'} {message}")
    if not condition:
        problems.append(message)


def start_workers(env: dict[str, str], count: int = 2) -> list[subprocess.Popen[bytes]]:
    workers = []
    for index in range(count):
        command = [
            sys.executable, "-W", "ignore::UserWarning", "-m", "celery", "--quiet",
            "-A", "examples.celery_app", "worker",
            "--pool", "prefork", "--concurrency", "2", "-Q", env["DEMO_QUEUE"],
            "-n", f"demo{index}-{RUN_ID}@%h", "--loglevel", LOG_LEVEL,
            "--without-mingle", "--without-gossip", "--without-heartbeat",
        ]  # fmt: skip
        workers.append(subprocess.Popen(command, env=env))
    return workers


def wait_for_workers(app: Any, count: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=1.0) or []
        mine = [r for r in replies if any(RUN_ID in name for name in r)]
        if len(mine) >= count:
            return
    raise RuntimeError("workers did not come up")


def outcome(result: Any) -> str:
    try:
        result.get(timeout=60)
        return "SUCCESS"
    except Exception as exc:
        return type(exc).__name__


def runs(client: Any, key: str, task: str) -> list[dict[str, Any]]:
    all_runs = [json.loads(raw) for raw in client.lrange(key, 0, -1)]
    return sorted((r for r in all_runs if r["task"] == task), key=lambda r: r["start"])


def overlapping(intervals: list[dict[str, Any]]) -> int:
    return sum(1 for a, b in itertools.pairwise(intervals) if a["end"] > b["start"])


def main() -> int:
    url = ensure_redis_url()
    env = dict(
        os.environ,
        REDIS_URL=url,
        DEMO_QUEUE=f"celery-dlock-demo-{RUN_ID}",
        DLOCK_PREFIX=f"dlock-demo-{RUN_ID}:",
        DEMO_RUNS_KEY=f"celery-dlock-demo-{RUN_ID}:runs",
    )
    os.environ.update(env)  # before the app is imported: it reads them at import time
    import redis

    from examples.celery_app import app
    from examples.celery_app.tasks import build_daily_report, charge_order, import_feed, sync_inventory

    client = redis.Redis.from_url(url)
    print(f"Redis at {url}; starting 2 prefork workers (2 processes each) on {env['DEMO_QUEUE']}")
    workers = start_workers(env)
    try:
        wait_for_workers(app, len(workers))

        print("\n== 1. the same report requested 5 times at once (on_contention='skip')")
        results = [build_daily_report.delay("2026-11-28") for _ in range(5)]
        outcomes = [outcome(r) for r in results]
        print(f"   outcomes: {outcomes}")
        report_runs = runs(client, env["DEMO_RUNS_KEY"], "build_daily_report")
        expect(len(report_runs) == 1, f"ran exactly once ({len(report_runs)} run)")
        expect(outcomes.count("TaskSkipped") == 4, "the 4 duplicates are visibly TaskSkipped, not SUCCESS")

        print("\n== 2. 4 charges of order 42 and 2 of order 7 at once (lock_key=['order_id'], 'wait')")
        charges = [charge_order.delay(42, 100 * i) for i in range(4)] + [
            charge_order.delay(7, 5) for _ in range(2)
        ]
        print(f"   outcomes: {[outcome(r) for r in charges]}")
        order_42 = [r for r in runs(client, env["DEMO_RUNS_KEY"], "charge_order") if r["args"][0] == 42]
        order_7 = [r for r in runs(client, env["DEMO_RUNS_KEY"], "charge_order") if r["args"][0] == 7]
        for run in order_42:
            print(
                f"   order 42: {run['start'] % 100:7.3f} -> {run['end'] % 100:7.3f}"
                f"  fence {run['fence']}  pid {run['pid']}"
            )
        expect(
            len(order_42) == 4 and overlapping(order_42) == 0,
            "all 4 charges of order 42 ran, never overlapping",
        )
        fences = [r["fence"] for r in order_42]
        expect(fences == sorted(fences), f"their fencing tokens increase: {fences}")
        expect(len(order_7) == 2, "order 7 was charged twice too (its own lock)")

        print("\n== 3. 3 inventory syncs at once (lock_key='task', Retry(backoff=0.5))")
        syncs = [sync_inventory.delay(w) for w in ("north", "south", "east")]
        print(f"   outcomes: {[outcome(r) for r in syncs]}")
        sync_runs = runs(client, env["DEMO_RUNS_KEY"], "sync_inventory")
        expect(
            len(sync_runs) == 3 and overlapping(sync_runs) == 0,
            "all 3 ran, one at a time (re-queued while locked)",
        )

        print("\n== 4. the same feed imported twice at once (lock_key='feed:{feed_url}', 'fail')")
        imports = [import_feed.delay("https://example.com/feed.xml") for _ in range(2)]
        import_outcomes = sorted(outcome(r) for r in imports)
        print(f"   outcomes: {import_outcomes}")
        expect(
            import_outcomes == ["LockNotAcquired", "SUCCESS"],
            "one import ran, the other failed with LockNotAcquired",
        )
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
        for key in client.scan_iter(f"*{RUN_ID}*"):
            client.delete(key)

    print(f"\n{'All good.' if not problems else 'PROBLEMS: ' + '; '.join(problems)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
