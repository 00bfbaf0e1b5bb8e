"""Space kept back on the data dir's disk so the agent can record what it must when it is full.

A task can fill the disk the agent's store lives on. The agent keeps a ``reserve`` file (2 MB of
allocated blocks) in its data dir; when a write it must make (an exit, a kill) fails because the
disk is full, the reserve is released and the write tried again, and the supervisor's tick makes
the file again once that much space is free (with a margin, so the reserve never fills the disk).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

RESERVE_BYTES = 2 * 1024 * 1024
MARGIN_BYTES = 2 * 1024 * 1024  # free space left over before the reserve is made again


class Reserve:
    """The reserve file at ``path``; ``held`` says whether it exists now."""

    def __init__(self, path: Path, size: int = RESERVE_BYTES) -> None:
        self.path = path
        self.size = size
        self.released_total = 0

    @property
    def held(self) -> bool:
        try:
            return self.path.stat().st_size >= self.size
        except FileNotFoundError:
            return False

    def ensure(self) -> bool:
        """Make the reserve if it is missing and there is room for it and the margin."""
        if self.held:
            return True
        st = os.statvfs(self.path.parent)
        if st.f_bavail * st.f_frsize < self.size + MARGIN_BYTES:
            return False
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)  # blocks really allocated, not a hole
            finally:
                os.close(fd)
            tmp.replace(self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.info("cannot make the disk reserve %s yet: %s", self.path, exc)
            return False
        log.info("disk reserve %s in place (%d bytes)", self.path, self.size)
        return True

    def release(self) -> bool:
        """Free the reserve (the disk is full); False if there was none to free."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        self.released_total += 1
        log.warning("disk full: released the %d byte reserve %s so the agent can record what "
                    "it must", self.size, self.path)
        return True
