"""A watchdog for the event loop: a loop held by synchronous work is logged with its stack.

Everything a process serves (the API, heartbeats, NATS pings) waits while one callback runs.
Such stalls are invisible from inside the loop: by the time the loop can look, the culprit
has returned. So a task on the loop stamps the time every ``TICK_S``, and a thread checks
the stamp: once it is ``threshold_s`` old the thread logs a warning with the loop thread's
stack as it is at that moment (the code holding the loop), and when the loop turns again it
records how long the stall lasted. A reconnect storm's ingest held the hub's loop for up to
4 s this way before it was found with a throwaway sampler; this makes it a log line and a
metric.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback

from federation.backend import Metric
from federation.loopguard import stop_loops

log = logging.getLogger(__name__)

TICK_S = 0.05
THRESHOLD_S = 0.5
_STACK_FRAMES = 12  # the innermost ones: the loop's own frames above them say nothing


class LoopWatch:
    """Watches the running event loop from ``start()`` until ``stop()`` (both on the loop)."""

    def __init__(self, threshold_s: float = THRESHOLD_S) -> None:
        self.threshold_s = threshold_s
        self.stalls = 0  # stalls of at least threshold_s, ended or not
        self.longest_s = 0.0  # the longest that ended
        self._stamp = time.monotonic()
        self._loop_thread: int | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    def start(self) -> None:
        if self._ticker is not None:
            raise RuntimeError("loop watch already started")
        self._done.clear()
        self._loop_thread = threading.get_ident()
        self._stamp = time.monotonic()
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="loop-watch")
        self._thread = threading.Thread(target=self._watch, name="loop-watch", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._done.set()
        ticker, self._ticker = self._ticker, None
        await stop_loops(ticker)
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None

    def metrics(self) -> list[Metric]:
        return [
            Metric("outpost_event_loop_stalls_total", "counter",
                   f"Times the event loop was held by one piece of work for "
                   f"{self.threshold_s:g} s or more (each logged with its stack)",
                   [({}, float(self.stalls))]),
            Metric("outpost_event_loop_stall_seconds_max", "gauge",
                   "The longest such stall since start", [({}, self.longest_s)]),
        ]

    async def _tick(self) -> None:
        while True:
            self._stamp = time.monotonic()
            await asyncio.sleep(TICK_S)

    def _watch(self) -> None:
        stalled_since: float | None = None
        while not self._done.wait(TICK_S):
            stamp = self._stamp
            held = time.monotonic() - stamp - TICK_S  # the tick's own sleep is not a stall
            if held >= self.threshold_s and stalled_since != stamp:
                stalled_since = stamp
                self.stalls += 1
                log.warning("the event loop has been held for %.1f s; it is running:\n%s",
                            held, self._loop_stack(), extra={"held_s": round(held, 3)})
            elif stalled_since is not None and stamp != stalled_since:
                lasted = stamp - stalled_since - TICK_S
                self.longest_s = max(self.longest_s, lasted)
                log.warning("the event loop turned again after %.1f s", lasted,
                            extra={"held_s": round(lasted, 3)})
                stalled_since = None

    def _loop_stack(self) -> str:
        frame = sys._current_frames().get(self._loop_thread or -1)
        if frame is None:
            return "  (the loop's thread is gone)"
        return "".join(traceback.format_stack(frame)[-_STACK_FRAMES:]).rstrip()
