"""The event-loop watchdog on a real asyncio loop, and in a real edge agent: work that holds
the loop is logged with its own stack while it still holds it, then counted with how long it
lasted."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable

import pytest

from federation.loopwatch import LoopWatch
from tests.helpers import AgentProcess, wait_until


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


def _loop_metrics(agent: AgentProcess) -> dict[str, float]:
    text = agent.api("GET", "/metrics").raw.decode()
    return {name: float(value) for name, value in
            re.findall(r"^(outpost_event_loop_\w+) (\S+)$", text, re.M)}


def test_an_edge_agent_logs_and_counts_a_held_loop(
        start_agent: Callable[..., AgentProcess]) -> None:
    """A real agent process whose supervisor tick holds the loop 1.5 s (a fault hook standing
    for a slow SD card): the agent's log names the code holding it, /metrics counts it."""
    agent = start_agent(env={"OUTPOST_FAULT_HOLD_LOOP_S": "1.5"})
    wait_until(lambda: _loop_metrics(agent).get("outpost_event_loop_stall_seconds_max", 0) > 0,
               15, what="the stall counted once the loop turned again")
    counted = _loop_metrics(agent)
    assert counted["outpost_event_loop_stalls_total"] >= 1, counted
    assert 1.0 <= counted["outpost_event_loop_stall_seconds_max"] < 60, counted
    log = agent.log()
    assert "the event loop has been held" in log, log
    assert "hold_the_loop" in log and "_tick_loop" in log, log


def test_an_edge_agent_without_the_fault_reports_the_families_at_zero(
        start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent()
    counted = _loop_metrics(agent)
    assert set(counted) == {"outpost_event_loop_stalls_total",
                            "outpost_event_loop_stall_seconds_max"}, counted
