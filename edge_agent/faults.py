"""Fault hooks a test turns on through ``OUTPOST_FAULT_*`` env vars, to hit a failure window
for real (a SIGKILL between spawn and commit, a loop pass that raises). Read once by the
agent, off unless set; nothing here changes behaviour when no hook is set."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from federation.loopguard import parse_inject


@dataclass(frozen=True, slots=True)
class Faults:
    """``stop_after_spawn``: the agent SIGSTOPs itself right after a task process is spawned,
    before that start is recorded (the test then SIGKILLs it in exactly that window);
    ``loop_errors``: loop name -> how many of its first passes raise
    (``OUTPOST_FAULT_LOOP_ERRORS=supervisor-tick:2,sync-heartbeat:1``);
    ``hold_loop_s``: the supervisor's first tick holds the event loop that long, as a slow
    SQLite write on a worn SD card would (``OUTPOST_FAULT_HOLD_LOOP_S=1.5``);
    ``clock_behind_s``: the link judges its NATS JWT's lifetime by a wall clock this far
    behind, as a box with no RTC has before NTP (``OUTPOST_FAULT_CLOCK_BEHIND_S=30``)."""

    stop_after_spawn: bool = False
    loop_errors: dict[str, int] = field(default_factory=dict)
    hold_loop_s: float = 0.0
    clock_behind_s: float = 0.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Faults:
        return cls(stop_after_spawn=env.get("OUTPOST_FAULT_STOP_AFTER_SPAWN") == "1",
                   loop_errors=parse_inject(env.get("OUTPOST_FAULT_LOOP_ERRORS", "")),
                   hold_loop_s=_seconds(env.get("OUTPOST_FAULT_HOLD_LOOP_S", "")),
                   clock_behind_s=_seconds(env.get("OUTPOST_FAULT_CLOCK_BEHIND_S", "")))

    def wall_clock(self) -> float:
        """Unix seconds as this box's clock says (``clock_behind_s`` behind the real one)."""
        return time.time() - self.clock_behind_s

    def after_spawn(self) -> None:
        if self.stop_after_spawn:
            os.kill(os.getpid(), signal.SIGSTOP)

    def hold_the_loop(self) -> None:
        """Block the calling thread (the event loop's) for ``hold_loop_s``."""
        if self.hold_loop_s > 0:
            time.sleep(self.hold_loop_s)


def _seconds(text: str) -> float:
    """A fault's duration; anything but a non-negative number turns the fault off."""
    try:
        value = float(text)
    except ValueError:
        return 0.0
    return value if 0 <= value < 3600 else 0.0


NO_FAULTS = Faults()
