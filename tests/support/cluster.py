"""A three-primary Redis Cluster of real redis-server processes, on free ports."""

from __future__ import annotations

import random
import socket
import time

import redis

from celery_dlock.embedded import RedisServer

SLOTS = 16384


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (both must be <= 65535)."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        if _port_free(port) and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class LocalCluster:
    def __init__(self, size: int = 3) -> None:
        args = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
        self.nodes = [RedisServer(port=cluster_port(), extra_args=args) for _ in range(size)]

    def start(self) -> LocalCluster:
        for node in self.nodes:
            node.start()
        clients = [redis.Redis(port=node.port) for node in self.nodes]
        share = SLOTS // len(self.nodes)
        for index, client in enumerate(clients):
            first = index * share
            last = SLOTS - 1 if index == len(clients) - 1 else first + share - 1
            client.execute_command("CLUSTER ADDSLOTS", *range(first, last + 1))
        for client in clients[1:]:
            client.execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[0].port)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [_state(c.execute_command("CLUSTER INFO")) for c in clients]
            if all(state == "ok" for state in states):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("cluster did not become ok")
        for client in clients:
            client.close()
        return self

    @property
    def startup_port(self) -> int:
        return self.nodes[0].port

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _state(info: object) -> str:
    if isinstance(info, dict):
        return str(info.get("cluster_state"))
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "ok" if "cluster_state:ok" in text else "fail"
