"""A real redis-py client that counts the round trips it makes (for cost tests)."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
from redis.client import Pipeline


class CountingPipeline(Pipeline):
    def execute(self, raise_on_error: bool = True) -> Any:
        self.counter.round_trips += 1  # type: ignore[attr-defined]
        return super().execute(raise_on_error)


class CountingRedis(redis.Redis):
    """Counts commands sent one by one and pipelines executed; talks to the real server."""

    round_trips = 0
    commands: list[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.round_trips += 1
        self.commands.append(str(args[0]))
        return super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        pipe = CountingPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.counter = self  # type: ignore[attr-defined]
        return pipe


class CountingAsyncPipeline(redis.asyncio.client.Pipeline):
    async def execute(self, raise_on_error: bool = True) -> Any:
        self.counter.round_trips += 1  # type: ignore[attr-defined]
        return await super().execute(raise_on_error)


class CountingAsyncRedis(redis.asyncio.Redis):
    """The asyncio twin of CountingRedis."""

    round_trips = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.round_trips += 1
        return await super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = CountingAsyncPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.counter = self  # type: ignore[attr-defined]
        return pipe
