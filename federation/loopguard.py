"""The guard every long-lived loop runs its passes under: one error never ends a loop.

A pass that raises is logged with its traceback, counted in
``outpost_loop_errors_total{loop="..."}``, and the loop goes on after a short backoff that grows
while passes keep failing (0.1 s doubling to 5 s). Only cancellation ends a loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from federation.backend import Metric

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0


class InjectedFault(RuntimeError):
    """Raised by a pass a test asked to fail (``OUTPOST_FAULT_LOOP_ERRORS``)."""


class LoopGuard:
    """Counts failed passes per loop; ``inject`` makes a loop's first N passes raise."""

    def __init__(self, inject: Mapping[str, int] | None = None) -> None:
        self.errors: dict[str, int] = {}
        self._streak: dict[str, int] = {}
        self._inject = dict(inject or {})

    @contextmanager
    def guard(self, loop: str) -> Iterator[None]:
        """One pass of ``loop``: an exception in it is logged, counted and swallowed."""
        try:
            yield
            if self._inject.get(loop, 0) > 0:  # at the end of the pass: a context manager
                self._inject[loop] -= 1         # cannot skip its body
                raise InjectedFault(f"fault injected into loop {loop}")
        except Exception:
            self.errors[loop] = self.errors.get(loop, 0) + 1
            streak = self._streak[loop] = self._streak.get(loop, 0) + 1
            log.exception("loop %s: a pass failed (%d in a row); going on in %.1f s", loop,
                          streak, self.backoff(loop), extra={"loop": loop})
        else:
            self._streak[loop] = 0

    def backoff(self, loop: str) -> float:
        """Extra wait before the next pass while ``loop`` keeps failing (0 when it does not)."""
        streak = self._streak.get(loop, 0)
        return 0.0 if streak == 0 else min(BACKOFF_FIRST_S * 2 ** (streak - 1), BACKOFF_MAX_S)

    async def pause(self, loop: str, seconds: float) -> None:
        """The loop's own wait between passes, plus the backoff after failures."""
        await asyncio.sleep(seconds + self.backoff(loop))

    def metric(self, loops: tuple[str, ...] = ()) -> Metric:
        names = sorted({*loops, *self.errors})
        return Metric("outpost_loop_errors_total", "counter",
                      "Passes of a long-lived loop that failed (logged; the loop went on)",
                      [({"loop": n}, float(self.errors.get(n, 0))) for n in names])


def parse_inject(text: str) -> dict[str, int]:
    """``loop:N,loop:N`` (N defaults to 1) from a fault env var; bad parts are ignored."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, count = part.partition(":")
        out[name] = int(count) if count.isdigit() else 1
    return out


RECANCEL_S = 0.1  # how often stop_loops cancels again a loop that is still running
STOP_GRACE_S = 1.0  # how long a cancelled stop_loops still waits for its loops to end


async def stop_loops(*tasks: asyncio.Task[object] | None, errors: bool = True) -> None:
    """Cancel the loops' tasks and wait until they have ended.

    A loop still running is cancelled again every ``RECANCEL_S``: Python 3.11's
    ``asyncio.wait_for`` swallows a cancel that lands as its inner future completes, and a
    ``while True`` loop around it then goes on as if never told to stop (a 1,000-agent fleet
    hung in its stop). A cancellation of the caller itself is not swallowed (as ``cancel();
    with suppress(CancelledError): await task`` did, so ``wait_for(part.stop(), t)`` never
    ended after ``t``): it is raised once the loops have ended, or after ``STOP_GRACE_S`` at
    the latest, so a stop nested in a cancelled stop still finishes its loops first.
    With ``errors``, a loop that ended with an error raises it here, as awaiting it would."""
    pending = {task for task in tasks if task is not None}
    live = list(pending)
    clock = asyncio.get_running_loop().time
    cancelled: asyncio.CancelledError | None = None
    give_up = 0.0
    while pending:
        for task in pending:
            task.cancel()
        try:
            _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
        except asyncio.CancelledError as exc:
            if cancelled is None:
                cancelled, give_up = exc, clock() + STOP_GRACE_S
            pending = {task for task in pending if not task.done()}
        if cancelled is not None and clock() >= give_up:
            raise cancelled
    if cancelled is not None:
        raise cancelled
    for task in live:
        if errors and not task.cancelled() and (error := task.exception()) is not None:
            raise error
