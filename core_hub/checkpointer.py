"""Copies the hub view's WAL back into its database file on a thread of its own.

SQLite's writer checkpoints the WAL itself after a commit once it holds
``wal_autocheckpoint`` pages, and that copy and its two fsyncs then run on the hub's event
loop: 100-190 ms each time on the 2-core build box. So the store sets that mark high (the
safety net) and this thread checkpoints instead (PASSIVE: it never blocks the writer or
readers), poked after each commit, at most every ``interval_s``; sqlite3 releases the GIL
while SQLite works, so the copy runs on another core.

A PASSIVE checkpoint copies only the frames there are when it starts, and the WAL starts again
from its beginning only after a checkpoint copied every frame. Under a sustained ingest a
commit always lands while the thread copies, so the WAL never started again: it grew to the
safety mark and the writer checkpointed on the loop after all, once per 128 MB of WAL. The
writer therefore asks for a drain (``drain_requested`` / ``drained``) once the WAL is past a
lower mark and holds its next write (awaiting, the loop free) until a checkpoint the thread
started afterwards reports every frame copied: its next commit then starts the WAL again.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


class Checkpointer:
    """Checkpoints the WAL database at ``path`` from its construction until ``close()``, which
    waits for a checkpoint under way."""

    def __init__(self, path: Path, interval_s: float) -> None:
        self._path = path
        self._interval_s = interval_s
        self._cond = threading.Condition()
        self._poked = False
        self._urgent = False
        self._closing = False
        self._started = 0  # checkpoints begun
        self._finished = 0  # checkpoints ended, in the order they began
        self._complete = False  # whether the last one copied every frame
        self._ended_at = float("-inf")
        self.wal_frames = 0  # frames in the WAL as the last checkpoint found them
        self._thread = threading.Thread(target=self._run, name="hub-store-checkpoint",
                                        daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """A commit happened: checkpoint soon (within ``interval_s`` of the last one)."""
        with self._cond:
            self._poked = True
            self._cond.notify()

    def drain_requested(self) -> int:
        """Checkpoint now, not after the interval; returns the ticket ``drained`` takes."""
        with self._cond:
            self._urgent = True
            self._cond.notify()
            return self._started

    def drained(self, ticket: int) -> bool | None:
        """None while no checkpoint begun after ``ticket`` was taken has ended; then whether
        it copied every frame (no commit landed while it ran)."""
        with self._cond:
            return self._complete if self._finished > ticket else None

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def _next(self) -> bool:
        """Wait for the next checkpoint's time; False once closing."""
        with self._cond:
            while not self._closing and not self._urgent and not self._poked:
                self._cond.wait()
            due = self._ended_at + self._interval_s  # at most this often, unless urgent
            while not self._closing and not self._urgent and time.monotonic() < due:
                self._cond.wait(due - time.monotonic())
            if self._closing:
                return False
            self._poked = self._urgent = False
            self._started += 1
            return True

    def _run(self) -> None:
        try:
            db = sqlite3.connect(self._path, isolation_level=None)
        except sqlite3.Error as err:  # then the writer's safety net checkpoints
            log.warning("no WAL checkpoints for %s: %s", self._path, err)
            return
        failing = False
        try:
            while self._next():
                complete, frames = False, self.wal_frames
                try:
                    busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    complete = not busy and frames == copied
                    failing = False
                except sqlite3.Error as err:  # say so once, retry on the next commit
                    if not failing:
                        log.warning("WAL checkpoint of %s failed: %s", self._path, err)
                    failing = True
                with self._cond:
                    # Not 0 when complete: a checkpoint that ran inside a write transaction
                    # copies every frame and the WAL still goes on (its writer took its
                    # snapshot before), so only the next count says whether it started again.
                    self.wal_frames = max(frames, 0)
                    self._complete = complete
                    self._finished += 1
                    self._ended_at = time.monotonic()
        finally:
            db.close()
