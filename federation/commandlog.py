"""Core-to-edge commands as one numbered log per agent, with no JetStream consumer at all.

Why not a durable consumer per agent (the first design): nats-server refuses the 1,001st
consumer on a stream by default (err 10026), and past that limit each durable pull consumer
costs the server about 50 KB of RSS, its own state files, and at shutdown a flush that kept
the server from exiting within 10 s of SIGTERM at 1,000 consumers (``bench/command_options.py``
measures all three; docs/scaling.md has the figures). Here the server keeps nothing per agent
but the messages themselves:

- the hub appends command number ``n`` of an agent to ``outpost.v1.cmd.<agent>.<n>`` with
  ``Nats-Expected-Last-Subject-Sequence: 0``, so a number is written once, whichever hub
  replica or retry writes it; on a conflict it reads the agent's newest number from the stream
  and takes the next (``CommandLog``). Numbers are dense: the hub appends one at a time per
  agent and moves on only after a stored, non-duplicate ack;
- the agent keeps the last number it applied in its own store and reads the rest with
  per-subject direct gets (``$JS.API.DIRECT.GET.OUTPOST_COMMANDS.outpost.v1.cmd.<agent>.<n>``),
  a form whose subject names the message, so NATS permissions can limit an agent to its own
  subjects (the body form of direct get names the subject in JSON, out of the permissions'
  reach). A core-NATS subscription on its own subjects wakes it when a command arrives while it
  is online; its owner wakes it again on a reconnect (a wake-up sent while the link was down
  is lost), and a slow tick (``POLL_S`` or more) covers any other lost wake-up
  (``CommandReader``).

Guarantee 3 holds: the commands wait in the stream (limits retention, ``commands_max_age_s``)
for an edge that is away, it applies them in number order, once (the command id is recorded
with its effect, ``edge_agent/store.py``), and expiry is checked when applied. Numbers that
expired from the stream are skipped. If a hub lost its count while every command of an agent
had expired (a restart after a quiet week), it starts again at 1: the agent sees a newest
number it did not apply at or below its own, and walks the log from 1 (ids it applied before
are skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js.errors import APIError, NotFoundError

from federation import subjects

log = logging.getLogger(__name__)

WRONG_LAST_SEQUENCE = 10071  # JetStream: "wrong last sequence" (the number is taken)
MAX_CONFLICTS = 8
POLL_S = 10.0
# A wake-up can outrun the store: the server routes the hub's publish to the agent's
# subscription and to the stream, which stores it on its own. A reader woken for number n
# that finds less reads again after 50 ms, doubling up to 1 s, for at most STORE_WAIT_S.
STORE_WAIT_S = 5.0
STORE_RETRY_S = (0.05, 1.0)


async def newest(js: Any, agent_id: str) -> tuple[int, bytes | None]:
    """(number, data) of the agent's newest command in the stream; (0, None) if none."""
    try:
        msg = await js.get_last_msg(subjects.COMMANDS_STREAM, subjects.commands_of(agent_id),
                                    direct=True)
    except NotFoundError:
        return 0, None
    return subjects.command_number(msg.subject), msg.data


async def get(js: Any, agent_id: str, number: int) -> bytes | None:
    """Command ``number`` of the agent, or None if the stream has none by that number."""
    try:
        msg = await js.get_last_msg(subjects.COMMANDS_STREAM,
                                    subjects.command(agent_id, number), direct=True)
    except NotFoundError:
        return None
    return bytes(msg.data or b"")


class CommandLog:
    """The hub's side: appends commands to each agent's log, one at a time per agent.

    ``_next`` caches each agent's next number (learned from the stream on first use);
    ``_locks`` serialise appends per agent so numbers stay dense."""

    def __init__(self, js: Any) -> None:
        self.js = js
        self._next: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def append(self, agent_id: str, data: bytes, msg_id: str) -> int:
        """Store ``data`` as the agent's next command; returns its number. A re-send of a
        command already stored (same ``msg_id``, within the duplicate window) stores nothing."""
        lock = self._locks.setdefault(agent_id, asyncio.Lock())
        async with lock:
            number = self._next.get(agent_id) or (await newest(self.js, agent_id))[0] + 1
            for _ in range(MAX_CONFLICTS):
                try:
                    ack = await self.js.publish(
                        subjects.command(agent_id, number), data,
                        headers={"Nats-Msg-Id": msg_id,
                                 "Nats-Expected-Last-Subject-Sequence": "0"})
                except APIError as err:
                    if err.err_code != WRONG_LAST_SEQUENCE:
                        raise
                    # Taken: by another hub, or by this very command whose ack was lost.
                    number = max(number, (await newest(self.js, agent_id))[0]) + 1
                    continue
                # A duplicate was stored earlier under another number: this one stays free.
                self._next[agent_id] = number if ack.duplicate else number + 1
                return number
            raise APIError(description=f"no free command number for {agent_id} after "
                           f"{MAX_CONFLICTS} tries")

    def forget(self, agent_id: str) -> None:
        """Drop an agent's cached number (revoked or removed)."""
        self._next.pop(agent_id, None)
        self._locks.pop(agent_id, None)


# Applies one command (its number and the signed envelope) and records it; ``is_applied``
# says whether an envelope's command id was applied before.
Apply = Callable[[int, bytes], Awaitable[None]]
IsApplied = Callable[[bytes], bool]


class CommandReader:
    """The agent's side: reads its own log from ``position`` (the last number it applied)."""

    def __init__(self, nc: Any, js: Any, agent_id: str, position: int, apply: Apply,
                 is_applied: IsApplied, *, poll_s: float = POLL_S,
                 store_wait_s: float = STORE_WAIT_S) -> None:
        self.nc, self.js, self.agent_id = nc, js, agent_id
        self.position = position
        self.apply = apply
        self.is_applied = is_applied
        self.poll_s = poll_s
        self.store_wait_s = store_wait_s
        self._wake = asyncio.Event()
        self._woken_for = 0  # the highest number a wake-up named, until it is read

    async def run(self) -> None:
        """Until cancelled (or the link fails): catch up, then wait for a wake-up or the tick."""
        sub = await self.nc.subscribe(subjects.commands_of(self.agent_id), cb=self._woken)
        try:
            while True:
                self._wake.clear()
                announced, self._woken_for = self._woken_for, 0
                await self.catch_up(announced)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _woken(self, msg: Any) -> None:
        with contextlib.suppress(Exception):  # a wake-up on an odd subject still wakes
            self._woken_for = max(self._woken_for, subjects.command_number(msg.subject))
        self._wake.set()

    async def _newest(self, announced: int) -> tuple[int, bytes | None]:
        """The newest command, waiting (bounded) for ``announced``, the number a wake-up
        named: the stream can be a moment behind the wake-up, and a catch-up that found it
        so would sleep until the tick. A number that never comes (forged, or never stored)
        is given up on and what the stream holds is read."""
        top, data = await newest(self.js, self.agent_id)
        if announced <= self.position:
            return top, data
        delay, deadline = STORE_RETRY_S[0], time.monotonic() + self.store_wait_s
        while top < announced:
            if time.monotonic() >= deadline:
                log.info("command %d was announced but is not in the stream after %.0f s; "
                         "reading what is there", announced, self.store_wait_s,
                         extra={"agent": self.agent_id})
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, STORE_RETRY_S[1])
            top, data = await newest(self.js, self.agent_id)
        return top, data

    def wake(self) -> None:
        """Look at the log now (the link came back: a wake-up may have been missed)."""
        self._wake.set()

    async def catch_up(self, announced: int = 0) -> None:
        """Apply every command after ``position`` up to the newest, in number order
        (``announced``: a number a wake-up named, see ``_newest``)."""
        top, data = await self._newest(announced)
        if top == 0 or data is None:
            return
        if top <= self.position:
            if self.is_applied(data):
                return  # nothing new
            log.warning("command numbering restarted at the hub (newest %d, applied up to %d);"
                        " reading from 1", top, self.position, extra={"agent": self.agent_id})
            self.position = 0
        for number in range(self.position + 1, top + 1):
            body = data if number == top else await get(self.js, self.agent_id, number)
            if body is not None:  # None: expired from the stream, or never stored
                await self.apply(number, body)
            self.position = number
