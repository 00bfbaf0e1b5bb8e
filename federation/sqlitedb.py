"""What the edge store and the hub view share about SQLite: pragmas, migrations, transactions.

Each store owns one connection used from its event loop (the single writer), in WAL mode, with
its schema versioned by ``PRAGMA user_version``. (A small runner rather than sqlite-utils:
importing sqlite-utils costs an idle edge agent ~13 MB RSS, a third of its memory budget.)
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def migrate(conn: sqlite3.Connection, migrations: Sequence[str], what: str) -> int:
    """Run the scripts ``conn`` has not run yet, each in one transaction; returns the version."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(migrations):
        raise RuntimeError(
            f"{what} schema {version} is newer than this version knows ({len(migrations)})")
    for number, script in enumerate(migrations[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return len(migrations)


def _statements(script: str) -> Iterator[str]:
    """The statements of ``script`` one by one (a trigger's body holds ``;`` of its own)."""
    pending = ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""
    if pending.strip(" \n;"):
        yield pending


def private_file(path: Path) -> None:
    """Create ``path`` with mode 0600, or tighten it to 0600: a store holds token digests and
    task environments. SQLite gives the -wal and -shm files the database file's mode."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):  # left by a version that did not make them private
        side = path.with_name(path.name + suffix)
        if side.exists() and side.stat().st_mode & 0o077:
            side.chmod(0o600)


class Database:
    """One SQLite file: the connection, its schema, and nestable transactions."""

    def __init__(self, path: Path, migrations: Sequence[str], what: str) -> None:
        self.path = Path(path)
        private_file(self.path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        migrate(self._db, migrations, what)
        self._in_tx = False
        self._after_commit: list[Callable[[], None]] = []
        self._on_rollback: list[Callable[[], None]] = []

    def close(self) -> None:
        self._db.close()

    def read(self, sql: str, args: Sequence[object] = ()) -> list[sqlite3.Row]:
        """Rows of one read query (the one writer still goes through ``transaction``)."""
        return self._db.execute(sql, args).fetchall()

    def _committed(self) -> None:
        """Called after each outermost commit (the edge store wakes its event readers)."""

    def after_commit(self, effect: Callable[[], None],
                     undo: Callable[[], None] | None = None) -> None:
        """Run ``effect`` once the outermost transaction has committed (at once outside one),
        or ``undo`` if it rolls back: intent is on disk before its effect happens."""
        if not self._in_tx:
            effect()
            return
        self._after_commit.append(effect)
        if undo is not None:
            self._on_rollback.append(undo)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit; nested use joins the outer transaction."""
        if self._in_tx:
            yield self._db
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._in_tx = True
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # sqlite may have rolled back itself (a full disk)
                self._db.execute("ROLLBACK")
            self._in_tx = False
            self._after_commit.clear()
            undo, self._on_rollback = self._on_rollback, []
            _run_all(undo)
            raise
        finally:
            self._in_tx = False
        effects, self._after_commit = self._after_commit, []
        self._on_rollback = []
        self._committed()
        _run_all(effects)


def _run_all(calls: list[Callable[[], None]]) -> None:
    """Each call runs even if one before it failed: the commit they follow already happened."""
    for call in calls:
        try:
            call()
        except Exception:
            log.exception("an after-commit step failed")
