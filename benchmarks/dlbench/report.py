"""Turn a results dict into the Markdown tables, the target verdicts and the handoff CDF chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DLOCK = "celery-dlock"
#: The P4 variant paying two bare round trips over plain (see dlbench/celery_app.py).
PROBE = "probe: plain + 2 bare round trips"


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def _get(d: Any, *path: Any) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _verdict(ok: bool | None) -> str:
    return {True: "meets", False: "MISSES", None: "not measured"}[ok]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(metric: str, target: str, value: str, ok: bool | None) -> None:
        out.append({"metric": metric, "target": target, "value": value, "verdict": _verdict(ok)})

    p1 = results.get("P1", {})
    d = p1.get(DLOCK)
    if d:
        ratio = d.get("ratio_to_floor")
        add("P1", ">= 0.9 x floor pairs/s", f"{_f(ratio)} x", None if ratio is None else ratio >= 0.9)
        vs_rp = d.get("ratio_to_redis-py")
        add("P1", ">= redis-py Lock pairs/s", f"{_f(vs_rp)} x redis-py Lock",
            None if vs_rp is None else vs_rp >= 1.0)
        rta, rtr = d["round_trips_per_acquire"], d["round_trips_per_release"]
        add("P1", "1 round trip per acquire, 1 per release", f"{_f(rta)} / {_f(rtr)}",
            abs(rta - 1) < 1e-9 and abs(rtr - 1) < 1e-9)
    p2 = results.get("P2", {})
    d8 = _get(p2, DLOCK, "8")
    if d8:
        add("P2", "8 processes: handoff p50 <= 1 ms", f"{_f(d8['gap_p50_ms'])} ms", d8["gap_p50_ms"] <= 1)
        add("P2", "8 processes: handoff p99 <= 10 ms", f"{_f(d8['gap_p99_ms'])} ms", d8["gap_p99_ms"] <= 10)
        worst = d8["worst_starvation_ratio"]
        add("P2", "8 processes: longest wait <= 20 x mean wait", f"{_f(worst, 1)} x (worst rep)", worst <= 20)
    if p2:
        bad = sorted(f"{k} ({s})" for k, shapes in p2.items() for s, e in shapes.items() if e["overlaps"])
        add("P2", "0 overlapping holders, every library", ", ".join(bad) or "0 everywhere", not bad)
    p3 = _get(results, "P3", DLOCK, "runs")
    if p3:
        threads = {n: r["threads_created"] for n, r in p3.items()}
        add("P3", "one watchdog per process (threads do not grow with locks)",
            ", ".join(f"{n} locks: {t}" for n, t in threads.items()),
            max(threads.values()) <= 5 and len(set(threads.values())) <= 2)
        rts = {n: r["round_trips_per_interval"] for n, r in p3.items()}
        add("P3", "<= 1 round trip per renewal interval", ", ".join(f"{n}: {_f(v)}" for n, v in rts.items()),
            max(rts.values()) <= 1.05)
        lost = {n: r["locks_lost"] for n, r in p3.items()}
        add("P3", "0 locks lost", ", ".join(f"{n}: {v}" for n, v in lost.items()), not any(lost.values()))
    p4 = _get(results, "P4", "variants") or {}
    locked = p4.get("celery-dlock LockedTask")
    if locked:
        add("P4", "LockedTask >= 0.85 x plain Task", f"{_f(locked['ratio_to_plain'])} x",
            locked["ratio_to_plain"] >= 0.85)
        peers = {k: v["ratio_to_plain"] for k, v in p4.items()
                 if k.startswith(("celery-once", "celery-singleton"))}
        add("P4", "LockedTask ahead of QueueOnce and Singleton",
            f"{_f(locked['ratio_to_plain'])} x plain vs "
            + ", ".join(f"{k.split()[0]} {_f(v)} x" for k, v in peers.items()),
            all(locked["ratio_to_plain"] > v for v in peers.values()) if peers else None)
        plain, probe = p4.get("plain Task"), p4.get(PROBE)
        if plain and probe and plain.get("all_cpu_ms_per_task") is not None:
            over = {k: v["all_cpu_ms_per_task"] - plain["all_cpu_ms_per_task"] for k, v in p4.items()}
            peer_over = {k: v for k, v in over.items() if k.startswith(("celery-once", "celery-singleton"))}
            mine, yardstick = over["celery-dlock LockedTask"], over[PROBE]
            add("P4", "LockedTask all-CPU/task over plain below QueueOnce's and Singleton's",
                f"+{_f(mine)} ms vs " + ", ".join(f"{k.split()[0]} +{_f(v)}" for k, v in peer_over.items()),
                all(mine < v for v in peer_over.values()) if peer_over else None)
            add("P4", "LockedTask all-CPU/task over plain <= 2 x the probe's (two bare round trips)",
                f"+{_f(mine)} ms = {_f(mine / yardstick if yardstick > 0 else float('inf'))} x probe "
                f"(+{_f(yardstick)} ms)", mine <= 2 * yardstick)
    elif "P4" in results:
        why = _get(results, "P4", "missing", "LockedTask") or _get(results, "P4", "skipped")
        add("P4", "LockedTask >= 0.85 x plain, ahead of peers", f"skipped: {why}", None)
    p5 = _get(results, "P5", "variants") or {}
    mine = {k: v for k, v in p5.items() if k.startswith(DLOCK)}
    if mine:
        for k, v in mine.items():
            add("P5", f"{k}: exactly {v['expected']} executions", str(v["executions"]),
                v["executions"] == v["expected"])
    elif "P5" in results:
        why = _get(results, "P5", "missing", "LockedTask") or _get(results, "P5", "skipped")
        add("P5", "exactly 100 executions for celery-dlock", f"skipped: {why}", None)
    p6 = _get(results, "P6", "P2") or {}
    if p6:
        bad = sorted(f"{k} ({s})" for k, shapes in p6.items() for s, e in shapes.items() if e["overlaps"])
        add("P6", "asyncio: 0 overlapping holders", ", ".join(bad) or "0 everywhere", not bad)
    return out


def _p1_table(p1: dict[str, Any], floor: str) -> list[str]:
    lines = [
        f"| library | pairs/s (median) | x {floor} | us / pair | client CPU us / pair | "
        "redis-server CPU us / pair | round trips / acquire | round trips / release "
        "| Redis commands / pair |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in p1.values():
        lines.append(f"| {e['label']} | {_f(e['pairs_per_s'])} | {_f(e['ratio_to_floor'])} | "
                     f"{_f(e.get('wall_us_per_pair'), 0)} | {_f(e.get('client_cpu_us_per_pair'), 0)} | "
                     f"{_f(e.get('server_cpu_us_per_pair'), 0)} | "
                     f"{_f(e['round_trips_per_acquire'])} | {_f(e['round_trips_per_release'])} | "
                     f"{_f(e['commands_per_pair'], 1)} |")
    return lines


def _p2_table(p2: dict[str, Any], labels: dict[str, str], holders: str) -> list[str]:
    lines = [
        f"| library | {holders} | handoff p50 ms | handoff p99 ms | p50 to another holder ms | "
        "acquisitions/s | longest / mean wait | same holder again | Redis cmds / acquire | overlaps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, shapes in p2.items():
        for shape, e in shapes.items():
            same = e["same_holder_pct"]
            lines.append(
                f"| {labels.get(key, key)} | {shape} | {_f(e['gap_p50_ms'])} | {_f(e['gap_p99_ms'])} | "
                f"{_f(e['gap_other_p50_ms'])} | {_f(e['throughput'])} | "
                f"{_f(e['starvation_ratio'], 1)} x (worst {_f(e['worst_starvation_ratio'], 1)}) | "
                f"{_f(same, 0)}% | {_f(e['commands_per_acquire'], 1)} | {e['overlaps']} |"
            )
    return lines


def _cpu_line(results: dict[str, Any]) -> str:
    cpu = results.get("cpu_during_run")
    if not cpu:
        return ""
    return (f"CPU during the run (average cores busy, of {results['machine']['nproc']}): "
            f"{cpu['cores_busy_avg']:.2f} in all, {cpu['cores_used_by_this_run_avg']:.2f} by this run, "
            f"{cpu['cores_used_by_other_processes_avg']:.2f} by other processes.")


def markdown(results: dict[str, Any], chart_file: Path | None) -> str:
    m = results["machine"]
    lines = [
        "# celery-dlock benchmark results",
        "",
        f"Run `{results['config']['name']}` started {results['started_at']}, "
        f"took {results['seconds']:.0f} s. "
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), Python {m['python']}, redis-server "
        f"{m['redis_server']}, redis-py {m['redis_py']}, kernel {m['kernel']}.",
        f"Load average (1/5/15 min): start {results['load_average']['start']}, end "
        f"{results['load_average']['end']}.",
        _cpu_line(results),
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".",
        f"celery-dlock at commit `{results['git']['commit'][:10]}`"
        + (f" with uncommitted library changes in {len(results['git']['dirty_library_files'])} file(s)"
           if results["git"]["dirty_library_files"] else "") + ".",
        "",
    ]
    if results["skipped"]:
        lines += ["Skipped libraries: " + "; ".join(f"{k}: {v}" for k, v in results["skipped"].items()), ""]
    tg = results.get("targets") or []
    if tg:
        lines += ["## celery-dlock against the targets of issue 5", "", "| | target | measured | verdict |",
                  "|---|---|---|---|"]
        lines += [f"| {t['metric']} | {t['target']} | {t['value']} | **{t['verdict']}** |" for t in tg]
        lines.append("")
    labels = {k: e["label"] for k, e in results.get("P1", {}).items()}
    if "P1" in results:
        lines += ["## P1 uncontended acquire+release, one client", ""]
        lines += _p1_table(results["P1"], "floor")
        lines.append("")
    if "P2" in results:
        lines += ["## P2 contention: N processes on one lock, each holding ~1 ms", ""]
        lines += _p2_table(results["P2"], labels, "processes")
        lines += ["", "Medians over repetitions; overlaps summed over all repetitions. Handoff = from the "
                  "holder calling release() to the next holder's acquire() returning.", ""]
    p3 = results.get("P3")
    if p3:
        lines += ["## P3 renewal: auto-renewed locks held with a 3 s lease", "",
                  "Held for warm-up + measured seconds; commands/s and round trips/s are over the measured "
                  "window (steady state); the last column counts the whole hold including the first "
                  "renewals.", "",
                  "| library | locks | held s | threads created | Redis commands/s | round trips/s | "
                  "round trips per renewal interval | locks lost | renewal errors | "
                  "round trips per interval, whole hold |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for e in p3.values():
            if "skipped" in e:
                continue
            for n, r in e["runs"].items():
                errors = r["thread_errors"] + r["warnings_logged"]
                held = r["seconds"] + r.get("warmup_seconds", 0)
                lines.append(f"| {e['label']} | {n} | {_f(r.get('warmup_seconds', 0), 0)} + "
                             f"{_f(r['seconds'], 0)} = {_f(held, 0)} | {r['threads_created']} | "
                             f"{_f(r['commands_per_s'], 1)} | {_f(r['round_trips_per_s'], 1)} | "
                             f"{_f(r['round_trips_per_interval'])} | {r['locks_lost']} | {errors} | "
                             f"{_f(r.get('round_trips_per_interval_whole_hold'))} |")
        notes = [f"{e['label']}: {e['skipped']}" for e in p3.values() if "skipped" in e]
        if notes:
            lines += ["", "Not in P3: " + "; ".join(notes) + "."]
        lines.append("")
    for phase, title in (("P4", "P4 Celery end to end (prefork, concurrency 2)"), ("P5", "P5 dedup")):
        block = results.get(phase)
        if not block:
            continue
        lines += [f"## {title}", ""]
        if "skipped" in block:
            lines += [f"Skipped: {block['skipped']}", ""]
            continue
        if phase == "P4":
            lines += [f"{block['tasks']} trivial tasks with distinct arguments per variant; first publish "
                      "to last task done. CPU per task from /proc (worker: main process + pool children; "
                      "all: worker + publisher + redis-server).",
                      "",
                      "| variant | tasks/s (median) | x plain | worker CPU ms/task | publisher CPU ms/task "
                      "| redis-server CPU ms/task | all CPU ms/task | Redis commands/task (incl. broker) |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
            lines += [f"| {k} | {_f(v['tasks_per_s'])} | {_f(v['ratio_to_plain'])} | "
                      f"{_f(v['worker_cpu_ms_per_task'])} | {_f(v['publisher_cpu_ms_per_task'])} | "
                      f"{_f(v.get('redis_cpu_ms_per_task'))} | {_f(v.get('all_cpu_ms_per_task'))} | "
                      f"{_f(v['redis_commands_per_task'], 1)} |"
                      for k, v in block["variants"].items()]
        else:
            lines += [f"Body sleeps {block['body_seconds']} s.", "",
                      "| variant | executions | expected | sends | distinct task ids returned |",
                      "|---|---:|---:|---:|---:|"]
            lines += [f"| {k} | {v['executions']} | {v['expected']} | {v['sends']} | "
                      f"{v['distinct_task_ids_returned']} |" for k, v in block["variants"].items()]
        for k, why in block.get("missing", {}).items():
            lines.append(f"\n{k}: **{why}**")
        lines.append("")
    p6 = results.get("P6")
    if p6:
        lines += ["## P6 asyncio", "", "Uncontended (one coroutine):", ""]
        lines += _p1_table(p6["P1"], "floor asyncio")
        labels6 = {k: e["label"] for k, e in p6["P1"].items()}
        lines += ["", "Contention (processes x coroutines per process):", ""]
        lines += _p2_table(p6["P2"], labels6, "procs x coros")
        lines.append("")
    if chart_file is not None:
        lines += ["## Handoff latency", "", f"![handoff latency CDF]({chart_file.name})", ""]
    return "\n".join(lines) + "\n"


def chart(gaps: dict[str, dict[str, list[float]]], path: Path, log: Any = print,
          notes: dict[str, dict[str, str]] | None = None) -> Path | None:
    """One panel per contention shape: CDF of handoff gaps per library (log x axis).

    ``notes[shape][library]`` is appended to the legend entry (fairness, which a latency
    CDF alone does not show).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except Exception as exc:
        log(f"no chart: matplotlib unavailable ({exc!r})")
        return None
    shapes = [s for s in gaps if gaps[s]]
    if not shapes:
        return None
    cols = min(3, len(shapes))
    rows = (len(shapes) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    for ax, shape in zip(axes.flat, shapes, strict=False):
        for key, values in sorted(gaps[shape].items()):
            if not values:
                continue
            xs = sorted(max(v, 1e-3) for v in values)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            note = (notes or {}).get(shape, {}).get(key, "")
            ax.step(xs, ys, where="post", label=f"{key} {note}".strip(), linewidth=1.4)
        title = shape if shape.startswith("asyncio") else f"{shape} processes"
        ax.set_title(f"handoff latency, {title}")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("release() called -> next acquire() returned (ms)")
        ax.set_ylabel("fraction of handoffs")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5, loc="lower right", title="same holder again, longest/mean wait",
                  title_fontsize=6.5)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
