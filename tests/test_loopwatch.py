"""The event-loop watchdog on a real asyncio loop: a callback that holds the loop is logged
with its own stack while it still holds it, then counted with how long it lasted."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from federation.loopwatch import LoopWatch


def hold_the_loop_synchronously(seconds: float) -> None:
    time.sleep(seconds)  # what a long SQLite transaction looks like to the loop


async def test_a_held_loop_is_logged_with_the_holders_stack(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="federation.loopwatch")
    watch = LoopWatch(threshold_s=0.3)
    watch.start()
    try:
        await asyncio.sleep(0.2)  # the loop turns
        hold_the_loop_synchronously(1.0)
        for _ in range(100):  # the watch notices the loop turning again on its next check
            if watch.longest_s:
                break
            await asyncio.sleep(0.05)
    finally:
        await watch.stop()
    # At least this stall (a box too busy to run this process at all looks like one, too).
    assert watch.stalls >= 1
    held = [r.getMessage() for r in caplog.records if "has been held" in r.getMessage()]
    assert any("hold_the_loop_synchronously" in message for message in held), held
    assert 0.3 <= watch.longest_s <= 60
    samples = {m.name: m.samples[0][1] for m in watch.metrics()}
    assert samples == {"outpost_event_loop_stalls_total": float(watch.stalls),
                       "outpost_event_loop_stall_seconds_max": watch.longest_s}


async def test_a_stopped_watch_can_start_again() -> None:
    watch = LoopWatch()
    watch.start()
    with pytest.raises(RuntimeError):
        watch.start()
    await watch.stop()
    await watch.stop()  # harmless
    watch.start()
    await watch.stop()
