"""Run a test module under both Redis protocols, and the sync lock's both script paths.

Assign ``redis_url = resp2_and_resp3`` in a module: every client it makes from
``redis_url`` (and the ``r`` fixture) then speaks RESP2 in one run and RESP3
(``protocol=3``) in the other. ``redis_url = protocols_and_paths`` also runs each of
those with the lock's scripts sent through redis-py's public ``execute_command`` (the
path a client whose internals the channel does not fit takes, see
celery_dlock/channel.py) besides the script channel.
"""

from __future__ import annotations

import weakref

import pytest

from celery_dlock import channel


def with_protocol(url: str, protocol: int) -> str:
    return f"{url}{'&' if '?' in url else '?'}protocol={protocol}"


@pytest.fixture(name="redis_url", params=[2, 3], ids=["resp2", "resp3"])
def resp2_and_resp3(request: pytest.FixtureRequest, server_url: str) -> str:
    return with_protocol(server_url, request.param)


def use_execute_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every client of this test send the lock's scripts through execute_command."""
    monkeypatch.setattr(channel, "_understood", lambda client: False)
    monkeypatch.setattr(channel, "_channels", weakref.WeakKeyDictionary())


@pytest.fixture(
    name="redis_url",
    params=[(2, "channel"), (3, "channel"), (2, "execute_command"), (3, "execute_command")],
    ids=["resp2-channel", "resp3-channel", "resp2-execute_command", "resp3-execute_command"],
)
def protocols_and_paths(
    request: pytest.FixtureRequest, server_url: str, monkeypatch: pytest.MonkeyPatch
) -> str:
    protocol, path = request.param
    if path == "execute_command":
        use_execute_command(monkeypatch)
    return with_protocol(server_url, protocol)
