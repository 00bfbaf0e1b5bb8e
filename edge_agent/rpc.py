"""Live reads the core forwards to this edge over NATS request/reply (only while online).

``outpost.v1.rpc.<agent>.logs``: the request names a task, a stream, a tail and whether to
follow; the answer is a series of messages to the request's reply subject, each a packed map:
``{"data": bytes}`` chunks, then ``{"end": true}``, or ``{"error": {"status", "message"}}``.
The same ``open_logs`` as the edge's own API produces the bytes, so both read alike.
A follow ends when the task ends, on ``outpost.v1.rpc.<agent>.cancel {"req"}`` from the core,
or after ``MAX_FOLLOW_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from edge_agent.backend import EdgeBackend
from federation import subjects, wire
from federation.errors import OutpostError
from federation.loopguard import stop_loops

log = logging.getLogger(__name__)

CHUNK = 32 * 1024
MAX_FOLLOW_S = 3600.0


class RpcServer:
    """Answers the core's live reads for one agent while the link is up."""

    def __init__(self, nc: Any, backend: EdgeBackend) -> None:
        self.nc = nc
        self.backend = backend
        self.streams: dict[str, asyncio.Task[None]] = {}
        self.subs: list[Any] = []

    async def start(self) -> None:
        agent = self.backend.agent_id
        self.subs = [await self.nc.subscribe(subjects.rpc(agent, "logs"), cb=self._on_logs),
                     await self.nc.subscribe(subjects.rpc(agent, "cancel"), cb=self._on_cancel)]

    async def stop(self) -> None:
        for sub in self.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await stop_loops(*self.streams.values(), errors=False)

    async def _on_cancel(self, msg: Any) -> None:
        with contextlib.suppress(ValueError, AttributeError):
            task = self.streams.get(str(wire.unpack(msg.data).get("req")))
            if task is not None:
                task.cancel()

    async def _on_logs(self, msg: Any) -> None:
        # Answers go to this agent's own rpcreply subjects only (a reply subject is input too;
        # least privilege would refuse anything else, but do not rely on it).
        if not (msg.reply or "").startswith(f"{subjects.PREFIX}.rpcreply.{self.backend.agent_id}."):
            return
        try:
            req = wire.unpack(msg.data)
            if not isinstance(req, dict):
                raise ValueError("not a map")
            ref = str(req["req"])
            chunks = await self.backend.open_logs(
                str(req["task_id"]), stream=str(req.get("stream", "stdout")),
                tail=int(req.get("tail", 100)), follow=bool(req.get("follow", False)))
        except OutpostError as exc:
            await self.nc.publish(msg.reply, wire.pack({"error": {
                "status": exc.status, "code": exc.code, "message": exc.message}}))
            return
        except (ValueError, KeyError, TypeError) as exc:
            await self.nc.publish(msg.reply, wire.pack({"error": {
                "status": 400, "code": "bad_request", "message": f"bad log request: {exc}"}}))
            return
        # An answer at once, even for a task with nothing to show yet: silence means offline.
        await self.nc.publish(msg.reply, wire.pack({"data": b""}))
        task = asyncio.create_task(self._stream(msg.reply, chunks), name=f"rpc-logs-{ref}")
        self.streams[ref] = task
        task.add_done_callback(lambda _: self.streams.pop(ref, None))

    async def _stream(self, reply: str, chunks: Any) -> None:
        try:
            async with asyncio.timeout(MAX_FOLLOW_S):
                async for data in chunks:
                    for i in range(0, len(data), CHUNK):
                        await self.nc.publish(reply, wire.pack({"data": data[i:i + CHUNK]}))
            await self.nc.publish(reply, wire.pack({"end": True}))
        except (asyncio.CancelledError, TimeoutError):
            pass
        except Exception as exc:  # the link dropped mid-stream: the core sees the stream stop
            log.info("log stream ended: %r", exc)
        finally:
            await chunks.aclose()
