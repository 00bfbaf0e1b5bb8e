"""The hub's SQLite view of the fleet: agents, their tasks, offers, command results, join tokens.

One connection, used only from the hub's event loop, is the single writer (CONVENTIONS 9):
ingest and enrollment share it and never ``await`` inside a transaction, so their writes cannot
interleave. Ingest applies an envelope's events, the agent's ``applied_seq`` and
``meta.stream_seq`` in one transaction; that is what makes "apply once, in order" survive a
crash at any point (DESIGN.md, guarantee 2).

Only this module writes SQL. Callers hand it checked values (ingest validates event bodies,
enrollment validates requests); read helpers return plain dicts ready for the API.

A thread of the store's own copies the WAL back into the database file
(``core_hub.checkpointer``, a second connection that only checkpoints and never writes rows),
so the writer does not stall on that copy and its fsyncs after its commits.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from core_hub.checkpointer import Checkpointer
from core_hub.migrations import MIGRATIONS
from federation.backend import TaskQuery
from federation.errors import BadRequest, NotFound
from federation.pagination import decode_cursor, encode_cursor
from federation.schemas import HISTORY_LIMIT, TERMINAL_STATES
from federation.sqlitedb import Database

log = logging.getLogger(__name__)

STREAM_SEQ = "stream_seq"
# Fields of an ``agent`` event the hub keeps, and how each is stored.
AGENT_TEXT_FIELDS = ("name", "site", "status", "version", "isolation")
AGENT_JSON_FIELDS = ("labels", "resources", "used", "outbox", "drivers")
_TERMINAL = tuple(sorted(TERMINAL_STATES))
# Nesting orjson.dumps writes (it refuses 255 levels): a stored task body is never deeper.
_MAX_DEPTH = 254
# The writer checkpoints the WAL itself only past this many pages (128 MB), a safety net: under
# a steady ingest each checkpoint on the thread overlaps the next commit, so without the drain
# below the WAL never started again, and the event loop paid for a copy and two fsyncs every
# 128 MB (100-190 ms each; at 16 MB it did so every ~9 commits).
_WAL_SAFETY_PAGES = 32768
# Past this many pages (64 MB) ingest holds its next write until the checkpointer has copied
# the whole WAL, so that the WAL starts again before the writer's own mark above is reached.
_WAL_DRAIN_PAGES = 16384
# The checkpointer thread copies the WAL back at most this often. Each checkpoint copies every
# page written since the one before, and ingest rewrites the same index pages in every commit:
# checkpoints every 50 ms copied most pages once per commit.
_CHECKPOINT_EVERY_S = 0.5
_LOOP_BUSY_MS = 50
_CACHE_KIB = 65536
_CHANGES_PRUNED = "placement_changes_pruned"  # meta: change rows up to here are gone
_CHANGES_KEEP = 100_000


def _dumps(value: Any) -> str:
    """Compact JSON text; orjson, since ingest encodes every task it stores."""
    return orjson.dumps(value).decode()


# A tasks row as upsert_task_rows takes it: id, agent_id, name, state, generation, body (JSON
# text), updated_at (None: the upsert's ``ts``).
TaskRow = tuple[str, str, str, str, int, str, float | None]
# (task_id, agent_id, seq, ts, state, exit_code, reason, generation, restarts)
HistoryRow = tuple[str, str, int, float, str, Any, Any, Any, Any]


def _service(row: Any) -> dict[str, Any]:
    """A ``services`` row (name, spec, created_at, updated_at) as the service dict."""
    return {**json.loads(row[1]), "name": row[0], "created_at": row[2], "updated_at": row[3]}


def task_row(agent_id: str, task: dict[str, Any], text: bytes | None = None) -> TaskRow:
    """The row that stores ``task`` (checked by the caller) for sender ``agent_id``.

    ``text`` is the JSON text ``task`` was just decoded from (with orjson), if any. A text
    that already names the sender as ``agent_id`` (an edge writes its own id into each task
    it reports) is stored as it came rather than encoded again: it is JSON that orjson read,
    so every reader decodes the same task from it. Otherwise, and for a text that may nest
    deeper than orjson writes (``json.loads`` fails not much deeper), ``agent_id`` is set in
    the dict and the dict encoded, as for a task without text."""
    if (text is not None and task.get("agent_id") == agent_id
            and text.count(b"[") + text.count(b"{") <= _MAX_DEPTH):
        body = text.decode()
    else:
        task["agent_id"] = agent_id
        body = _dumps(task)
    updated = task.get("updated_at")
    return (task["id"], agent_id, task["name"], task["state"], task.get("generation", 1), body,
            updated if isinstance(updated, int | float) else None)


@dataclass(frozen=True, slots=True)
class AgentKey:
    """What ingest needs per message: the current ``public_key`` (raw 32 bytes), whether the
    agent is ``revoked``, ``applied_seq`` (the last event seq applied from it), and
    ``retired`` (keys it had before rotations, oldest first, each with the last seq it may
    have signed: an envelope ending at or below that seq may carry that key's signature), and
    for a revoked agent ``revoked_after`` (the last seq the view had applied from it when it
    was revoked: a rebuilt view applies envelopes up to there, and none after)."""

    public_key: bytes
    revoked: bool
    applied_seq: int
    retired: tuple[tuple[bytes, int], ...] = ()
    revoked_after: int = 0

    def key_for(self, seq: int) -> bytes | None:
        """The retired key that signed an envelope ending at ``seq``, if one may have."""
        for public, until in self.retired:
            if seq <= until:
                return public
        return None


class HubStore(Database):
    """The fleet view on disk at ``path``; ``close()`` when done."""

    def __init__(self, path: Path, *, loop_writer: bool = False,
                 wal_safety_pages: int = _WAL_SAFETY_PAGES,
                 wal_drain_pages: int = _WAL_DRAIN_PAGES,
                 checkpoint_every_s: float = _CHECKPOINT_EVERY_S) -> None:
        super().__init__(path, MIGRATIONS, "hub store")
        self.wal_drain_pages = wal_drain_pages
        # The WAL is copied back into the database by a _Checkpointer thread, not by the writer
        # after its commits: ingest then never stalls on that copy and its fsyncs (~0.4 s per
        # 100k task events). Past _WAL_SAFETY_PAGES the writer still checkpoints itself, so
        # the WAL stays bounded even if the thread falls behind.
        self._db.execute(f"PRAGMA wal_autocheckpoint={int(wal_safety_pages)}")
        # Ingest's working set (every live task, its indexes, the agents) stays in memory:
        # with SQLite's default 2 MB each chunk re-read pages it had just written. Each
        # envelope is applied in a savepoint, whose page copies (the sub-journal) go to a
        # temp file unless temp_store is memory: a write() per page first touched.
        self._db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        self._db.execute("PRAGMA temp_store=MEMORY")
        if loop_writer:
            # The hub writes from its event loop: a lock another process holds (a CLI
            # command's write, or one frozen mid-write) may stall the loop this long at most,
            # not the 5 s those processes wait for the hub. The write fails instead (503 at
            # the API, a retry on the loop's next pass): heartbeats and reads go on.
            self._db.execute(f"PRAGMA busy_timeout={_LOOP_BUSY_MS}")
        self._checkpointer = Checkpointer(self.path, checkpoint_every_s)

    def close(self) -> None:
        self._checkpointer.close()
        super().close()

    def _committed(self) -> None:
        self._checkpointer.poke()

    @property
    def wal_wants_draining(self) -> bool:
        """True once the WAL (as the checkpointer last found it) is past ``wal_drain_pages``:
        a writer that can wait should, with ``drain_wal_requested`` and ``wal_drained``."""
        return self._checkpointer.wal_frames >= self.wal_drain_pages

    def drain_wal_requested(self) -> int:
        return self._checkpointer.drain_requested()

    def wal_drained(self, ticket: int) -> bool | None:
        return self._checkpointer.drained(ticket)

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Inside a transaction: undo only this block's writes if it raises."""
        assert self._in_tx, "a savepoint lives inside a transaction"
        self._db.execute("SAVEPOINT one")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK TO one")
            self._db.execute("RELEASE one")
            raise
        self._db.execute("RELEASE one")

    # ------------------------------------------------------------ meta

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                       "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    @property
    def stream_seq(self) -> int:
        """Every OUTPOST_EVENTS message up to this stream sequence has been dealt with."""
        value = self.get_meta(STREAM_SEQ)
        return int(value) if value is not None else 0

    def set_stream_seq(self, seq: int) -> None:
        self.set_meta(STREAM_SEQ, str(seq))

    # ------------------------------------------------------------ agents: registry

    def agent_key(self, agent_id: str) -> AgentKey | None:
        row = self._db.execute(f"SELECT {_KEY_COLUMNS} FROM agents WHERE id = ?",
                               (agent_id,)).fetchone()
        return None if row is None else _agent_key(row)

    def agent_keys(self, agent_ids: Collection[str]) -> dict[str, AgentKey]:
        """``agent_key`` of each of ``agent_ids`` that is known, in one query per
        ``_IN_LIMIT`` ids (ingest reads a chunk's keys at once, not one query per envelope)."""
        ids = list(agent_ids)
        out: dict[str, AgentKey] = {}
        for at in range(0, len(ids), _IN_LIMIT):
            part = ids[at:at + _IN_LIMIT]
            marks = ", ".join("?" * len(part))
            for row in self._db.execute(f"SELECT {_KEY_COLUMNS}, id FROM agents"
                                        f" WHERE id IN ({marks})", part):
                out[row[5]] = _agent_key(row)
        return out

    def nats_revocations(self) -> list[tuple[bytes, float | None, list[tuple[str, float]],
                                             float]]:
        """(current key, revoked_at if revoked (0.0 when unknown) else None, retired keys as
        (hex, rotated at), enrolled_at) of every agent that is revoked or has rotated: what
        the NATS account must refuse (``core_hub/natsauth.revocations``)."""
        rows = self._db.execute(
            "SELECT public_key, revoked, revoked_at, retired_keys, enrolled_at FROM agents"
            " WHERE revoked = 1 OR retired_keys != '[]'").fetchall()
        return [(bytes(row[0]), float(row[2] or 0.0) if row[1] else None,
                 [(str(k[0]), float(k[2]) if len(k) > 2 and k[2] is not None else 0.0)
                  for k in json.loads(row[3] or "[]")], float(row[4] or 0.0)) for row in rows]

    def agent_with_key(self, public_key: bytes) -> str | None:
        """The id of the agent whose current or a retired key is ``public_key``, if any (a key
        belongs to one agent, ever)."""
        row = self._db.execute(
            "SELECT id FROM agents WHERE public_key = ? UNION ALL"
            " SELECT agent_id FROM retired_agent_keys WHERE public_key_hex = ? LIMIT 1",
            (public_key, public_key.hex())).fetchone()
        return None if row is None else str(row[0])

    def enroll_agent(self, agent_id: str, public_key: bytes, *, name: str, site: str,
                     labels: dict[str, str], resources: dict[str, Any], version: str,
                     now: float) -> None:
        """Add an agent, or refresh the labels and version of one enrolled with this key (its
        name, site and resources stay as enrolled: ``set_enrollment`` changes them)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO agents(id, public_key, name, site, labels, resources, version,"
                " enrolled_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET"
                " labels = excluded.labels, version = excluded.version"
                " WHERE agents.public_key = excluded.public_key",
                (agent_id, public_key, name, site, _dumps(labels), _dumps(resources), version,
                 now))

    def forget_agent(self, agent_id: str, *, refund_token: str | None = None) -> None:
        """Remove an agent enrolled just now whose enrollment could not be finished (nothing
        refers to it yet), and give its join token the use back."""
        with self.transaction() as db:
            db.execute("DELETE FROM offers WHERE agent_id = ?", (agent_id,))
            db.execute("DELETE FROM agents WHERE id = ?", (agent_id,))
            if refund_token is not None:
                db.execute("UPDATE join_tokens SET uses_left = uses_left + 1"
                           " WHERE digest = ? AND uses_left IS NOT NULL", (refund_token,))

    def agent_named(self, name: str) -> str | None:
        """The id of the agent (not revoked) called ``name``, if any: names are unique."""
        row = self._db.execute("SELECT id FROM agents WHERE name = ? AND revoked = 0"
                               " ORDER BY enrolled_at LIMIT 1", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_enrollment(self, agent_id: str, *, name: str | None = None,
                       site: str | None = None,
                       resources: dict[str, Any] | None = None) -> None:
        """An admin's change of what an agent is enrolled as (its name, site or resources)."""
        fields = {k: v for k, v in (("name", name), ("site", site)) if v is not None}
        if resources is not None:
            fields["resources"] = _dumps(resources)
        if fields:
            with self.transaction() as db:
                db.execute(f"UPDATE agents SET {', '.join(f'{k} = ?' for k in fields)}"
                           " WHERE id = ?", (*fields.values(), agent_id))

    def revoke_agent(self, agent_id: str, now: float | None = None,
                     after_seq: int | None = None) -> bool:
        """Distrust an agent from now on: its events are rejected, it cannot re-enroll, it gets
        no placements, and its status is ``revoked`` for good. Returns False if it already was
        (revoking twice is harmless); raise NotFound for an unknown id. ``after_seq`` (default:
        what this view applied from it) is the last of its events that still counts."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM agents WHERE id = ?", (agent_id,)).fetchone() is None:
                raise NotFound(f"agent {agent_id!r} not found", details={"agent": agent_id})
            changed = db.execute(
                "UPDATE agents SET revoked = 1, status = 'revoked', revoked_at = ?,"
                " revoked_after_seq = COALESCE(?, applied_seq) WHERE id = ? AND revoked = 0",
                (now, after_seq, agent_id)).rowcount
            db.execute("DELETE FROM offers WHERE agent_id = ?", (agent_id,))
        return bool(changed)

    def rotate_agent_key(self, agent_id: str, old_key: bytes, new_key: bytes, until: int,
                         now: float) -> None:
        """Make ``new_key`` the agent's key; ``old_key`` stays valid only for envelopes ending
        at or below seq ``until`` (those the agent signed before the rotation)."""
        with self.transaction() as db:
            row = db.execute("SELECT retired_keys FROM agents WHERE id = ? AND public_key = ?",
                             (agent_id, old_key)).fetchone()
            if row is None:
                raise NotFound(f"agent {agent_id!r} with that key not found",
                               details={"agent": agent_id})
            retired = [*json.loads(row[0]), [old_key.hex(), until, now]]
            db.execute("UPDATE agents SET public_key = ?, retired_keys = ? WHERE id = ?",
                       (new_key, _dumps(retired), agent_id))

    def restore_agent_keys(self, agent_id: str, public_key: bytes,
                           retired: list[list[Any]]) -> None:
        """Set an agent's current and retired keys as the registry recorded them."""
        with self.transaction() as db:
            db.execute("UPDATE agents SET public_key = ?, retired_keys = ? WHERE id = ?",
                       (public_key, _dumps(retired), agent_id))

    # ------------------------------------------------------------ agents: applying events

    def set_applied_seq(self, agent_id: str, seq: int, seen_ts: float) -> None:
        self.set_applied_seqs([(seq, seen_ts, agent_id)])

    def set_applied_seqs(self, rows: Iterable[tuple[int, float, str]]) -> None:
        """(applied seq, seen ts, agent id) for each agent: its envelopes up to that seq are
        applied; it was seen at that ts (if later than what is known)."""
        self._db.executemany(
            "UPDATE agents SET applied_seq = ?, last_seen = MAX(COALESCE(last_seen, 0), ?)"
            " WHERE id = ?", rows)

    def set_last_seen(self, agent_id: str, ts: float) -> None:
        self._db.execute("UPDATE agents SET last_seen = MAX(COALESCE(last_seen, 0), ?)"
                         " WHERE id = ?", (ts, agent_id))

    def update_agent_record(self, agent_id: str, record: dict[str, Any]) -> None:
        """Apply the known fields of an ``agent`` event; absent fields keep their value."""
        cols: list[str] = []
        values: list[Any] = []
        for field in AGENT_TEXT_FIELDS:
            if field in record:
                cols.append(f"{field} = ?")
                values.append(record[field])
        for field in AGENT_JSON_FIELDS:
            if field in record:
                cols.append(f"{field} = ?")
                values.append(_dumps(record[field]))
        if cols:
            self._db.execute(f"UPDATE agents SET {', '.join(cols)} WHERE id = ?",
                             (*values, agent_id))

    # ------------------------------------------------------------ tasks, offers, results

    def upsert_tasks(self, agent_id: str, tasks: Iterable[dict[str, Any]], ts: float) -> int:
        """Store each task as the agent reported it, in order, with ``agent_id`` set (in the
        dict too) to the sender; returns how many were refused because the id belongs to a
        task of another agent (an agent speaks only for its own)."""
        return self.upsert_task_rows([task_row(agent_id, task) for task in tasks], ts)

    def upsert_task_rows(self, rows: list[TaskRow], ts: float) -> int:
        """``upsert_tasks`` for rows made by ``task_row``; ``ts`` is the ``updated_at`` of
        a row whose task has no number there."""
        if not rows:
            return 0
        if any(row[6] is None for row in rows):
            rows = [row if row[6] is not None else (*row[:6], ts) for row in rows]
        changed = self._db.executemany(
            "INSERT INTO tasks(id, agent_id, name, state, generation, body, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET"
            " name = excluded.name, state = excluded.state, generation = excluded.generation,"
            " body = excluded.body, updated_at = excluded.updated_at"
            " WHERE tasks.agent_id = excluded.agent_id", rows).rowcount
        return len(rows) - changed

    def add_history(self, rows: list[HistoryRow]) -> None:
        """Record task state changes (``HistoryRow``); a replayed one is ignored."""
        self._db.executemany(
            "INSERT OR IGNORE INTO task_history(task_id, agent_id, seq, ts, state, exit_code,"
            " reason, generation, restarts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def task_history(self, task_id: str) -> list[dict[str, Any]]:
        """The newest changes the task's own agent reported, oldest first (raw; callers
        collapse them with ``federation.history``)."""
        rows = self._db.execute(
            "SELECT ts, state, exit_code, reason, generation, restarts FROM task_history"
            " WHERE task_id = ? AND agent_id = (SELECT agent_id FROM tasks WHERE id = ?)"
            " ORDER BY seq DESC LIMIT ?", (task_id, task_id, 4 * HISTORY_LIMIT)).fetchall()
        keys = ("ts", "state", "exit_code", "reason", "generation", "restarts")
        return [dict(zip(keys, row, strict=True)) for row in reversed(rows)]

    def prune_history(self, task_ids: Iterable[str], keep: int = 2 * HISTORY_LIMIT) -> int:
        """Keep only the newest ``keep`` rows of each of ``task_ids`` (the tasks that got rows
        lately: a sweep of the whole table would stall ingest on a big fleet)."""
        with self.transaction() as db:
            over = [row[0] for row in db.execute(
                "SELECT task_id FROM task_history WHERE task_id IN"
                " (SELECT value FROM json_each(?)) GROUP BY task_id HAVING count(*) > ?",
                (_dumps(sorted(set(task_ids))), keep))]
            dropped = 0
            for task_id in over:
                dropped += db.execute(
                    "DELETE FROM task_history WHERE task_id = ? AND (agent_id, seq) NOT IN"
                    " (SELECT agent_id, seq FROM task_history WHERE task_id = ?"
                    " ORDER BY seq DESC LIMIT ?)", (task_id, task_id, keep)).rowcount
        return dropped

    def mark_missing_lost(self, agent_id: str, present: Iterable[str], ts: float,
                          reason: str) -> list[str]:
        """Mark ``lost`` the agent's unfinished tasks not in ``present``; returns their ids."""
        marks = ",".join("?" * len(_TERMINAL))
        rows = self._db.execute(
            "UPDATE tasks SET state = 'lost', updated_at = ?,"
            " body = json_set(body, '$.state', 'lost', '$.reason', ?, '$.updated_at', ?)"
            f" WHERE agent_id = ? AND state NOT IN ({marks})"
            " AND id NOT IN (SELECT value FROM json_each(?))"
            # A launch still on its way is not lost: the edge has not seen it yet.
            " AND id NOT IN (SELECT task_id FROM launches WHERE status = 'sent')"
            " RETURNING id",
            (ts, reason, ts, agent_id, *_TERMINAL, _dumps(list(present)))).fetchall()
        return sorted(row[0] for row in rows)

    # ------------------------------------------------------------ API tokens

    def add_api_token(self, digest: str, role: str, name: str, now: float) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO api_tokens(digest, role, name, created_at) VALUES"
                       " (?, ?, ?, ?)", (digest, role, name, now))

    def api_token_role(self, digest: str) -> str | None:
        row = self._db.execute("SELECT role FROM api_tokens WHERE digest = ? AND revoked = 0",
                               (digest,)).fetchone()
        return None if row is None else str(row[0])

    def api_tokens(self) -> list[dict[str, Any]]:
        return [{k: r[k] for k in r.keys()} for r in self._db.execute(  # noqa: SIM118
            "SELECT digest, role, name, created_at, revoked FROM api_tokens ORDER BY created_at")]

    def revoke_api_token(self, prefix: str) -> str:
        rows = self._db.execute("SELECT digest FROM api_tokens WHERE digest LIKE ? || '%'",
                                (prefix.lower(),)).fetchall()
        if len(prefix) < 6 or not rows:
            raise NotFound(f"no API token matches {prefix[:16]!r} (give 6+ characters)")
        if len(rows) > 1:
            raise BadRequest(f"API token prefix {prefix!r} matches several tokens")
        with self.transaction() as db:
            db.execute("UPDATE api_tokens SET revoked = 1 WHERE digest = ?", (rows[0][0],))
        return str(rows[0][0])

    # ------------------------------------------------------------ services

    def put_service(self, name: str, spec: dict[str, Any], now: float) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO services(name, spec, created_at, updated_at) VALUES"
                       " (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET spec = excluded.spec,"
                       " updated_at = excluded.updated_at", (name, _dumps(spec), now, now))

    def delete_service(self, name: str) -> None:
        with self.transaction() as db:
            if db.execute("DELETE FROM services WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"service {name!r} not found", details={"service": name})

    def services(self) -> list[dict[str, Any]]:
        return [_service(r) for r in self._db.execute(
            "SELECT name, spec, created_at, updated_at FROM services ORDER BY name")]

    def service(self, name: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT name, spec, created_at, updated_at FROM services"
                               " WHERE name = ?", (name,)).fetchone()
        return None if row is None else _service(row)

    # ------------------------------------------------------------ core placements

    def save_launch(self, task_id: str, *, spec: dict[str, Any], agent_id: str | None,
                    command_id: str | None, status: str, excluded: list[str],
                    reason: str | None, now: float) -> None:
        """Record where a core-placed task goes (before the launch is sent: write-ahead)."""
        self._db.execute(
            "INSERT INTO launches(task_id, spec, agent_id, command_id, status, excluded, reason,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(task_id)"
            " DO UPDATE SET agent_id = excluded.agent_id, command_id = excluded.command_id,"
            " status = excluded.status, excluded = excluded.excluded, reason = excluded.reason,"
            " updated_at = excluded.updated_at",
            (task_id, _dumps(spec), agent_id, command_id, status, _dumps(excluded), reason,
             now, now))

    def prune_launches(self, before: float, limit: int = 1000) -> int:
        """Delete launch records that are settled (accepted, cancelled or set aside) and last
        changed before ``before``, whose task has ended or is gone: nothing reads them again
        (a kill of an ended task sends nothing), and kept they grow the view and its KV
        mirror with every task the core ever placed. Returns how many went."""
        marks = ",".join("?" * len(_TERMINAL))
        with self.transaction() as db:
            return int(db.execute(
                "DELETE FROM launches WHERE task_id IN (SELECT l.task_id FROM launches l"
                " LEFT JOIN tasks t ON t.id = l.task_id"
                " WHERE l.status IN ('accepted', 'cancelled', 'set_aside') AND l.updated_at < ?"
                f" AND (t.id IS NULL OR t.state IN ({marks})) LIMIT ?)",
                (before, *_TERMINAL, limit)).rowcount)

    def launches(self, *statuses: str, task_id: str | None = None) -> list[dict[str, Any]]:
        """Launch records in ``statuses`` (oldest first), with their results; with
        ``task_id``, that task's only."""
        marks = ",".join("?" * len(statuses))
        only = "" if task_id is None else " AND l.task_id = ?"
        rows = self._db.execute(
            "SELECT l.*, r.status AS result, r.body AS result_body, r.ts AS result_ts"
            " FROM launches l"
            " LEFT JOIN results r ON r.command_id = l.command_id"
            f" WHERE l.status IN ({marks}){only} ORDER BY l.created_at",
            (*statuses, *(() if task_id is None else (task_id,)))).fetchall()
        out = []
        for row in rows:
            item = {k: row[k] for k in row.keys()}  # noqa: SIM118 (Row is not a Mapping)
            item["spec"] = json.loads(item["spec"])
            item["excluded"] = json.loads(item["excluded"])
            out.append(item)
        return out

    def put_core_task(self, task: dict[str, Any], now: float) -> None:
        """The core's own record of a task it placed, until the edge reports it."""
        self._db.execute(
            "INSERT INTO tasks(id, agent_id, name, state, generation, body, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET"
            " agent_id = excluded.agent_id, state = excluded.state, body = excluded.body,"
            " updated_at = excluded.updated_at",
            (task["id"], task.get("agent_id") or "", task["name"], task["state"],
             task.get("generation", 1), _dumps(task), now))

    def upsert_offer(self, agent_id: str, offer: dict[str, Any]) -> None:
        offer["agent_id"] = agent_id
        self._db.execute(
            "INSERT INTO offers(agent_id, body, expires_at) VALUES (?, ?, ?)"
            " ON CONFLICT(agent_id) DO UPDATE SET body = excluded.body,"
            " expires_at = excluded.expires_at",
            (agent_id, _dumps(offer), float(offer["expires_at"])))

    def delete_offer(self, agent_id: str) -> None:
        self._db.execute("DELETE FROM offers WHERE agent_id = ?", (agent_id,))

    def insert_result(self, agent_id: str, result: dict[str, Any], ts: float) -> None:
        """Record a command's outcome; the first report of a command id is the one kept."""
        self._db.execute(
            "INSERT INTO results(command_id, agent_id, status, body, ts) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(command_id) DO NOTHING",
            (result["command_id"], agent_id, result["status"], _dumps(result), ts))

    # ------------------------------------------------------------ reads

    def get_agent(self, agent_id: str) -> dict[str, Any]:
        row = self._db.execute("SELECT * FROM agents WHERE id = ?", (agent_id,)).fetchone()
        if row is None:
            raise NotFound(f"agent {agent_id!r} not found", details={"agent": agent_id})
        return _agent(row)

    def enrollment(self, agent_id: str) -> dict[str, Any]:
        """What the agent enrolled as (``name``, ``site``, ``resources``), which ingest checks
        every agent record and offer against: those columns only, not ``get_agent``'s whole
        decoded row (3 % of the hub at steady state, an offer each few seconds per agent)."""
        row = self._db.execute("SELECT name, site, resources FROM agents WHERE id = ?",
                               (agent_id,)).fetchone()
        if row is None:
            raise NotFound(f"agent {agent_id!r} not found", details={"agent": agent_id})
        return {"name": row[0], "site": row[1], "resources": json.loads(row[2])}

    def list_agents(self, *, site: str | None = None) -> list[dict[str, Any]]:
        if site is None:
            rows = self._db.execute("SELECT * FROM agents ORDER BY id").fetchall()
        else:
            rows = self._db.execute("SELECT * FROM agents WHERE site = ? ORDER BY id",
                                    (site,)).fetchall()
        return [_agent(row) for row in rows]

    def agents_by_id(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The agents among ``ids`` (unknown ids left out): a pass over a service's instances
        reads their agents, not the fleet."""
        wanted = sorted(set(ids))
        found: dict[str, dict[str, Any]] = {}
        for at in range(0, len(wanted), 500):
            part = wanted[at:at + 500]
            for row in self._db.execute(
                    f"SELECT * FROM agents WHERE id IN ({','.join('?' * len(part))})", part):
                found[row["id"]] = _agent(row)
        return found

    def page_agents(self, after: str, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` agents with an id after ``after``, in id order (decodes only those)."""
        rows = self._db.execute("SELECT * FROM agents WHERE id > ? ORDER BY id LIMIT ?",
                                (after, limit)).fetchall()
        return [_agent(row) for row in rows]

    def find_agent(self, ref: str) -> dict[str, Any] | None:
        """The agent whose id, or else whose name, is ``ref``: names are unique among agents
        not revoked, so one of those wins over a revoked one of the same name."""
        row = self._db.execute("SELECT * FROM agents WHERE id = ?", (ref,)).fetchone() or \
            self._db.execute("SELECT * FROM agents WHERE name = ? ORDER BY revoked, enrolled_at"
                             " LIMIT 1", (ref,)).fetchone()
        return None if row is None else _agent(row)

    def get_task(self, task_id: str) -> dict[str, Any]:
        row = self._db.execute("SELECT body FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise NotFound(f"task {task_id!r} not found", details={"task": task_id})
        task: dict[str, Any] = json.loads(row[0])
        return task

    def find_task(self, ref: str) -> dict[str, Any]:
        """A task by id, or by an unambiguous id prefix of 6+ characters (as at the edge)."""
        row = self._db.execute("SELECT body FROM tasks WHERE id = ?", (ref,)).fetchone()
        if row is None and 6 <= len(ref) < 32 and ref.isalnum():
            rows = self._db.execute("SELECT body FROM tasks WHERE id >= ? AND id < ? LIMIT 2",
                                    (ref, ref + "\U0010ffff")).fetchall()
            if len(rows) > 1:
                raise BadRequest(f"task id prefix {ref!r} is ambiguous", details={"task": ref})
            row = rows[0] if rows else None
        if row is None:
            raise NotFound(f"task {ref!r} not found", details={"task": ref})
        task: dict[str, Any] = json.loads(row[0])
        return task

    def active_placements(self, name: str,
                          revision: str | None = None) -> list[tuple[str, str]]:
        """(agent id, its site) of each active task called ``name`` that has an agent; with
        ``revision``, only the tasks labelled with that service revision."""
        marks = ",".join("?" * len(_TERMINAL))
        where, args = "", ()
        if revision is not None:
            where = " AND json_extract(t.body, '$.labels.\"outpost.revision\"') = ?"
            args = (revision,)
        return [(row[0], row[1]) for row in self._db.execute(
            "SELECT t.agent_id, COALESCE(a.site, '') FROM tasks t"
            " LEFT JOIN agents a ON a.id = t.agent_id"
            f" WHERE t.name = ? AND t.agent_id != '' AND t.state NOT IN ({marks}){where}",
            (name, *_TERMINAL, *args))]

    def list_tasks(self, *, agent_id: str | None = None, state: str | None = None,
                   name: str | None = None, active: bool = False) -> list[dict[str, Any]]:
        where: list[str] = []
        args: list[Any] = []
        if name is not None:
            where.append("name = ?")
            args.append(name)
        if active:
            where.append(f"state NOT IN ({','.join('?' * len(_TERMINAL))})")
            args.extend(_TERMINAL)
        if agent_id is not None:
            where.append("agent_id = ?")
            args.append(agent_id)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        sql = "SELECT body FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [json.loads(row[0]) for row in self._db.execute(sql + " ORDER BY id", args)]

    def page_tasks(self, query: TaskQuery, *, agent_ids: list[str] | None = None
                   ) -> tuple[list[tuple[str, str, str]], str | None]:
        """One page of tasks in id order (``agent_ids`` narrows to those agents, a site) as
        (body JSON text, agent id, state), and the next cursor.

        Bodies stay text so a page can go out without being decoded and encoded again; the
        caller decodes only the few it must rewrite (by agent and state).
        """
        where: list[str] = []
        args: list[Any] = []
        recent = query.order == "recent"
        pos = (decode_cursor(query.cursor, u=float, id=str) if recent
               else decode_cursor(query.cursor, id=str))
        if pos is not None and recent:
            where.append("(updated_at < ? OR (updated_at = ? AND id < ?))")
            args.extend((pos["u"], pos["u"], pos["id"]))
        elif pos is not None:
            where.append("id > ?")
            args.append(pos["id"])
        if query.states:
            where.append(f"state IN ({','.join('?' * len(query.states))})")
            args.extend(query.states)
        if query.name:
            where.append("name = ?")
            args.append(query.name)
        if query.agent_id:
            where.append("agent_id = ?")
            args.append(query.agent_id)
        if agent_ids is not None:
            where.append(f"agent_id IN ({','.join('?' * len(agent_ids))})")
            args.extend(agent_ids)
        if query.label:
            where.append("json_extract(body, '$.labels.\"' || ? || '\"') = ?")
            args.extend(query.label)
        sql = "SELECT id, body, agent_id, state, updated_at FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        order = " ORDER BY updated_at DESC, id DESC" if recent else " ORDER BY id"
        rows = self._db.execute(sql + order + " LIMIT ?", (*args, query.limit + 1)).fetchall()
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        cursor = None
        if more:
            last = rows[-1]
            cursor = encode_cursor({"u": last[4], "id": last[0]} if recent else {"id": last[0]})
        return [(r[1], r[2], r[3]) for r in rows], cursor

    def unheard_agents(self) -> dict[str, str]:
        """Agents whose last reports may no longer be true, with why: ``unreachable`` or
        ``revoked`` (a revoked agent's reports are not applied any more)."""
        return {r[0]: r[1] for r in self._db.execute(
            "SELECT id, CASE WHEN revoked THEN 'revoked' ELSE status END FROM agents"
            " WHERE status = 'unreachable' OR revoked = 1")}

    def count_agents_by_status(self) -> dict[str, int]:
        """Agents by status, counted in SQL (a ``/metrics`` scrape decodes no agent)."""
        return {r[0]: r[1] for r in self._db.execute(
            "SELECT status, count(*) FROM agents GROUP BY status")}

    def agent_ids_at(self, site: str) -> list[str]:
        """The ids of the agents enrolled at ``site`` (none decoded)."""
        return [r[0] for r in self._db.execute(
            "SELECT id FROM agents WHERE site = ? ORDER BY id", (site,))]

    def count_tasks_by_state(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._db.execute(
            "SELECT state, count(*) FROM tasks GROUP BY state")}

    def offer_ids(self) -> list[tuple[str, Any]]:
        """(agent id, offer id) of every stored offer, the body left undecoded (SQLite reads
        the id out of the JSON): what the scheduler compares each pass."""
        return [(row[0], row[1]) for row in self._db.execute(
            "SELECT agent_id, json_extract(body, '$.id') FROM offers")]

    def offer_of(self, agent_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT body FROM offers WHERE agent_id = ?",
                               (agent_id,)).fetchone()
        return None if row is None else dict(orjson.loads(row[0]))

    def placement_changes(self, after: int) -> tuple[int, set[str]] | None:
        """(last change seq, the agents whose offer or status changed after ``after``), or
        None if changes after ``after`` were pruned (the reader must read everything again).
        ``placement_changes(0)`` before any pass gives the seq to start from."""
        pruned = int(self.get_meta(_CHANGES_PRUNED) or 0)
        if after < pruned:
            return None
        agents: set[str] = set()
        last = after
        for seq, agent in self._db.execute(
                "SELECT seq, agent_id FROM placement_changes WHERE seq > ? ORDER BY seq",
                (after,)):
            agents.add(agent)
            last = seq
        return last, agents

    def last_placement_change(self) -> int:
        row = self._db.execute("SELECT max(seq) FROM placement_changes").fetchone()
        return int(row[0] or 0)

    def prune_placement_changes(self, keep: int = _CHANGES_KEEP) -> int:
        """Drop all but the newest ``keep`` change rows; returns how many went. A reader
        further behind than that reads everything again (``placement_changes`` says so)."""
        with self.transaction() as db:
            floor = self.last_placement_change() - keep
            if floor <= int(self.get_meta(_CHANGES_PRUNED) or 0):
                return 0
            gone = db.execute("DELETE FROM placement_changes WHERE seq <= ?",
                              (floor,)).rowcount
            db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key)"
                       " DO UPDATE SET value = excluded.value", (_CHANGES_PRUNED, str(floor)))
        return int(gone)

    def placement_state(self, agent_id: str) -> tuple[str, bool, Any] | None:
        """(status, revoked, offer id or None) of one agent, or None if it is not known."""
        row = self._db.execute(
            "SELECT a.status, a.revoked, json_extract(o.body, '$.id') FROM agents a"
            " LEFT JOIN offers o ON o.agent_id = a.id WHERE a.id = ?", (agent_id,)).fetchone()
        return None if row is None else (str(row[0]), bool(row[1]), row[2])

    def agent_statuses(self) -> list[tuple[str, str, bool]]:
        """(id, status, revoked) of every agent: the narrow read of a scheduler pass."""
        return [(row[0], row[1], bool(row[2])) for row in self._db.execute(
            "SELECT id, status, revoked FROM agents")]

    def list_offers(self, *, now: float | None = None) -> list[dict[str, Any]]:
        """Latest offer per agent; with ``now``, only those not yet expired."""
        if now is None:
            rows = self._db.execute("SELECT body FROM offers ORDER BY agent_id")
        else:
            rows = self._db.execute("SELECT body FROM offers WHERE expires_at > ?"
                                    " ORDER BY agent_id", (now,))
        return [json.loads(row[0]) for row in rows]

    def get_result(self, command_id: str) -> dict[str, Any]:
        row = self._db.execute("SELECT body FROM results WHERE command_id = ?",
                               (command_id,)).fetchone()
        if row is None:
            raise NotFound(f"no result for command {command_id!r}",
                           details={"command": command_id})
        result: dict[str, Any] = json.loads(row[0])
        return result

    def list_results(self, *, agent_id: str | None = None) -> list[dict[str, Any]]:
        if agent_id is None:
            rows = self._db.execute("SELECT body FROM results ORDER BY ts, command_id")
        else:
            rows = self._db.execute("SELECT body FROM results WHERE agent_id = ?"
                                    " ORDER BY ts, command_id", (agent_id,))
        return [json.loads(row[0]) for row in rows]

    # ------------------------------------------------------------ join tokens

    def insert_token(self, digest: str, *, created_at: float, expires_at: float,
                     uses_left: int | None, site: str | None = None) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO join_tokens(digest, created_at, expires_at, uses_left, site)"
                       " VALUES (?, ?, ?, ?, ?)",
                       (digest, created_at, expires_at, uses_left, site))

    def get_token(self, digest: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT * FROM join_tokens WHERE digest = ?",
                               (digest,)).fetchone()
        return None if row is None else _token(row)

    def find_tokens(self, digest_prefix: str) -> list[dict[str, Any]]:
        """Tokens whose digest starts with ``digest_prefix`` (lowercase hex), at most two."""
        rows = self._db.execute(
            "SELECT * FROM join_tokens WHERE digest >= ? AND digest < ? ORDER BY digest LIMIT 2",
            (digest_prefix, digest_prefix + "~")).fetchall()
        return [_token(row) for row in rows]

    def list_tokens(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM join_tokens ORDER BY created_at, digest")
        return [_token(row) for row in rows]

    def use_token(self, digest: str) -> None:
        """Count one enrollment against a token (no-op for unlimited tokens)."""
        self._db.execute("UPDATE join_tokens SET uses_left = uses_left - 1"
                         " WHERE digest = ? AND uses_left IS NOT NULL", (digest,))

    def revoke_token(self, digest: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE join_tokens SET revoked = 1 WHERE digest = ?", (digest,))

    # ------------------------------------------------------------ hub state mirrored to KV
    # (core_hub.hubstate): rows only the hub has, as records keyed like kv_dirty marks them.

    def dirty_state(self, limit: int = 256) -> list[tuple[str, str, int]]:
        """Marked (bucket, key, gen) changes not yet written to their KV bucket."""
        return [(r[0], r[1], r[2]) for r in self._db.execute(
            "SELECT bucket, key, gen FROM kv_dirty LIMIT ?", (limit,))]

    def clear_dirty(self, bucket: str, key: str, gen: int) -> None:
        """Forget a mark once KV holds the record read at ``gen`` (a newer change keeps it)."""
        with self.transaction() as db:
            db.execute("DELETE FROM kv_dirty WHERE bucket = ? AND key = ? AND gen = ?",
                       (bucket, key, gen))

    def state_record(self, bucket: str, key: str) -> dict[str, Any] | None:
        """The record KV keeps for ``key`` of ``bucket``, or None if the row is gone."""
        db = self._db
        if bucket == "services":
            svc = self.service(bytes.fromhex(key).decode())
            if svc is None:
                return None
            replaced = self.get_meta(f"replaced:{svc['name']}")
            return {"service": svc, "replaced": json.loads(replaced or "[]")}
        if bucket == "api_tokens":
            row = db.execute("SELECT digest, role, name, created_at, revoked FROM api_tokens"
                             " WHERE digest = ?", (key,)).fetchone()
            return None if row is None else {k: row[k] for k in row.keys()}  # noqa: SIM118
        if bucket == "join_tokens":
            token = self.get_token(key)
            return None if token is None else token
        row = db.execute("SELECT * FROM launches WHERE task_id = ?", (key,)).fetchone()
        if row is None:
            return None
        launch = {k: row[k] for k in row.keys()}  # noqa: SIM118
        task = db.execute("SELECT body FROM tasks WHERE id = ?", (key,)).fetchone()
        return {"launch": launch, "task": None if task is None else json.loads(task[0])}

    def restore_state(self, bucket: str, key: str, record: dict[str, Any]) -> bool:
        """Put a KV record into a view that lacks it (a view the record is newer than is not
        touched); True if it was restored. The restore itself marks nothing."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM kv_dirty WHERE bucket = ? AND key = ?",
                          (bucket, key)).fetchone() is not None:
                return False  # the view changed it since: the view's change goes out
            done = _put_state(db, bucket, key, record, verb="INSERT OR IGNORE")
            db.execute("DELETE FROM kv_dirty WHERE bucket = ? AND key = ?", (bucket, key))
        return done

    def follow_state(self, bucket: str, key: str, record: dict[str, Any] | None) -> None:
        """A standby's view (core_hub.follower) takes the leader's record as it is now: newer
        than the view's, or None once the leader deleted it. Marks nothing: a standby writes
        nothing to KV."""
        with self.transaction() as db:
            if record is None:
                _drop_state(db, bucket, key)
            else:
                _put_state(db, bucket, key, record, verb="INSERT OR REPLACE")
            db.execute("DELETE FROM kv_dirty WHERE bucket = ? AND key = ?", (bucket, key))

    # ------------------------------------------------------------ commands on their way

    def queue_command(self, command_id: str, agent_id: str, data: bytes, now: float) -> None:
        """Keep a signed command until JetStream has it (core_hub.commands sends it)."""
        with self.transaction() as db:
            db.execute("INSERT INTO command_outbox(command_id, agent_id, data, created_at)"
                       " VALUES (?, ?, ?, ?)", (command_id, agent_id, data, now))

    def queued_commands(self, limit: int = 256) -> list[tuple[int, str, str, bytes]]:
        """The oldest queued commands: (row id, command id, agent id, signed envelope)."""
        return [(r[0], r[1], r[2], bytes(r[3])) for r in self._db.execute(
            "SELECT id, command_id, agent_id, data FROM command_outbox ORDER BY id LIMIT ?",
            (limit,))]

    def command_queue_depth(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM command_outbox").fetchone()[0])

    def drop_command(self, row_id: int) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM command_outbox WHERE id = ?", (row_id,))


_KEY_COLUMNS = "public_key, revoked, applied_seq, retired_keys, revoked_after_seq"
_IN_LIMIT = 500  # ids per IN (...) list, well under SQLite's bound on parameters


def _agent_key(row: Sequence[Any]) -> AgentKey:
    """The ``AgentKey`` of a row starting with ``_KEY_COLUMNS``."""
    retired = () if row[3] == "[]" else tuple(
        (bytes.fromhex(key), int(until)) for key, until, *_ in json.loads(row[3]))
    return AgentKey(bytes(row[0]), bool(row[1]), int(row[2]), retired, int(row[4]))


def _agent(row: sqlite3.Row) -> dict[str, Any]:
    agent = {key: row[key] for key in row.keys()}  # noqa: SIM118 (Row is not a Mapping)
    for field in AGENT_JSON_FIELDS:
        agent[field] = json.loads(agent[field])
    agent["public_key"] = bytes(agent["public_key"]).hex()
    agent["revoked"] = bool(agent["revoked"])
    agent["retired_keys"] = json.loads(agent["retired_keys"])
    if agent["revoked"]:  # whatever liveness or the agent last wrote there
        agent["status"] = "revoked"
    return agent


def _token(row: sqlite3.Row) -> dict[str, Any]:
    return {"digest": row["digest"], "created_at": row["created_at"],
            "expires_at": row["expires_at"], "uses_left": row["uses_left"],
            "revoked": bool(row["revoked"]), "site": row["site"]}


def _put_state(db: Any, bucket: str, key: str, record: dict[str, Any], *, verb: str) -> bool:
    """Write one hub-state KV record into the view's rows; ``verb`` says whether a row the
    view has wins (a restore) or the record does (a standby following the leader)."""
    if bucket == "services":
        svc = dict(record["service"])
        name, created, updated = svc.pop("name"), svc.pop("created_at"), svc.pop("updated_at")
        done = db.execute(f"{verb} INTO services(name, spec, created_at, updated_at)"
                          " VALUES (?, ?, ?, ?)",
                          (name, _dumps({**svc, "name": name}), created, updated)).rowcount
        if done and record["replaced"]:
            db.execute(f"{verb} INTO meta(key, value) VALUES (?, ?)",
                       (f"replaced:{name}", _dumps(record["replaced"])))
    elif bucket == "api_tokens":
        done = db.execute(f"{verb} INTO api_tokens(digest, role, name, created_at, revoked)"
                          " VALUES (:digest, :role, :name, :created_at, :revoked)",
                          record).rowcount
    elif bucket == "join_tokens":
        done = db.execute(f"{verb} INTO join_tokens(digest, created_at, expires_at,"
                          " uses_left, revoked, site) VALUES (:digest, :created_at,"
                          " :expires_at, :uses_left, :revoked, :site)",
                          {"site": None, **record}).rowcount
    else:
        # A launch recorded as sent may have been in the lost view's command queue only: it
        # is sent again (same command id: JetStream or the edge drops a copy).
        launch = dict(record["launch"])
        if launch["status"] == "sent" and verb == "INSERT OR IGNORE":
            launch["status"] = "placing"
        done = db.execute(f"{verb} INTO launches(task_id, spec, agent_id, command_id, status,"
                          " excluded, reason, created_at, updated_at) VALUES (:task_id, :spec,"
                          " :agent_id, :command_id, :status, :excluded, :reason, :created_at,"
                          " :updated_at)", launch).rowcount
        task = record.get("task")
        # An accepted launch's task is the edge's to report (ingest rebuilds it); the others
        # exist only here: pending, on its way, or killed before placement.
        if done and task is not None and launch["status"] != "accepted":
            db.execute(f"{verb} INTO tasks(id, agent_id, name, state, generation, body,"
                       " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (task["id"], task.get("agent_id") or "", task["name"], task["state"],
                        task.get("generation", 1), _dumps(task), launch["updated_at"]))
    return bool(done)


def _drop_state(db: Any, bucket: str, key: str) -> None:
    """Remove the view's rows of a hub-state record the leader deleted."""
    if bucket == "services":
        name = bytes.fromhex(key).decode()
        db.execute("DELETE FROM services WHERE name = ?", (name,))
        db.execute("DELETE FROM meta WHERE key = ?", (f"replaced:{name}",))
    elif bucket == "api_tokens":
        db.execute("DELETE FROM api_tokens WHERE digest = ?", (key,))
    elif bucket == "join_tokens":
        db.execute("DELETE FROM join_tokens WHERE digest = ?", (key,))
    else:
        db.execute("DELETE FROM launches WHERE task_id = ?", (key,))
