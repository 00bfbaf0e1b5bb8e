"""A loopback TCP relay that a test can cut and restore: a real link failure between two live
processes (the agent keeps running; only its connection to NATS goes), unlike a SIGKILL.

``cut()`` aborts every relayed connection and stops listening, so reconnects are refused;
``restore()`` listens again on the same port. ``freeze()`` stalls the connections relayed now
without closing them (nothing more goes through either way, like a path that silently drops
packets); connections made after it relay normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TcpProxy:
    """Relays ``127.0.0.1:port`` to ``target_host:target_port`` from a thread of its own."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = _free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tcp-proxy",
                                       daemon=True)
        self.server: asyncio.base_events.Server | None = None
        self.links: set[asyncio.StreamWriter] = set()
        self.frozen: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self) -> TcpProxy:
        self.thread.start()
        self.restore()
        return self

    def restore(self) -> None:
        self._call(self._listen())

    def cut(self) -> None:
        self._call(self._cut())

    def freeze(self) -> None:
        self._call(self._freeze())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()

    async def _listen(self) -> None:
        if self.server is None:
            self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def _freeze(self) -> None:
        self.frozen |= self.links

    async def _cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.links):
            writer.transport.abort()
        self.links.clear()
        self.frozen.clear()

    async def _shutdown(self) -> None:
        await self._cut()
        relays = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.links.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if dst in self.frozen or writer in self.frozen:
                        await asyncio.Event().wait()  # stalled until the link is aborted
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.links.difference_update((writer, up_writer))
        self.frozen.difference_update((writer, up_writer))
