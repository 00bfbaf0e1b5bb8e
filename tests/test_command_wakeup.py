"""A command's wake-up can reach the agent before JetStream has stored the command.

The hub publishes command ``n`` to ``outpost.v1.cmd.<agent>.<n>``: the server routes that one
message to the agent's core subscription (the wake-up) and to the stream, which stores it on a
goroutine of its own. Under load the agent's read (a direct get of its newest command) can
come first and find nothing new; the reader then slept until its safety tick (60 s at 30 s
heartbeats): in a 10,000-agent run the last drains took 106 s after the last was sent, and 2 of
10,000 were not applied within 120 s. The reader now knows the number the wake-up names and
reads again, shortly, until that number is stored (bounded).

Reproduced on a real nats-server: the stream stores what is published on ``staged.>`` under
the command subjects (a subject transform), so the test sends the wake-up alone first and
stores the command a moment later, with no second wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig, SubjectTransform

from federation import subjects
from federation.commandlog import CommandReader
from federation.natsd import NatsServer
from tests.nats_fixtures import connect

AGENT = "a" * 26  # an agent id's shape: 26 base32 characters
TICK_S = 60.0  # the reader's safety tick: far beyond what the test waits


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    async with connect(nats_server.url) as client:
        await client.jetstream().add_stream(StreamConfig(
            name=subjects.COMMANDS_STREAM, subjects=["staged.>"], allow_direct=True,
            subject_transform=SubjectTransform(src="staged.>", dest="outpost.v1.cmd.>")))
        yield client


async def test_a_wake_up_that_outran_the_store_is_not_lost(nc: Client) -> None:
    applied: list[tuple[int, bytes]] = []
    landed = asyncio.Event()

    async def apply(number: int, data: bytes) -> None:
        applied.append((number, data))
        landed.set()

    reader = CommandReader(nc, nc.jetstream(timeout=5), AGENT, 0, apply, lambda _d: False,
                           poll_s=TICK_S)
    running = asyncio.create_task(reader.run())
    try:
        await asyncio.sleep(0.3)  # subscribed, first catch-up done: nothing there
        await nc.publish(subjects.command(AGENT, 1), b"wake")  # the wake-up, not stored
        await nc.flush()
        await asyncio.sleep(0.3)  # the reader looked and found nothing yet
        await nc.jetstream().publish(f"staged.{AGENT}.1", b"command-1")  # stored, no wake-up
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(landed.wait(), 10)  # far below the 60 s tick
        assert applied == [(1, b"command-1")]
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running


async def test_a_wake_up_naming_a_number_never_stored_is_given_up(nc: Client) -> None:
    """A wake-up whose command never lands (forged, or from a hub that failed to store it)
    costs a few bounded reads, then the reader waits as before and reads on when it should."""
    applied: list[int] = []
    landed = asyncio.Event()

    async def apply(number: int, _data: bytes) -> None:
        applied.append(number)
        landed.set()

    reader = CommandReader(nc, nc.jetstream(timeout=5), AGENT, 0, apply, lambda _d: False,
                           poll_s=TICK_S)
    running = asyncio.create_task(reader.run())
    try:
        await asyncio.sleep(0.3)
        await nc.publish(subjects.command(AGENT, 99), b"wake")
        await nc.flush()
        await asyncio.sleep(0.3)
        await nc.jetstream().publish(f"staged.{AGENT}.1", b"command-1")
        # The stored command is applied once the reader gives up on 99 (within its bound).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(landed.wait(), 10)
        assert applied == [1]
        landed.clear()
        assert not running.done()
        await nc.publish(subjects.command(AGENT, 2), b"wake")  # a real next command
        await nc.jetstream().publish(f"staged.{AGENT}.2", b"command-2")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(landed.wait(), 10)
        assert applied == [1, 2]
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
