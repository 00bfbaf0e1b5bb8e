"""The edge's artifact cache: content-addressed files, bounded, shared by tasks, crash-safe.

Each artifact is one file ``blobs/<sha256>`` and one row in the ``artifacts`` table (name,
version, size, labels, where it came from, the hub's signed manifest when it came from the
core, last use). A file is written under ``parts/`` or ``spool/`` and renamed into ``blobs/``
only once its digest checked out, then its row is committed: after a crash or a reboot a row
always has its file, and start-up removes files without a row and rows without a file.

Bounded by ``artifact_cache_mb``: to make room, artifacts that no task which has not ended uses
(``task_artifacts``) go, least recently used first; when what is left is all in use, the add
is refused with ``CacheFull`` (409), which names the limit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from edge_agent.store import Store
from federation.backend import Page
from federation.errors import Conflict, NotFound
from federation.pagination import decode_cursor, encode_cursor
from federation.schemas import TERMINAL_STATES

log = logging.getLogger(__name__)

_ENDED = "(" + ",".join(f"'{s}'" for s in sorted(TERMINAL_STATES)) + ")"


class CacheFull(Conflict):
    """The cache cannot take an artifact: everything it holds is in use by live tasks."""

    code = "artifact_cache_full"


class ArtifactCache:
    """Files under ``root`` and their rows in the edge store; ``limit_bytes`` bounds the sum."""

    def __init__(self, store: Store, root: Path, limit_bytes: int) -> None:
        self.store = store
        self.root = root
        self.blobs, self.parts, self.spool = root / "blobs", root / "parts", root / "spool"
        for d in (self.blobs, self.parts, self.spool):
            d.mkdir(parents=True, exist_ok=True)
        self.limit_bytes = limit_bytes
        self.evicted = 0
        self._recover()

    def _recover(self) -> None:
        """After a crash: drop half-made uploads, rows without a file, files without a row
        (the fetches in ``parts/`` stay: they resume)."""
        for leftover in [*self.spool.iterdir(), *self.parts.glob("*.peer")]:
            leftover.unlink(missing_ok=True)  # a pull from a site peer starts again
        rows = {r["sha256"] for r in self.store.read("SELECT sha256 FROM artifacts")}
        files = {p.name for p in self.blobs.iterdir()}
        with self.store.transaction() as db:
            for sha in rows - files:
                db.execute("DELETE FROM artifacts WHERE sha256 = ?", (sha,))
        for name in files - rows:
            (self.blobs / name).unlink(missing_ok=True)
        if rows ^ files:
            log.info("artifact cache: %d rows without a file and %d files without a row "
                     "dropped after a crash", len(rows - files), len(files - rows))

    # ---------------------------------------------------------------- reads

    def path(self, sha: str) -> Path:
        return self.blobs / sha

    def get(self, sha: str) -> dict[str, Any] | None:
        rows = self.store.read("SELECT * FROM artifacts WHERE sha256 = ?", (sha,))
        return self._to_api(rows[0]) if rows else None

    def require(self, sha: str) -> dict[str, Any]:
        found = self.get(sha)
        if found is None:
            raise NotFound(f"no artifact sha256:{sha} here", details={"digest": f"sha256:{sha}"})
        return found

    def by_name(self, name: str, version: str) -> dict[str, Any] | None:
        rows = self.store.read("SELECT * FROM artifacts WHERE name = ? AND version = ? "
                               "ORDER BY created DESC LIMIT 1", (name, version))
        return self._to_api(rows[0]) if rows else None

    def page(self, name: str | None, limit: int, cursor: str | None) -> Page:
        after = ("", "", "")
        c = decode_cursor(cursor, n=str, v=str, s=str)
        if c is not None:
            after = (c["n"], c["v"], c["s"])
        sql = ("SELECT * FROM artifacts WHERE (name, version, sha256) > (?, ?, ?)"
               + (" AND name = ?" if name else "") + " ORDER BY name, version, sha256 LIMIT ?")
        args: list[Any] = [*after, *([name] if name else []), limit + 1]
        rows = self.store.read(sql, args)
        items = [self._to_api(r) for r in rows[:limit]]
        nxt = None
        if len(rows) > limit:
            last = rows[limit - 1]
            nxt = encode_cursor({"n": last["name"], "v": last["version"], "s": last["sha256"]})
        return Page(items, nxt)

    def users(self, sha: str) -> list[str]:
        """Tasks that have not ended and use this artifact."""
        return [r[0] for r in self.store.read(
            "SELECT ta.task_id FROM task_artifacts ta JOIN tasks t ON t.id = ta.task_id "
            f"WHERE ta.sha256 = ? AND t.state NOT IN {_ENDED}", (sha,))]

    def held(self, most: int = 1000) -> list[str]:
        """The digests held here, in a stable order (what the offer tells the core)."""
        return [r[0] for r in self.store.read(
            "SELECT sha256 FROM artifacts ORDER BY sha256 LIMIT ?", (most,))]

    def used_bytes(self) -> int:
        return int(self.store.read("SELECT coalesce(sum(size), 0) FROM artifacts")[0][0])

    def _to_api(self, row: Any) -> dict[str, Any]:
        return {"digest": f"sha256:{row['sha256']}", "sha256": row["sha256"],
                "name": row["name"], "version": row["version"], "size": row["size"],
                "labels": json.loads(row["labels"]), "created": row["created"],
                "origin": row["origin"], "signed": row["manifest"] is not None,
                "last_used": row["last_used"], "in_use_by": self.users(row["sha256"])}

    # ---------------------------------------------------------------- writes

    def bind(self, task_id: str, sha: str) -> None:
        """Record that ``task_id`` uses ``sha``: from now on it is not evicted nor deleted."""
        with self.store.transaction() as db:
            db.execute("INSERT OR IGNORE INTO task_artifacts(task_id, sha256) VALUES (?, ?)",
                       (task_id, sha))

    def has(self, sha: str) -> bool:
        return bool(self.store.read("SELECT 1 FROM artifacts WHERE sha256 = ?", (sha,)))

    def use(self, sha: str, task_id: str | None) -> bool:
        """If ``sha`` is here: mark it used now (and by ``task_id``) in one commit; True."""
        with self.store.transaction() as db:
            found = db.execute("UPDATE artifacts SET last_used = ? WHERE sha256 = ?",
                               (time.time(), sha)).rowcount
            if found and task_id is not None:
                db.execute("INSERT OR IGNORE INTO task_artifacts(task_id, sha256) "
                           "VALUES (?, ?)", (task_id, sha))
        return bool(found) and self.path(sha).exists()

    def local_sha(self, ref: dict[str, Any]) -> str | None:
        """The digest ``ref`` names, if it can be told here (a digest, or a name and version
        in the cache); None: ask the core."""
        if "digest" in ref:
            return str(ref["digest"]).removeprefix("sha256:")
        rows = self.store.read("SELECT sha256 FROM artifacts WHERE name = ? AND version = ? "
                               "ORDER BY created DESC LIMIT 1", (ref["name"], ref["version"]))
        return rows[0][0] if rows else None

    def touch(self, sha: str) -> None:
        with self.store.transaction() as db:
            db.execute("UPDATE artifacts SET last_used = ? WHERE sha256 = ?", (time.time(), sha))

    def make_room(self, size: int) -> None:
        """Evict unused artifacts, least recently used first, until ``size`` more fits."""
        if size > self.limit_bytes:
            raise CacheFull(f"artifact of {size} bytes is larger than the whole cache "
                            f"(artifact_cache_mb {self.limit_bytes >> 20})",
                            details={"limit": "artifact_cache_mb", "size": size})
        with self.store.transaction() as db:
            db.execute("DELETE FROM task_artifacts WHERE task_id NOT IN "
                       f"(SELECT id FROM tasks WHERE state NOT IN {_ENDED})")
        used = self.used_bytes()
        if used + size <= self.limit_bytes:
            return
        candidates = self.store.read(
            "SELECT sha256, size FROM artifacts WHERE sha256 NOT IN "
            "(SELECT sha256 FROM task_artifacts) ORDER BY last_used")
        for row in candidates:
            if used + size <= self.limit_bytes:
                break
            self._remove(row["sha256"])
            used -= row["size"]
            self.evicted += 1
            log.info("artifact cache: evicted sha256:%s (%d bytes, least recently used)",
                     row["sha256"], row["size"], extra={"digest": row["sha256"]})
        if used + size > self.limit_bytes:
            raise CacheFull(
                f"artifact cache full: {used} of {self.limit_bytes} bytes "
                f"(artifact_cache_mb {self.limit_bytes >> 20}) are used by tasks that have "
                f"not ended; {size} more do not fit. Kill some, or raise artifact_cache_mb",
                details={"limit": "artifact_cache_mb", "used": used, "size": size})

    def add(self, src: Path, *, sha: str, size: int, name: str, version: str,
            labels: dict[str, str], created: float, origin: str,
            manifest: bytes | None) -> dict[str, Any]:
        """Move the checked file ``src`` into the cache (making room first) and commit its row.
        An artifact already here keeps its file; a signed manifest replaces an unsigned one."""
        if self.get(sha) is not None and self.path(sha).exists():
            src.unlink(missing_ok=True)
            with self.store.transaction() as db:
                db.execute("UPDATE artifacts SET last_used = ?, manifest = "
                           "coalesce(?, manifest) WHERE sha256 = ?", (time.time(), manifest, sha))
            return self.require(sha)
        try:
            self.make_room(size)
        except CacheFull:
            src.unlink(missing_ok=True)
            raise
        os.replace(src, self.path(sha))
        with self.store.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO artifacts(sha256, name, version, size, labels, created,"
                " origin, manifest, last_used) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sha, name, version, size, json.dumps(labels), created, origin, manifest,
                 time.time()))
        return self.require(sha)

    def delete(self, sha: str) -> dict[str, Any]:
        found = self.require(sha)
        users = self.users(sha)
        if users:
            raise Conflict(f"artifact sha256:{sha} is used by {len(users)} task(s) that have "
                           "not ended", details={"tasks": users[:20]})
        self._remove(sha)
        return found

    def _remove(self, sha: str) -> None:
        with self.store.transaction() as db:  # the row first: a crash leaves a file, dropped
            db.execute("DELETE FROM artifacts WHERE sha256 = ?", (sha,))
        with contextlib.suppress(FileNotFoundError):
            self.path(sha).unlink()
