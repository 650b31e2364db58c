#!/usr/bin/env python3
"""Run the celery-dlock benchmark suite: ``python3 benchmarks/run.py [--quick]``.

The first run creates ``benchmarks/.venv`` (git-ignored) with celery-dlock installed
editable from this checkout and the peers from ``benchmarks/requirements.txt``
installed from the package index; each peer is installed on its own, and one that
cannot be installed is recorded (``.venv/install-status.json``) and reported as
skipped. Later runs reuse the venv while those files are unchanged. Then the
script re-executes itself inside that venv and runs :mod:`dlbench.main`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV = HERE / ".venv"
PYTHON = VENV / "bin" / "python"
REQUIREMENTS = HERE / "requirements.txt"
STAMP = VENV / "requirements.sha256"
STATUS = VENV / "install-status.json"


def _wanted_stamp() -> str:
    digest = hashlib.sha256()
    for path in (REQUIREMENTS, REPO / "pyproject.toml"):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _requirements() -> list[str]:
    lines = []
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def bootstrap(force: bool = False) -> None:
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    wanted = _wanted_stamp()
    if not force and STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    pip = [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    print("installing celery-dlock (editable) and the peers into the benchmark venv", flush=True)
    subprocess.check_call([*pip, "-e", str(REPO)])
    status: dict[str, str] = {}
    for requirement in _requirements():
        name = requirement.split("==")[0].split(">=")[0].strip()
        proc = subprocess.run([*pip, requirement], capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            status[name] = "ok"
        else:
            tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
            status[name] = f"pip install {requirement} failed: {tail}"[:400]
            print(f"  could not install {requirement}; it will be reported as skipped", flush=True)
    STATUS.write_text(json.dumps(status, indent=1) + "\n")
    STAMP.write_text(wanted + "\n")


def main() -> int:
    argv = sys.argv[1:]
    in_venv = Path(sys.prefix).resolve() == VENV.resolve()
    if "--no-bootstrap" in argv:
        argv.remove("--no-bootstrap")
    elif not in_venv:
        force = "--reinstall" in argv
        if force:
            argv.remove("--reinstall")
        bootstrap(force)
        os.execv(str(PYTHON), [str(PYTHON), str(Path(__file__).resolve()), *argv])
    sys.path.insert(0, str(HERE))
    from dlbench.main import main as run_main

    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
