"""Run a test module under both Redis protocols: assign ``redis_url = resp2_and_resp3`` in it.

Every client the module makes from ``redis_url`` (and the ``r`` fixture) then speaks
RESP2 in one run and RESP3 (``protocol=3``, redis-py's upcoming default) in the other.
"""

from __future__ import annotations

import pytest


def with_protocol(url: str, protocol: int) -> str:
    return f"{url}{'&' if '?' in url else '?'}protocol={protocol}"


@pytest.fixture(name="redis_url", params=[2, 3], ids=["resp2", "resp3"])
def resp2_and_resp3(request: pytest.FixtureRequest, server_url: str) -> str:
    return with_protocol(server_url, request.param)
