"""Run the benchmark phases P1..P6 on one private redis-server and write JSON, Markdown and PNG.

``python benchmarks/run.py`` bootstraps the benchmark venv and calls :func:`main`;
tests call :func:`run_suite` directly with a restricted set of libraries.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import p1, p2, p3, report, server
from .locks import ASYNC_LIBRARIES, SYNC_LIBRARIES, Library, availability
from .stats import median, percentile

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO = BENCH_DIR.parent
PHASES = ("P1", "P2", "P3", "P4", "P5", "P6")


@dataclass(frozen=True)
class Config:
    name: str
    p1_reps: int = 7
    p1_seconds: float = 1.0
    p1_census_pairs: int = 200
    p2_procs: tuple[int, ...] = (2, 4, 8)
    p2_reps: int = 3
    p2_seconds: float = 2.5
    p3_counts: tuple[int, ...] = (1, 100, 1000)
    # Measured window after a warm-up of one lease (3 s): 3 + 27 = 30 s held in all.
    p3_seconds: dict[int, float] = field(default_factory=lambda: {1: 27.0, 100: 27.0, 1000: 27.0})
    p3_warmup: float = 3.0
    p4_tasks: int = 1000
    p4_reps: int = 9
    p5_calls: int = 100
    p5_copies: int = 10
    p5_slow: float = 0.25
    p6_configs: tuple[tuple[int, int], ...] = ((1, 8), (4, 2))  # (processes, coroutines each)


FULL = Config("full")
QUICK = Config(
    "quick",
    p1_reps=2,
    p1_seconds=0.2,
    p1_census_pairs=20,
    p2_procs=(2, 4),
    p2_reps=1,
    p2_seconds=0.5,
    p3_counts=(1, 20),
    p3_seconds={1: 2.0, 20: 2.0},
    p3_warmup=1.0,
    p4_tasks=50,
    p4_reps=1,
    p5_calls=5,
    p5_copies=4,
    p5_slow=0.2,
    p6_configs=((1, 4),),
)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=False).stdout.strip()
    except Exception:
        return ""


def versions() -> dict[str, str]:
    out = {}
    for dist in ("celery-dlock", "redis", "python-redis-lock", "pottery", "celery-once",
                 "celery-singleton", "celery", "kombu"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _usable(libs: tuple[Library, ...], only: set[str] | None, skipped: dict[str, str]) -> list[Library]:
    out = []
    for lib in libs:
        if only is not None and lib.key not in only:
            continue
        why = availability(lib.modules, lib.package)
        if why:
            skipped[lib.key] = why
        else:
            out.append(lib)
    return out


def _contention(url: str, libs: list[Library], prefix: str, shapes: list[tuple[int, int]], reps: int,
                seconds: float, log: Any) -> tuple[dict[str, Any], dict[str, dict[str, list[float]]]]:
    """Runs every (library, shape) ``reps`` times, libraries interleaved; returns summary and raw gaps."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rep in range(reps):
        for procs, coros in shapes:
            for lib in libs[rep % len(libs):] + libs[: rep % len(libs)]:
                shape = f"{procs}x{coros}" if coros else str(procs)
                name = f"{prefix}{lib.key}:{shape}:{rep}"
                started = time.monotonic()
                result = p2.run_once(url, lib.key, name, procs, seconds, coros=coros)
                runs.setdefault((lib.key, shape), []).append(result)
                log(f"  {lib.key:20} {shape:>4} rep {rep}: p50 {result['gap_p50_ms']:.2f} ms "
                    f"p99 {result['gap_p99_ms']:.2f} ms, {result['throughput']:.0f}/s, "
                    f"starvation {result['starvation_ratio'] or 0:.1f}x, "
                    f"same {result['same_holder_pct']:.0f}%, "
                    f"overlaps {result['overlaps']} ({time.monotonic() - started:.1f} s)")
    summary: dict[str, Any] = {}
    gaps: dict[str, dict[str, list[float]]] = {}
    for (key, shape), results in runs.items():
        pooled = [g for r in results for g in r.pop("gaps_ms")]
        gaps.setdefault(shape, {})[key] = pooled
        entry = {
            metric: median([r[metric] for r in results])
            for metric in ("gap_p50_ms", "gap_p99_ms", "gap_other_p50_ms", "gap_other_p99_ms",
                           "throughput", "starvation_ratio", "same_holder_pct", "commands_per_acquire",
                           "mean_wait_ms", "max_wait_ms")
        }
        entry["overlaps"] = sum(r["overlaps"] for r in results)
        entry["failures"] = sum(r["failures"] for r in results)
        entry["worst_starvation_ratio"] = max((r["starvation_ratio"] or 0) for r in results)
        entry["pooled_gap_p50_ms"] = percentile(pooled, 50)
        entry["pooled_gap_p99_ms"] = percentile(pooled, 99)
        entry["reps"] = results
        summary.setdefault(key, {})[shape] = entry
    return summary, gaps


def run_suite(config: Config, out_dir: Path, phases: set[str] | None = None, only: set[str] | None = None,
              chart: bool = True, log: Any = print) -> dict[str, Any]:
    phases = set(PHASES) if phases is None else phases
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"dlbench:{uuid.uuid4().hex[:8]}:"
    skipped: dict[str, str] = {}
    t_start = time.monotonic()
    machine0, own0 = server.cpu_accounting()
    srv = server.start_server()
    results: dict[str, Any] = {
        "config": {k: (v if not isinstance(v, dict) else {str(a): b for a, b in v.items()})
                   for k, v in config.__dict__.items()},
        "machine": server.machine_info(srv),
        "versions": versions(),
        "git": {"commit": _git("rev-parse", "HEAD"),
                "dirty_library_files": _git("status", "--porcelain", "--", "celery_dlock").splitlines()},
        "load_average": {"start": server.load_average()},
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "skipped": skipped,
    }
    gaps: dict[str, dict[str, list[float]]] = {}
    try:
        sync_libs = _usable(SYNC_LIBRARIES, only, skipped)
        async_libs = _usable(ASYNC_LIBRARIES, only, skipped)
        if "P1" in phases and sync_libs:
            log("P1 uncontended")
            res = p1.run(srv.url, sync_libs, prefix, config.p1_reps, config.p1_seconds,
                         config.p1_census_pairs)
            p1.add_ratios(res, "floor", "redis-py")
            results["P1"] = res
            results["load_average"]["after_P1"] = server.load_average()
        if "P2" in phases and sync_libs:
            log("P2 contention")
            summary, sync_gaps = _contention(srv.url, sync_libs, prefix + "p2:",
                                             [(n, 0) for n in config.p2_procs], config.p2_reps,
                                             config.p2_seconds, log)
            results["P2"] = summary
            gaps.update(sync_gaps)
            results["load_average"]["after_P2"] = server.load_average()
        if "P3" in phases:
            log("P3 renewal")
            results["P3"] = p3.run(srv.url, list(config.p3_counts), config.p3_seconds, prefix, only,
                                   config.p3_warmup)
            results["load_average"]["after_P3"] = server.load_average()
        if {"P4", "P5"} & phases:
            why = availability(("celery",), "celery")
            if why or (only is not None and "celery" not in only):
                results["P4"] = results["P5"] = {"skipped": why or "not selected"}
            else:
                from . import p45

                log("P4/P5 Celery")
                res = p45.run(srv.url, prefix + "celery:", config.p4_tasks, config.p4_reps,
                              config.p5_calls, config.p5_copies, config.p5_slow)
                results["P4"] = {"variants": res["p4"], "missing": res["missing"], "tasks": config.p4_tasks}
                results["P5"] = {"variants": res["p5"], "missing": res["missing"],
                                 "body_seconds": res["p5_body_seconds"]}
                results["load_average"]["after_P4_P5"] = server.load_average()
        if "P6" in phases and async_libs:
            log("P6 asyncio")
            res = p1.run(srv.url, async_libs, prefix + "p6:", config.p1_reps, config.p1_seconds,
                         config.p1_census_pairs)
            p1.add_ratios(res, "floor-async", "redis-py-async")
            summary, async_gaps = _contention(srv.url, async_libs, prefix + "p6c:",
                                              list(config.p6_configs), config.p2_reps,
                                              config.p2_seconds, log)
            results["P6"] = {"P1": res, "P2": summary}
            gaps.update({f"asyncio {k}": v for k, v in async_gaps.items()})
            results["load_average"]["after_P6"] = server.load_average()
    finally:
        srv.stop()
    results["load_average"]["end"] = server.load_average()
    results["seconds"] = time.monotonic() - t_start
    machine1, own1 = server.cpu_accounting()
    results["cpu_during_run"] = {
        "cores_busy_avg": (machine1 - machine0) / results["seconds"],
        "cores_used_by_this_run_avg": (own1 - own0) / results["seconds"],
        "cores_used_by_other_processes_avg": max(0.0, (machine1 - machine0) - (own1 - own0))
        / results["seconds"],
    }
    results["targets"] = report.targets(results)
    results["handoff_cdf_ms"] = {
        shape: {key: [percentile(vals, q) for q in range(1, 100)] for key, vals in per_lib.items()}
        for shape, per_lib in gaps.items()
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    chart_file = None
    if chart:
        notes: dict[str, dict[str, str]] = {}
        for prefix_, block in (("", results.get("P2") or {}), ("asyncio ", _get_p6(results))):
            for key, shapes in block.items():
                for shape, e in shapes.items():
                    notes.setdefault(prefix_ + shape, {})[key] = (
                        f"({e['same_holder_pct'] or 0:.0f}%, {e['starvation_ratio'] or 0:.0f}x)"
                    )
        chart_file = report.chart(gaps, out_dir / "handoff_cdf.png", log, notes)
    (out_dir / "results.md").write_text(report.markdown(results, chart_file))
    log(f"done in {results['seconds']:.0f} s; wrote {out_dir}/results.json, results.md"
        + (f", {chart_file.name}" if chart_file else ""))
    return results


def _get_p6(results: dict[str, Any]) -> dict[str, Any]:
    p6 = results.get("P6") or {}
    return p6.get("P2") or {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, ~1 minute)")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of P1..P6")
    parser.add_argument("--only", default=None,
                        help="comma-separated library keys (floor, celery-dlock, redis-py, "
                             "python-redis-lock, pottery, floor-async, celery-dlock-async, "
                             "redis-py-async, celery)")
    parser.add_argument("--out", default=None, help="output directory (default benchmarks/results[/quick])")
    parser.add_argument("--p3-seconds", type=float, default=None, help="override the P3 hold time")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    if args.p3_seconds:
        config = replace(config, p3_seconds=dict.fromkeys(config.p3_counts, args.p3_seconds))
    out = Path(args.out) if args.out else BENCH_DIR / "results" / ("quick" if args.quick else "")
    phases = {p.strip().upper() for p in args.phases.split(",") if p.strip()}
    only = {x.strip() for x in args.only.split(",")} if args.only else None
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    print(f"celery-dlock benchmarks ({config.name}) on {os.cpu_count()} cores; "
          f"python {sys.version.split()[0]}")
    run_suite(config, out, phases, only)
    return 0
