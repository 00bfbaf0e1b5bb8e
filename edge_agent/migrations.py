"""Versioned schema of the edge store: each entry runs once, in order (``federation.sqlitedb``).
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: tasks, their labels, the event log (which is also the federation outbox), metadata.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE tasks (
        num INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        exit_code INTEGER,
        reason TEXT,
        origin TEXT NOT NULL,
        generation INTEGER NOT NULL DEFAULT 1,
        restarts INTEGER NOT NULL DEFAULT 0,
        failures INTEGER NOT NULL DEFAULT 0,
        pid INTEGER,
        pid_start INTEGER,
        boot_id TEXT,
        healthy INTEGER,
        not_before REAL,
        want TEXT NOT NULL DEFAULT 'run',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    );
    CREATE INDEX tasks_by_state ON tasks(state, num);
    CREATE INDEX tasks_by_name ON tasks(name, num);
    CREATE TABLE task_labels (
        key TEXT NOT NULL, value TEXT NOT NULL, task_num INTEGER NOT NULL,
        PRIMARY KEY (key, value, task_num)
    ) WITHOUT ROWID;
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        task_id TEXT,
        body TEXT NOT NULL
    );
    """,
    # 2: core-to-edge commands applied here, so each is applied once.
    """
    CREATE TABLE commands (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        detail TEXT,
        applied_at REAL NOT NULL
    );
    CREATE INDEX events_by_task ON events(task_id, seq);
    """,
    # 3 (recent tasks first): GET /v1/tasks?order=recent pages by (updated_at, num).
    """
    CREATE INDEX tasks_by_recent ON tasks(updated_at, num);
    """,
    # 4 (artifacts): the content-addressed cache (edge_agent/artifacts.py) and which task
    # uses which artifact (never evicted nor deleted while a task that has not ended uses it).
    """
    CREATE TABLE artifacts (
        sha256 TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        size INTEGER NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        created REAL NOT NULL,
        origin TEXT NOT NULL,
        manifest BLOB,
        last_used REAL NOT NULL
    );
    CREATE INDEX artifacts_by_name ON artifacts(name, version);
    CREATE TABLE task_artifacts (
        task_id TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        PRIMARY KEY (task_id, sha256)
    ) WITHOUT ROWID;
    CREATE INDEX task_artifacts_by_sha ON task_artifacts(sha256);
    """,
)
