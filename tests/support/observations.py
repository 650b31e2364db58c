"""Numbers the fault tests observed, collected for docs/reliability.md.

When ``DLOCK_OBSERVATIONS`` names a file, :func:`record` appends one JSON line
per case; ``tools/reliability_report.py`` runs the fault tests with it set and
turns the lines into the table. Without it, recording does nothing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any


def record(case: str, setup: str, **observed: Any) -> None:
    path = os.environ.get("DLOCK_OBSERVATIONS")
    if not path:
        return
    line = {"case": case, "setup": setup, "observed": observed, "at": time.time()}
    with open(path, "a") as fh:
        fh.write(json.dumps(line) + "\n")
