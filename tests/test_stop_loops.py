"""A part's ``stop()`` must honour a cancellation of itself: the hub bounds every part's stop
with ``wait_for`` (core_hub/hub.py ``_bounded``) and a fleet of agents stops its syncs the same
way. ``task.cancel(); with suppress(CancelledError): await task`` swallowed the caller's own
cancel along with the loop's, so the bound never fired (a 1,000-agent simulator took 120 s to
stop)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from pathlib import Path

import pytest

from edge_agent.store import Store
from edge_agent.sync import Sync, SyncSettings
from federation import wire
from federation.identity import id_from_public_key, load_or_create_key
from federation.loopguard import stop_loops


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _slow_to_end(release: asyncio.Event) -> None:
    """A loop whose cancellation takes until ``release``, however often it is cancelled."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()
        raise


async def test_a_cancelled_stop_ends_within_its_grace_while_its_loop_is_still_ending() -> None:
    release = asyncio.Event()
    loop_task = asyncio.create_task(_slow_to_end(release))
    await asyncio.sleep(0)
    stopper = asyncio.create_task(stop_loops(loop_task))
    await asyncio.sleep(0.05)
    assert not stopper.done() and not loop_task.done()
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert not loop_task.done()  # the loop ends in its own time; the caller waited only
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await loop_task


async def test_stop_loops_raises_what_a_loop_died_of() -> None:
    async def broken() -> None:
        raise RuntimeError("the loop died")

    task = asyncio.create_task(broken())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="the loop died"):
        await stop_loops(task, None)


async def test_an_agent_sync_stop_can_be_cancelled(tmp_path: Path) -> None:
    """The real Sync of an agent whose NATS is not there (it keeps retrying)."""
    seed, public = load_or_create_key(tmp_path / "agent.key")
    store = Store(tmp_path / "agent.db")
    store.agent_id = id_from_public_key(public)
    store.site = "s1"
    sync = Sync(SyncSettings(f"nats://127.0.0.1:{_closed_port()}", "tok"), store,
                wire.Signer(seed), lambda: {}, lambda: {"tasks": []},
                lambda command: ("applied", None, {}), nats_key=seed)
    await sync.start()
    await asyncio.sleep(0.2)
    stopper = asyncio.create_task(sync.stop())
    await asyncio.sleep(0)  # the stop has cancelled the loops and waits for them
    stopper.cancel()
    try:
        with pytest.raises(asyncio.CancelledError):
            await stopper
    finally:
        await sync.stop()
        store.close()


async def _waiting_for_each(futures: list[asyncio.Future[None]]) -> None:
    """A loop that waits, under ``wait_for``, for one new future after another."""
    while True:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        futures.append(future)
        await asyncio.wait_for(future, 3600)


async def test_a_loop_whose_wait_for_swallowed_the_cancel_is_still_stopped() -> None:
    """Python 3.11's ``asyncio.wait_for`` returns the result, and drops the cancel, when its
    inner future completes in the same tick as the cancel: the loop around it goes on."""
    futures: list[asyncio.Future[None]] = []
    task = asyncio.create_task(_waiting_for_each(futures))
    await asyncio.sleep(0)
    futures[-1].set_result(None)  # completes as the stop's cancel lands
    await asyncio.wait_for(stop_loops(task), 10)
    assert task.cancelled()
    if sys.version_info < (3, 12):
        assert len(futures) >= 2, "the first cancel was swallowed: the loop went round again"


async def test_a_stop_nested_in_a_cancelled_stop_still_ends_its_loops() -> None:
    """The agent's sync: the outer stop cancels (again and again) the link task, whose
    ``finally`` stops the link's own loops; one of them swallows its first cancel. The outer
    stop must not return while an inner loop still runs (it would then use a closed store)."""
    futures: list[asyncio.Future[None]] = []
    inner_task: list[asyncio.Task[None]] = []

    async def link() -> None:
        inner_task.append(asyncio.create_task(_waiting_for_each(futures)))
        try:
            await asyncio.sleep(3600)
        finally:
            futures[-1].set_result(None)  # the inner loop's wait completes as it is cancelled
            await stop_loops(*inner_task, errors=False)

    outer = asyncio.create_task(link())
    await asyncio.sleep(0.01)
    await asyncio.wait_for(stop_loops(outer), 10)
    assert outer.cancelled() and inner_task[0].done()
