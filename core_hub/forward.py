"""Forwarding live reads to the edge that owns a task (logs), over NATS request/reply.

The answer streams back as messages to ``outpost.v1.rpcreply.<agent>.<ref>`` (see
``edge_agent/rpc.py``), the one reply subject that agent's NATS permissions let it publish to.
An edge that does not answer within ``FIRST_REPLY_S`` is offline: the API says so with a 503
instead of waiting. When the API client goes away mid-follow, the edge is told to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from federation import subjects, wire
from federation.errors import BadRequest, NotFound, OutpostError, Unavailable

log = logging.getLogger(__name__)

FIRST_REPLY_S = 6.0  # a live edge on a slow uplink (or a busy box) still answers within this
QUIET_LIMIT_S = 120.0  # a finished (non-follow) read never goes this long without a message

_ERRORS: dict[int, type[OutpostError]] = {400: BadRequest, 404: NotFound}


async def forward_logs(nc: Any, agent_id: str, task_id: str, *, stream: str, tail: int,
                       follow: bool) -> AsyncIterator[bytes]:
    """Ask ``agent_id`` for a task's logs; raises before the first byte if it cannot answer."""
    ref = uuid.uuid4().hex
    # The agent's NATS permissions let it publish to its own rpcreply subjects only.
    inbox = subjects.rpc_reply(agent_id, ref)
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1024)

    async def on_msg(msg: Any) -> None:
        # NATS answers a request nobody listens to with an empty "503 no responders" message.
        no_responders = not msg.data and (msg.headers or {}).get("Status") == "503"
        await queue.put(None if no_responders else msg.data)

    sub = await nc.subscribe(inbox, cb=on_msg)
    try:
        await nc.publish(subjects.rpc(agent_id, "logs"), wire.pack({
            "req": ref, "task_id": task_id, "stream": stream, "tail": tail, "follow": follow}),
            reply=inbox)
        timed_out = False
        try:
            first = await asyncio.wait_for(queue.get(), FIRST_REPLY_S)
        except TimeoutError:
            first, timed_out = None, True
        if first is None:
            log.warning("logs of task %s: agent %s %s", task_id, agent_id,
                        f"did not answer within {FIRST_REPLY_S:g} s" if timed_out
                        else "has no log responder (not connected to NATS)",
                        extra={"agent": agent_id, "task": task_id})
            raise Unavailable(f"agent {agent_id} is offline: its logs can be read when it "
                              "is back, or at the agent itself", details={"agent": agent_id})
        try:
            answer = wire.unpack(first)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise Unavailable(f"agent {agent_id} sent an unreadable answer",
                              details={"agent": agent_id})
        if "error" in answer:
            err = answer["error"] if isinstance(answer["error"], dict) else {}
            status = err.get("status")
            log.info("logs of task %s: agent %s answered %s: %s", task_id, agent_id,
                     status, err.get("message"), extra={"agent": agent_id, "task": task_id})
            raise (_ERRORS.get(status, Unavailable) if isinstance(status, int) else Unavailable)(
                f"agent {agent_id}: {str(err.get('message'))[:200]}", details={"agent": agent_id})
    except BaseException:
        await sub.unsubscribe()
        raise
    return _relay(nc, sub, queue, answer, agent_id, ref, follow)


async def _relay(nc: Any, sub: Any, queue: asyncio.Queue[Any], answer: dict[str, Any],
                 agent_id: str, ref: str, follow: bool) -> AsyncIterator[bytes]:
    """The edge's answer as it streams in. Only an ``end`` ends it cleanly: anything else
    (an error, an answer that is not one, silence past the limit) raises, and the API cuts
    the started response, so a client never takes a broken read for the whole log."""
    done = False
    try:
        while True:
            if not isinstance(answer, dict):
                raise Unavailable(f"agent {agent_id} sent an unreadable answer",
                                  details={"agent": agent_id})
            if answer.get("end"):
                done = True
                return
            if "error" in answer:
                raise Unavailable(f"agent {agent_id} failed mid-read: {answer['error']!r:.200}",
                                  details={"agent": agent_id})
            if "data" in answer:
                if not isinstance(answer["data"], bytes):
                    raise Unavailable(f"agent {agent_id} sent log data that is not bytes",
                                      details={"agent": agent_id})
                yield answer["data"]
            wait = None if follow else QUIET_LIMIT_S
            try:
                data = await asyncio.wait_for(queue.get(), wait)
            except TimeoutError:
                raise Unavailable(f"agent {agent_id} went quiet mid-read",
                                  details={"agent": agent_id}) from None
            try:
                answer = wire.unpack(data) if data else {"end": True}
            except ValueError:
                answer = None
    finally:
        if not done:
            with contextlib.suppress(Exception):
                await nc.publish(subjects.rpc(agent_id, "cancel"), wire.pack({"req": ref}))
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
