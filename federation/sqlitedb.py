"""What the edge store and the hub view share about SQLite: pragmas, migrations, transactions.

Each store owns one connection used from its event loop (the single writer), in WAL mode, with
its schema versioned by ``PRAGMA user_version``. (A small runner rather than sqlite-utils:
importing sqlite-utils costs an idle edge agent ~13 MB RSS, a third of its memory budget.)
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


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

    def close(self) -> None:
        self._db.close()

    def read(self, sql: str, args: Sequence[object] = ()) -> list[sqlite3.Row]:
        """Rows of one read query (the one writer still goes through ``transaction``)."""
        return self._db.execute(sql, args).fetchall()

    def _committed(self) -> None:
        """Called after each outermost commit (the edge store wakes its event readers)."""

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
            self._db.execute("ROLLBACK")
            raise
        finally:
            self._in_tx = False
        self._committed()
