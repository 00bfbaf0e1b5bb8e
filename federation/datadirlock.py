"""One process per data dir: an ``fcntl.flock`` on ``<data_dir>/lock`` held for the process life.

Two agents (or two hubs) on one data dir would both adopt the same tasks and write the same
store; the second one must stop before it touches anything. The lock is the kernel's, so it
goes away with the process however it dies (SIGKILL included); the pid written inside only names
the holder in the message the second process prints.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from federation.errors import ConfigError

LOCK_NAME = "lock"


class DataDirLocked(ConfigError):
    """Another live process holds this data dir (exit, naming its pid)."""

    code = "data_dir_locked"


class DataDirLock:
    """The held lock; ``release()`` at stop (the kernel releases it anyway at exit)."""

    def __init__(self, data_dir: Path, what: str) -> None:
        self.path = Path(data_dir) / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirLocked(
                f"data dir {data_dir} is in use by another {what} (pid {holder}); stop it "
                f"first or give this one its own --data-dir",
                details={"data_dir": str(data_dir), "pid": holder}) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None
