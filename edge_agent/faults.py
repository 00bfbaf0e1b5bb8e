"""Fault hooks a test turns on through ``OUTPOST_FAULT_*`` env vars, to hit a failure window
for real (a SIGKILL between spawn and commit, a loop pass that raises). Read once by the
agent, off unless set; nothing here changes behaviour when no hook is set."""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Faults:
    """``stop_after_spawn``: the agent SIGSTOPs itself right after a task process is spawned,
    before that start is recorded (the test then SIGKILLs it in exactly that window)."""

    stop_after_spawn: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Faults:
        return cls(stop_after_spawn=env.get("OUTPOST_FAULT_STOP_AFTER_SPAWN") == "1")

    def after_spawn(self) -> None:
        if self.stop_after_spawn:
            os.kill(os.getpid(), signal.SIGSTOP)


NO_FAULTS = Faults()
