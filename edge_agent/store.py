"""The edge agent's local SQLite store: tasks, their labels, and the event log.

One connection, used only from the agent's event loop, is the single writer. Every task change
and the event describing it commit in one transaction, so the event log (which the federation
outbox ships to the core) can never disagree with the task table, whatever crashes when.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson

from edge_agent.migrations import MIGRATIONS
from federation.backend import Page, TaskQuery
from federation.errors import BadRequest, NotFound
from federation.pagination import decode_cursor, encode_cursor
from federation.schemas import TERMINAL_STATES
from federation.sqlitedb import Database

_ACTIVE = ("pending", "staging", "starting", "running")

# Columns of ``tasks`` that the API shows besides the spec.
_PUBLIC = ("id", "state", "exit_code", "reason", "origin", "generation", "restarts", "pid",
           "created_at", "updated_at", "started_at", "finished_at")


class Store(Database):
    """Tasks and events on disk. ``commits`` counts committed transactions;
    ``wait_for_change`` waits for the next."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, MIGRATIONS, "edge store")
        self._waiters: set[asyncio.Future[None]] = set()
        self.commits = 0
        self.agent_id = ""
        self.site = ""
        # With federation on: events after this seq are not yet acked by JetStream and must not
        # be pruned. None: no federation, the event log is only the local feed.
        self.publish_floor: int | None = None

    def _committed(self) -> None:
        self.commits += 1
        self._wake()

    # ------------------------------------------------------------ meta

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                       "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    # ------------------------------------------------------------ tasks

    def to_api(self, row: sqlite3.Row) -> dict[str, Any]:
        task: dict[str, Any] = orjson.loads(row["spec"])
        for col in _PUBLIC:
            task[col] = row[col]
        task["healthy"] = None if row["healthy"] is None else bool(row["healthy"])
        task["agent_id"] = self.agent_id
        task["site"] = self.site
        return task

    def insert_task(self, task_id: str, spec: dict[str, Any], *, origin: str,
                    state: str, reason: str | None) -> sqlite3.Row:
        now = time.time()
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO tasks(id, name, spec, state, reason, origin, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (task_id, spec["name"], json.dumps(spec), state, reason, origin, now, now))
            num = cur.lastrowid
            db.executemany("INSERT INTO task_labels(key, value, task_num) VALUES (?, ?, ?)",
                           [(k, v, num) for k, v in spec.get("labels", {}).items()])
            row = self.row(task_id)
            self._append_event(db, "task", task_id, self.to_api(row), now)
        return row

    def update_task(self, task_id: str, **fields: Any) -> sqlite3.Row:
        """Change columns of one task and log its new state as an event, atomically."""
        now = time.time()
        fields["updated_at"] = now
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE tasks SET {cols} WHERE id = ?", (*fields.values(), task_id))
            row = self.row(task_id)
            self._append_event(db, "task", task_id, self.to_api(row), now)
        return row

    def replace_spec(self, task_id: str, spec: dict[str, Any], generation: int,
                     reason: str) -> sqlite3.Row:
        """A new spec (and its labels) for a task, at ``generation``, with its event."""
        with self.transaction() as db:
            num = self.row(task_id)["num"]
            db.execute("DELETE FROM task_labels WHERE task_num = ?", (num,))
            db.executemany("INSERT INTO task_labels(key, value, task_num) VALUES (?, ?, ?)",
                           [(k, v, num) for k, v in spec.get("labels", {}).items()])
            return self.update_task(task_id, spec=json.dumps(spec), name=spec["name"],
                                    generation=generation, reason=reason)

    def set_pid_start(self, task_id: str, pid: int, start_ticks: int) -> None:
        """Record a run's process start time (not an API field, so no event)."""
        with self.transaction() as db:
            db.execute("UPDATE tasks SET pid_start = ? WHERE id = ? AND pid = ?",
                       (start_ticks, task_id, pid))

    def row(self, task_id: str) -> sqlite3.Row:
        row = self._db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise NotFound(f"task {task_id!r} not found", details={"task": task_id})
        return row

    def find(self, ref: str) -> sqlite3.Row:
        """A task by id, or by an unambiguous id prefix of at least 6 characters."""
        row = self._db.execute("SELECT * FROM tasks WHERE id = ?", (ref,)).fetchone()
        if row is None and 6 <= len(ref) < 32 and ref.isalnum():
            rows = self._db.execute("SELECT * FROM tasks WHERE id >= ? AND id < ? LIMIT 2",
                                    (ref, ref + "\U0010ffff")).fetchall()
            if len(rows) > 1:
                raise BadRequest(f"task id prefix {ref!r} is ambiguous",
                                 details={"task": ref})
            row = rows[0] if rows else None
        if row is None:
            raise NotFound(f"task {ref!r} not found", details={"task": ref})
        return row

    def known_task_ids(self, ids: list[str]) -> set[str]:
        """Which of ``ids`` are tasks in the store (any state)."""
        marks = ",".join("?" * len(ids))
        if not ids:
            return set()
        return {r[0] for r in self._db.execute(
            f"SELECT id FROM tasks WHERE id IN ({marks})", ids)}

    def active_rows(self) -> list[sqlite3.Row]:
        marks = ",".join("?" * len(TERMINAL_STATES))
        return self._db.execute(
            f"SELECT * FROM tasks WHERE state NOT IN ({marks}) ORDER BY num",
            tuple(TERMINAL_STATES)).fetchall()

    def count_active(self) -> int:
        """Tasks not yet ended (pending to running); an index range per state, not a scan."""
        return int(self._db.execute(
            f"SELECT count(*) FROM tasks WHERE state IN ({','.join('?' * len(_ACTIVE))})",
            _ACTIVE).fetchone()[0])

    def count_by_state(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._db.execute(
            "SELECT state, count(*) FROM tasks GROUP BY state")}

    def list_tasks(self, query: TaskQuery) -> Page:
        where: list[str] = []
        args: list[Any] = []
        recent = query.order == "recent"
        pos = (decode_cursor(query.cursor, u=float, n=int) if recent
               else decode_cursor(query.cursor, n=int))
        if pos is not None and recent:
            where.append("(t.updated_at < ? OR (t.updated_at = ? AND t.num < ?))")
            args.extend((pos["u"], pos["u"], pos["n"]))
        elif pos is not None:
            where.append("t.num > ?")
            args.append(pos["n"])
        if query.states:
            where.append(f"t.state IN ({','.join('?' * len(query.states))})")
            args.extend(query.states)
        if query.name:
            where.append("t.name = ?")
            args.append(query.name)
        if query.agent_id and query.agent_id != self.agent_id:
            return Page([], None)
        if query.site and query.site != self.site:
            return Page([], None)
        join = ""
        if query.label:
            join = "JOIN task_labels l ON l.task_num = t.num AND l.key = ? AND l.value = ?"
            args = [*query.label, *args]
        order = "t.updated_at DESC, t.num DESC" if recent else "t.num"
        sql = (f"SELECT t.* FROM tasks t {join} "
               f"{'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY {order} LIMIT ?")
        rows = self._db.execute(sql, (*args, query.limit + 1)).fetchall()
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        cursor = None
        if more:
            last = rows[-1]
            cursor = encode_cursor({"u": last["updated_at"], "n": last["num"]} if recent
                                   else {"n": last["num"]})
        return Page([self.to_api(r) for r in rows], cursor)

    # ------------------------------------------------------------ events

    def _append_event(self, db: sqlite3.Connection, kind: str, task_id: str | None,
                      body: dict[str, Any], ts: float) -> None:
        db.execute("INSERT INTO events(ts, kind, task_id, body) VALUES (?, ?, ?, ?)",
                   (ts, kind, task_id, orjson.dumps(body).decode()))

    def append_event(self, kind: str, body: dict[str, Any], task_id: str | None = None) -> None:
        with self.transaction() as db:
            self._append_event(db, kind, task_id, body, time.time())

    def task_history(self, task_id: str, scan: int = 1000) -> list[tuple[float, dict[str, Any]]]:
        """The task's state events this store still holds (the newest ``scan``), oldest
        first, as (ts, task record)."""
        rows = self._db.execute(
            "SELECT ts, body FROM events WHERE task_id = ? AND kind = 'task'"
            " ORDER BY seq DESC LIMIT ?", (task_id, scan)).fetchall()
        return [(row[0], orjson.loads(row[1])) for row in reversed(rows)]

    def events_after(self, seq: int, limit: int = 500) -> list[sqlite3.Row]:
        return self._db.execute(
            "SELECT seq, ts, kind, task_id, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit)).fetchall()

    def last_event_seq(self) -> int:
        row = self._db.execute("SELECT max(seq) FROM events").fetchone()
        return row[0] or 0

    def first_event_seq(self) -> int:
        row = self._db.execute("SELECT min(seq) FROM events").fetchone()
        return row[0] or 0

    def prune_events(self, keep: int) -> int:
        """Drop all but the newest ``keep`` events, never one the core has not acked yet."""
        limit = self.last_event_seq() - keep
        if self.publish_floor is not None:
            limit = min(limit, self.publish_floor)
        if limit <= 0:
            return 0
        with self.transaction() as db:
            return db.execute("DELETE FROM events WHERE seq <= ?", (limit,)).rowcount

    def outbox_depth(self) -> tuple[int, float | None]:
        """(events not yet acked by the core, age in seconds of the oldest of them)."""
        floor = self.publish_floor or 0
        row = self._db.execute("SELECT count(*), min(ts) FROM events WHERE seq > ?",
                               (floor,)).fetchone()
        return row[0], (None if row[1] is None else max(time.time() - row[1], 0.0))

    def coalesce_outbox(self) -> int:
        """Drop unshipped events that a newer unshipped event supersedes.

        A task's intermediate states (never a terminal one) and all but the newest offer and
        agent record go; the newest state of everything stays. Returns how many were dropped.
        """
        floor = self.publish_floor or 0
        marks = ",".join("?" * len(TERMINAL_STATES))
        with self.transaction() as db:
            # Uncorrelated subqueries: SQLite computes each newest-seq set once.
            dropped = db.execute(
                f"""DELETE FROM events WHERE seq > ? AND kind = 'task'
                    AND json_extract(body, '$.state') NOT IN ({marks})
                    AND seq NOT IN (SELECT max(seq) FROM events
                                    WHERE seq > ? AND kind = 'task' GROUP BY task_id)""",
                (floor, *TERMINAL_STATES, floor)).rowcount
            dropped += db.execute(
                """DELETE FROM events WHERE seq > ? AND kind IN ('offer', 'agent', 'snapshot')
                   AND seq NOT IN (SELECT max(seq) FROM events WHERE seq > ?
                                   AND kind IN ('offer', 'agent', 'snapshot') GROUP BY kind)""",
                (floor, floor)).rowcount
        return dropped

    def command_seen(self, command_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM commands WHERE id = ?",
                                (command_id,)).fetchone() is not None

    def record_command(self, command_id: str, kind: str, status: str, detail: str | None,
                       result: dict[str, Any]) -> None:
        """Remember a command as handled and queue its result event, in the caller's
        transaction (so the effect, the record and the report commit together)."""
        with self.transaction() as db:
            db.execute("INSERT INTO commands(id, kind, status, detail, applied_at) "
                       "VALUES (?, ?, ?, ?, ?)", (command_id, kind, status, detail, time.time()))
            self._append_event(db, "result", result.get("task_id"), result, time.time())

    def _wake(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    async def wait_for_change(self) -> None:
        """Returns after the next committed transaction."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            await fut
        finally:
            self._waiters.discard(fut)
