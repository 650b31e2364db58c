"""P4 (Celery end to end) and P5 (dedup), with a real worker subprocess.

The worker is ``celery -A dlbench.celery_app worker -P prefork -c 2`` on the private
Redis (broker and lock store). P4 publishes N trivial tasks with distinct arguments
per variant and times first publish -> last task done (every body INCRs a counter,
the same for all variants). P5 sends each of C distinct calls K times concurrently
(K threads) to a task with a slow body and counts the bodies that ran.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import server
from .stats import median

BENCH_DIR = Path(__file__).resolve().parent.parent


class Worker:
    def __init__(self, url: str, prefix: str, slow: float) -> None:
        self.env = {
            **os.environ,
            "DLBENCH_REDIS_URL": url,
            "DLBENCH_PREFIX": prefix,
            "DLBENCH_SLOW": str(slow),
            "PYTHONPATH": os.pathsep.join([str(BENCH_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            ),
        }
        fd, self.log_path = tempfile.mkstemp(prefix="dlbench-worker-", suffix=".log")
        os.close(fd)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "celery", "-A", "dlbench.celery_app", "worker",
            "-P", "prefork", "-c", "2", "-Q", "dlbench",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-l", "WARNING", "-n", f"dlbench{os.getpid()}@localhost",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=BENCH_DIR, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own worker's process group
                self.proc.wait(5)


def _tree_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process and all its descendants (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, stack, seen = 0.0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError, IndexError):
            continue
    return total


def _load_app(url: str, prefix: str, slow: float) -> Any:
    os.environ["DLBENCH_REDIS_URL"] = url
    os.environ["DLBENCH_PREFIX"] = prefix
    os.environ["DLBENCH_SLOW"] = str(slow)
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    module = importlib.import_module("dlbench.celery_app")
    if url != module.URL:  # imported earlier with another server: reload
        module = importlib.reload(module)
    return module


def _value(r: Any, key: str) -> int:
    return int(r.get(key) or 0)


def _wait_count(r: Any, key: str, target: int, timeout: float, worker: Worker) -> float:
    deadline = time.monotonic() + timeout
    while _value(r, key) < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key} stuck at {_value(r, key)} < {target}\n{worker.log_tail()}")
        if not worker.alive():
            raise RuntimeError(f"the Celery worker exited\n{worker.log_tail()}")
        time.sleep(0.002)
    return time.perf_counter()


def _wait_quiet(r: Any, mod: Any, task_name: str, timeout: float, worker: Worker) -> None:
    """Until the queue and the reserved set are empty and every started body has finished, for 0.6 s."""
    deadline = time.monotonic() + timeout
    quiet_since: float | None = None
    started, done = mod.counter(task_name, "started"), mod.counter(task_name, "done")
    while True:
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"P5 {task_name} did not finish\n{worker.log_tail()}")
        idle = (
            r.llen(mod.QUEUE) == 0 and r.hlen("unacked") == 0 and _value(r, started) == _value(r, done)
        )
        if idle:
            quiet_since = quiet_since or now
            if now - quiet_since >= 0.6:
                return
        else:
            quiet_since = None
        time.sleep(0.05)


def run(url: str, prefix: str, p4_tasks: int, p4_reps: int, p5_calls: int, p5_copies: int,
        slow: float) -> dict[str, Any]:
    mod = _load_app(url, prefix, slow)
    r = server.sync_client(url)
    worker = Worker(url, prefix, slow)
    p4: dict[str, Any] = {}
    p5: dict[str, Any] = {}
    try:
        worker.start()
        # Warm-up: every variant once (worker connects, children import, scripts load).
        for offset, task in enumerate(list(mod.P4_TASKS.values()) + list(mod.P5_TASKS.values())):
            key = mod.counter(task.name, "done")
            target = _value(r, key) + 2
            task.delay(-1 - 2 * offset)
            task.delay(-2 - 2 * offset)
            _wait_count(r, key, target, 60, worker)
        # P4
        rates: dict[str, list[float]] = {name: [] for name in mod.P4_TASKS}
        commands: dict[str, list[dict[str, int]]] = {name: [] for name in mod.P4_TASKS}
        worker_cpu: dict[str, list[float]] = {name: [] for name in mod.P4_TASKS}
        publisher_cpu: dict[str, list[float]] = {name: [] for name in mod.P4_TASKS}
        redis_cpu: dict[str, list[float]] = {name: [] for name in mod.P4_TASKS}
        redis_pid = int(r.info("server")["process_id"])  # the private server: a local process
        names = list(mod.P4_TASKS)
        for rep in range(p4_reps):
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                task = mod.P4_TASKS[name]
                key = mod.counter(task.name, "done")
                target = _value(r, key) + p4_tasks
                offset = (rep + 1) * 1_000_000
                before = server.commandstats(r)
                assert worker.proc is not None
                cpu0, pub0 = _tree_cpu_seconds(worker.proc.pid), time.process_time()
                redis0 = _tree_cpu_seconds(redis_pid)
                t0 = time.perf_counter()
                for k in range(p4_tasks):
                    task.delay(offset + k)
                publisher_cpu[name].append((time.process_time() - pub0) / p4_tasks)
                t1 = _wait_count(r, key, target, 300, worker)
                worker_cpu[name].append((_tree_cpu_seconds(worker.proc.pid) - cpu0) / p4_tasks)
                redis_cpu[name].append((_tree_cpu_seconds(redis_pid) - redis0) / p4_tasks)
                rates[name].append(p4_tasks / (t1 - t0))
                time.sleep(0.2)  # let the last tasks' releases land before counting commands
                commands[name].append(server.command_delta(before, server.commandstats(r)))
        plain = rates["plain Task"]
        for name in names:
            rate = median(rates[name])
            p4[name] = {
                "tasks_per_s": rate,
                "tasks_per_s_reps": [round(x, 1) for x in rates[name]],
                # Median of per-repetition ratios: the variants of one repetition ran back to back.
                "ratio_to_plain": median([x / y for x, y in zip(rates[name], plain, strict=False)]),
                "worker_cpu_ms_per_task": 1000 * (median(worker_cpu[name]) or 0.0),
                "publisher_cpu_ms_per_task": 1000 * (median(publisher_cpu[name]) or 0.0),
                "redis_cpu_ms_per_task": 1000 * (median(redis_cpu[name]) or 0.0),
                # Everything the machine spent per task: the throughput of a CPU-bound run
                # is the cores over this (median of per-repetition sums).
                "all_cpu_ms_per_task": 1000 * (median(
                    [w + p + s for w, p, s in zip(worker_cpu[name], publisher_cpu[name], redis_cpu[name],
                                                  strict=True)]
                ) or 0.0),
                # Broker traffic included (the same for every variant); the difference is the lock's.
                "redis_commands_per_task": median(
                    [sum(c.values()) / p4_tasks for c in commands[name]]
                ),
                "redis_commands_by_name_per_task": {
                    k: round(v / p4_tasks, 2) for k, v in sorted(commands[name][-1].items())
                },
            }
        # P5
        for name, task in mod.P5_TASKS.items():
            done_key = mod.counter(task.name, "done")
            base = _value(r, done_key)
            offset = 10_000_000
            sends = [offset + i for i in range(p5_calls) for _ in range(p5_copies)]

            def send(arg: int, task: Any = task) -> str | None:
                try:
                    result = task.delay(arg)
                except Exception as exc:  # e.g. a non-graceful "already queued"
                    return f"raised {type(exc).__name__}"
                task_id = getattr(result, "id", None)
                return None if task_id is None else str(task_id)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(p5_copies) as pool:
                ids = list(pool.map(send, sends))
            _wait_quiet(r, mod, task.name, 300, worker)
            p5[name] = {
                "executions": _value(r, done_key) - base,
                "expected": p5_calls,
                "sends": len(sends),
                "distinct_task_ids_returned": len({i for i in ids if i and not i.startswith("raised")}),
                "sends_returning_none": sum(i is None for i in ids),
                "sends_raising": sum(bool(i and i.startswith("raised")) for i in ids),
                "seconds": time.perf_counter() - t0,
            }
    finally:
        worker.stop()
        r.close()
    missing = dict(mod.MISSING)
    return {"p4": p4, "p5": p5, "missing": missing, "p5_body_seconds": slow}
