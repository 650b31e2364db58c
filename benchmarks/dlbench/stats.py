"""Statistics on recorded holder intervals (all times from CLOCK_MONOTONIC, system-wide on Linux).

A holder record is ``(holder, t_request, t_acquired, t_release_start, t_released)``:

* ``t_acquired`` is taken after acquire() returned and ``t_release_start`` before
  release() was called, so the real hold in Redis always *contains*
  ``[t_acquired, t_release_start]``. Two such intervals of different holders that
  overlap therefore prove a mutual-exclusion violation (no false positives).
* handoff gap = next ``t_acquired`` - previous ``t_release_start``: from the moment
  the holder starts to release until the next holder knows it has the lock (release
  round trip + wake-up + acquire round trip).
* wait = ``t_acquired - t_request``.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from typing import Any

Record = tuple[Any, float, float, float, float]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no data."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def analyse(
    records: list[Record], start: float, stop: float, holders: Sequence[Any] = ()
) -> dict[str, Any]:
    """Handoff gaps, waits, overlaps, fairness for one contention run.

    Only acquisitions that happened inside [start, stop] count for throughput; the
    wait of every acquisition counts (a process that waited through the whole run
    and only got the lock after the others stopped is exactly the starvation we
    want to see).
    """
    recs = sorted(records, key=lambda r: r[2])
    overlaps = 0
    overlap_examples: list[dict[str, Any]] = []
    max_end = -math.inf
    max_owner: Any = None
    for rec in recs:
        holder, _t0, t1, t2, _t3 = rec
        if t1 < max_end and holder != max_owner:
            overlaps += 1
            if len(overlap_examples) < 5:
                overlap_examples.append({"holder": str(holder), "other": str(max_owner),
                                         "overlap_ms": (max_end - t1) * 1000})
        if t2 > max_end:
            max_end, max_owner = t2, holder
    gaps: list[float] = []
    gaps_other: list[float] = []  # handoffs to another holder: the wake-up path
    same_holder = 0
    for prev, nxt in itertools.pairwise(recs):
        if prev[3] >= stop:
            break
        gaps.append(nxt[2] - prev[3])
        if prev[0] == nxt[0]:
            same_holder += 1
        else:
            gaps_other.append(nxt[2] - prev[3])
    in_window = [r for r in recs if start <= r[2] <= stop]
    waits = [r[2] - r[1] for r in recs]
    per_holder: dict[Any, int] = dict.fromkeys(holders, 0)
    for r in in_window:
        per_holder[r[0]] = per_holder.get(r[0], 0) + 1
    mean_wait = statistics.fmean(waits) if waits else 0.0
    max_wait = max(waits) if waits else 0.0
    duration = stop - start
    return {
        "acquisitions": len(in_window),
        "throughput": len(in_window) / duration if duration > 0 else 0.0,
        "gap_p50_ms": _ms(percentile(gaps, 50)),
        "gap_p99_ms": _ms(percentile(gaps, 99)),
        "gap_max_ms": _ms(max(gaps) if gaps else None),
        "gap_other_p50_ms": _ms(percentile(gaps_other, 50)),
        "gap_other_p99_ms": _ms(percentile(gaps_other, 99)),
        "mean_wait_ms": mean_wait * 1000,
        "max_wait_ms": max_wait * 1000,
        "starvation_ratio": (max_wait / mean_wait) if mean_wait > 0 else None,
        "same_holder_pct": 100.0 * same_holder / len(gaps) if gaps else None,
        "per_holder_acquisitions": sorted(per_holder.values()),
        "overlaps": overlaps,
        "overlap_examples": overlap_examples,
        "gaps_ms": [g * 1000 for g in gaps],
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
