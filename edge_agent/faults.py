"""Fault hooks a test turns on through ``OUTPOST_FAULT_*`` env vars, to hit a failure window
for real (a SIGKILL between spawn and commit, a loop pass that raises). Read once by the
agent, off unless set; nothing here changes behaviour when no hook is set."""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field

from federation.loopguard import parse_inject


@dataclass(frozen=True, slots=True)
class Faults:
    """``stop_after_spawn``: the agent SIGSTOPs itself right after a task process is spawned,
    before that start is recorded (the test then SIGKILLs it in exactly that window);
    ``loop_errors``: loop name -> how many of its first passes raise
    (``OUTPOST_FAULT_LOOP_ERRORS=supervisor-tick:2,sync-heartbeat:1``)."""

    stop_after_spawn: bool = False
    loop_errors: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Faults:
        return cls(stop_after_spawn=env.get("OUTPOST_FAULT_STOP_AFTER_SPAWN") == "1",
                   loop_errors=parse_inject(env.get("OUTPOST_FAULT_LOOP_ERRORS", "")))

    def after_spawn(self) -> None:
        if self.stop_after_spawn:
            os.kill(os.getpid(), signal.SIGSTOP)


NO_FAULTS = Faults()
