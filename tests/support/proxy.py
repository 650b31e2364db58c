"""A small TCP proxy for fault tests: adds latency, or black-holes traffic (a network cut).

Runs an asyncio server in a background thread. While ``cut`` is on, bytes in
both directions are held back (connections stay open, nothing arrives), which
is what a partition looks like to a client: reads time out, nothing resets.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from celery_dlock.embedded import free_port


class ChaosProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.latency = 0.0  # seconds added to each chunk, each direction
        # While set: the next reply from the server is dropped and its client connection
        # closed (a reply lost on the way back, after the server ran the command).
        self.drop_next_reply = threading.Event()
        # Connections that sent a SUBSCRIBE (pub/sub), and those frozen by freeze_pubsub().
        self._pubsub: set[asyncio.StreamWriter] = set()
        self._frozen: set[asyncio.StreamWriter] = set()
        self._cut = threading.Event()
        self._resume: asyncio.Event | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="chaos-proxy")
        self._server: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> ChaosProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)
        return self

    async def _start(self) -> None:
        self._resume = asyncio.Event()
        self._resume.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    def cut(self) -> None:
        """Stop delivering bytes in both directions (until :meth:`heal`)."""
        self._loop.call_soon_threadsafe(self._set_cut, True)

    def freeze_pubsub(self) -> None:
        """Silently stop the pub/sub connections open now (a NAT or firewall dropping an idle
        connection): nothing arrives either way, nothing is reset. New connections work."""
        self._loop.call_soon_threadsafe(lambda: self._frozen.update(self._pubsub))

    def heal(self) -> None:
        self._loop.call_soon_threadsafe(self._set_cut, False)

    def _set_cut(self, cut: bool) -> None:
        assert self._resume is not None
        if cut:
            self._resume.clear()
        else:
            self._resume.set()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            self._pump(client_reader, server_writer, tag=client_writer),
            self._pump(server_reader, client_writer, replies=True, tag=client_writer),
            return_exceptions=True,
        )

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tag: asyncio.StreamWriter,
        replies: bool = False,
    ) -> None:
        assert self._resume is not None
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                if not replies and b"SUBSCRIBE" in chunk.upper():
                    self._pubsub.add(tag)
                if tag in self._frozen:
                    continue  # swallowed: a silently dead connection
                if replies and self.drop_next_reply.is_set():
                    self.drop_next_reply.clear()
                    writer.transport.abort()  # the reply is lost with the connection
                    break
                if self.latency:
                    await asyncio.sleep(self.latency)
                await self._resume.wait()  # a cut holds bytes back
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()

    def stop(self) -> None:
        async def _close() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(_close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
