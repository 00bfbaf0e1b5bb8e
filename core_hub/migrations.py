"""Versioned schema of the hub's SQLite view of the fleet.

Each entry runs once, in order, inside one transaction; ``PRAGMA user_version`` records how far
a database has come (``federation.sqlitedb`` runs them, as for the edge store: importing
sqlite-utils for six tables is not worth its start-up cost). The fleet is a view rebuilt from
the ``OUTPOST_EVENTS`` stream (``meta.stream_seq`` says how far it has come); what starts at the
hub is mirrored to KV buckets and restored from them: agents' keys (``core_hub.registry``),
services, tokens and launches (``core_hub.hubstate``). ``command_outbox`` is the hub's queue of
commands JetStream has not stored yet.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: the fleet view (agents, tasks, offers, command results), join tokens, metadata.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE agents (
        id TEXT PRIMARY KEY,
        public_key BLOB NOT NULL,
        name TEXT NOT NULL DEFAULT '',
        site TEXT NOT NULL DEFAULT '',
        labels TEXT NOT NULL DEFAULT '{}',
        resources TEXT NOT NULL DEFAULT '{}',
        used TEXT NOT NULL DEFAULT '{}',
        status TEXT NOT NULL DEFAULT 'disconnected',
        version TEXT NOT NULL DEFAULT '',
        isolation TEXT NOT NULL DEFAULT '',
        last_seen REAL,
        applied_seq INTEGER NOT NULL DEFAULT 0,
        enrolled_at REAL NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX agents_by_site ON agents(site, id);
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        agent_id TEXT NOT NULL,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        generation INTEGER NOT NULL DEFAULT 1,
        body TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX tasks_by_agent ON tasks(agent_id, state);
    CREATE INDEX tasks_by_state ON tasks(state, id);
    CREATE TABLE offers (
        agent_id TEXT PRIMARY KEY,
        body TEXT NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE TABLE results (
        command_id TEXT PRIMARY KEY,
        agent_id TEXT NOT NULL,
        status TEXT NOT NULL,
        body TEXT NOT NULL,
        ts REAL NOT NULL
    );
    CREATE INDEX results_by_agent ON results(agent_id, ts);
    CREATE TABLE join_tokens (
        digest TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        uses_left INTEGER,
        revoked INTEGER NOT NULL DEFAULT 0
    );
    """,
    # 2: each agent's outbox health from its heartbeats (depth, oldest age).
    """
    ALTER TABLE agents ADD COLUMN outbox TEXT NOT NULL DEFAULT '{}';
    """,
    # 3: tasks the core places: the spec, where the launch went, and its command, so a
    # restarted hub resends the same launch (same task id: an edge applies it once) instead of
    # placing the task a second time.
    """
    CREATE TABLE launches (
        task_id TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        agent_id TEXT,
        command_id TEXT,
        status TEXT NOT NULL,
        excluded TEXT NOT NULL DEFAULT '[]',
        reason TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX launches_by_status ON launches(status, created_at);
    """,
    # 4: services (after Marathon): the core keeps `instances` copies of a task running.
    """
    CREATE TABLE services (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # 5: API tokens with roles (viewer < operator < admin), kept as digests.
    """
    CREATE TABLE api_tokens (
        digest TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        name TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0
    );
    """,
    # 6: agent trust over time: when an agent was revoked, and the keys it signed with before
    # a rotation (JSON [[hex key, last seq it signed, retired_at], ...]) so events still in
    # the stream from before the rotation verify, and none after it do.
    """
    ALTER TABLE agents ADD COLUMN revoked_at REAL;
    ALTER TABLE agents ADD COLUMN retired_keys TEXT NOT NULL DEFAULT '[]';
    """,
    # 7: each task's state changes as its agent reported them (the API's task history); rows
    # carry the sender, so a row an agent wrote about another agent's task is never shown.
    """
    CREATE TABLE task_history (
        task_id TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        ts REAL NOT NULL,
        state TEXT NOT NULL,
        exit_code INTEGER,
        reason TEXT,
        generation INTEGER,
        restarts INTEGER,
        PRIMARY KEY (task_id, agent_id, seq)
    ) WITHOUT ROWID;
    """,
    # 8 (hub state in JetStream): what only the hub knows (services and the instances they
    # replaced, API tokens, join tokens, launches) is mirrored to KV buckets. Each change marks
    # its key in kv_dirty in the same transaction (a trigger, so every writer does it, the CLI
    # too); core_hub.hubstate writes marked keys to KV and clears a mark only if its gen is
    # still the one it wrote.
    """
    CREATE TABLE kv_dirty (
        bucket TEXT NOT NULL,
        key TEXT NOT NULL,
        gen INTEGER NOT NULL DEFAULT 1,
        PRIMARY KEY (bucket, key)
    ) WITHOUT ROWID;
    CREATE TRIGGER services_kv_insert AFTER INSERT ON services BEGIN
        INSERT INTO kv_dirty(bucket, key) VALUES ('services', lower(hex(NEW.name)))
        ON CONFLICT(bucket, key) DO UPDATE SET gen = gen + 1;
    END;
    CREATE TRIGGER services_kv_update AFTER UPDATE ON services BEGIN
        INSERT INTO kv_dirty(bucket, key) VALUES ('services', lower(hex(NEW.name)))
        ON CONFLICT(bucket, key) DO UPDATE SET gen = gen + 1;
    END;
    CREATE TRIGGER services_kv_delete AFTER DELETE ON services BEGIN
        INSERT INTO kv_dirty(bucket, key) VALUES ('services', lower(hex(OLD.name)))
        ON CONFLICT(bucket, key) DO UPDATE SET gen = gen + 1;
    END;
    CREATE TRIGGER api_tokens_kv_insert AFTER INSERT ON api_tokens BEGIN
        INSERT INTO kv_dirty(bucket, key) VALUES ('api_tokens', NEW.digest)
        ON CONFLICT(bucket, key) DO UPDATE SET gen = gen + 1;
    END;
    CREATE TRIGGER api_tokens_kv_update AFTER UPDATE ON api_tokens BEGIN
        INSERT INTO kv_dirty(bucket, key) VALUES ('api_tokens', NEW.digest)
        ON CONFLICT(bucket, key) DO UPDATE SET gen = gen + 1;
    END;
    CREATE TRIGGER api_tokens_kv_delete AFTER DELETE ON api_tokens BEGIN
        INSERT INTO kv_dirty(bucket, key) VALUES ('api_tokens', OLD.digest)
        ON CONFLICT(bucket, key) DO UPDATE SET gen = gen + 1;
    END;
    CREATE TRIGGER join_tokens_kv_insert AFTER INSERT ON join_tokens BEGIN
        INSERT INTO kv_dirty(bucket, key) VALUES ('join_tokens', NEW.digest)
        ON CONFLICT(bucket, key) DO UPDATE SET gen = gen + 1;
    END;
    CREATE TRIGGER join_tokens_kv_update AFTER UPDATE ON join_tokens BEGIN
        INSERT INTO kv_dirty(bucket, key) VALUES ('join_tokens', NEW.digest)
        ON CONFLICT(bucket, key) DO UPDATE SET gen = gen + 1;
    END;
    CREATE TRIGGER join_tokens_kv_delete AFTER DELETE ON join_tokens BEGIN
        INSERT INTO kv_dirty(bucket, key) VALUES ('join_tokens', OLD.digest)
        ON CONFLICT(bucket, key) DO UPDATE SET gen = gen + 1;
    END;
    CREATE TRIGGER launches_kv_insert AFTER INSERT ON launches BEGIN
        INSERT INTO kv_dirty(bucket, key) VALUES ('launches', NEW.task_id)
        ON CONFLICT(bucket, key) DO UPDATE SET gen = gen + 1;
    END;
    CREATE TRIGGER launches_kv_update AFTER UPDATE ON launches BEGIN
        INSERT INTO kv_dirty(bucket, key) VALUES ('launches', NEW.task_id)
        ON CONFLICT(bucket, key) DO UPDATE SET gen = gen + 1;
    END;
    CREATE TRIGGER launches_kv_delete AFTER DELETE ON launches BEGIN
        INSERT INTO kv_dirty(bucket, key) VALUES ('launches', OLD.task_id)
        ON CONFLICT(bucket, key) DO UPDATE SET gen = gen + 1;
    END;
    CREATE TRIGGER replaced_kv_insert AFTER INSERT ON meta
    WHEN NEW.key LIKE 'replaced:%' BEGIN
        INSERT INTO kv_dirty(bucket, key) VALUES ('services', lower(hex(substr(NEW.key, 10))))
        ON CONFLICT(bucket, key) DO UPDATE SET gen = gen + 1;
    END;
    CREATE TRIGGER replaced_kv_update AFTER UPDATE ON meta
    WHEN NEW.key LIKE 'replaced:%' BEGIN
        INSERT INTO kv_dirty(bucket, key) VALUES ('services', lower(hex(substr(NEW.key, 10))))
        ON CONFLICT(bucket, key) DO UPDATE SET gen = gen + 1;
    END;
    CREATE TRIGGER replaced_kv_delete AFTER DELETE ON meta
    WHEN OLD.key LIKE 'replaced:%' BEGIN
        INSERT INTO kv_dirty(bucket, key) VALUES ('services', lower(hex(substr(OLD.key, 10))))
        ON CONFLICT(bucket, key) DO UPDATE SET gen = gen + 1;
    END;
    """,
    # 9 (API never blocks on NATS): commands signed and queued here, in order, until
    # JetStream has stored them; the API answers 202 once a command is queued.
    """
    CREATE TABLE command_outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        command_id TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        data BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # 10 (fleet scale): liveness moves only the agents crossing a threshold, found by status
    # and last_seen through this index instead of reading every agent each second.
    """
    CREATE INDEX agents_by_status_seen ON agents(status, last_seen);
    """,
    # 11 (trust, issue 10): a join token may name the site of the agents it enrolls.
    """
    ALTER TABLE join_tokens ADD COLUMN site TEXT;
    """,
    # 12 (busy hub): tasks by name, for placement's spread and a service's instances (both
    # read them on every pass; without it each read scanned every task).
    """
    CREATE INDEX tasks_by_name ON tasks(name, state);
    """,
    # 13 (recent tasks first): GET /v1/tasks?order=recent pages by (updated_at, id).
    """
    CREATE INDEX tasks_by_recent ON tasks(updated_at, id);
    """,
    # 14 (containers, issue 15): the task drivers an agent runs (with the runtime's version),
    # as its record says them; placement reads them from offers.
    """
    ALTER TABLE agents ADD COLUMN drivers TEXT NOT NULL DEFAULT '[]';
    """,
    # 15 (replicas): the last event seq applied from an agent when it was revoked. A view
    # rebuilt later (a takeover, a deleted view) applies what the agent sent up to there, as
    # the view that revoked it had, and refuses the rest.
    """
    ALTER TABLE agents ADD COLUMN revoked_after_seq INTEGER NOT NULL DEFAULT 0;
    """,
    # 16 (fleet scale): the agents whose offer or status changed, in order, written by
    # triggers (so by every writer: ingest, liveness, the API, another process). The
    # scheduler reads what is new each pass instead of every agent and offer; rows are pruned
    # behind it (``meta.placement_changes_pruned``).
    """
    CREATE TABLE placement_changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        agent_id TEXT NOT NULL
    );
    CREATE TRIGGER offer_added AFTER INSERT ON offers
        BEGIN INSERT INTO placement_changes(agent_id) VALUES (NEW.agent_id); END;
    CREATE TRIGGER offer_changed AFTER UPDATE ON offers
        BEGIN INSERT INTO placement_changes(agent_id) VALUES (NEW.agent_id); END;
    CREATE TRIGGER offer_removed AFTER DELETE ON offers
        BEGIN INSERT INTO placement_changes(agent_id) VALUES (OLD.agent_id); END;
    CREATE TRIGGER agent_status_changed AFTER UPDATE OF status, revoked ON agents
        WHEN OLD.status IS NOT NEW.status OR OLD.revoked IS NOT NEW.revoked
        BEGIN INSERT INTO placement_changes(agent_id) VALUES (NEW.id); END;
    CREATE TRIGGER agent_removed AFTER DELETE ON agents
        BEGIN INSERT INTO placement_changes(agent_id) VALUES (OLD.id); END;
    """,
    # 17 (fleet scale): an enrollment looks its key and name up through indexes. It scanned
    # every agent twice (the name, and the key among every agent's retired keys, a JSON list
    # parsed per row): the hub's own CPU per enrollment went from 1.9 ms over the first 1,000
    # agents to 11.4 ms over the last 1,000 of 10,000. Retired keys get a table of their own,
    # kept by triggers from ``agents.retired_keys`` (so by every writer, a rebuild too).
    """
    CREATE INDEX agents_by_name ON agents(name, revoked, enrolled_at);
    CREATE INDEX agents_by_public_key ON agents(public_key);
    CREATE TABLE retired_agent_keys (
        public_key_hex TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        PRIMARY KEY (public_key_hex, agent_id)
    ) WITHOUT ROWID;
    CREATE INDEX retired_agent_keys_by_agent ON retired_agent_keys(agent_id);
    INSERT OR IGNORE INTO retired_agent_keys(public_key_hex, agent_id)
        SELECT json_extract(k.value, '$[0]'), a.id FROM agents a, json_each(a.retired_keys) k;
    CREATE TRIGGER retired_keys_added AFTER INSERT ON agents
        BEGIN
            INSERT OR IGNORE INTO retired_agent_keys(public_key_hex, agent_id)
                SELECT json_extract(value, '$[0]'), NEW.id FROM json_each(NEW.retired_keys);
        END;
    CREATE TRIGGER retired_keys_changed AFTER UPDATE OF retired_keys ON agents
        BEGIN
            DELETE FROM retired_agent_keys WHERE agent_id = OLD.id;
            INSERT OR IGNORE INTO retired_agent_keys(public_key_hex, agent_id)
                SELECT json_extract(value, '$[0]'), NEW.id FROM json_each(NEW.retired_keys);
        END;
    CREATE TRIGGER retired_keys_removed AFTER DELETE ON agents
        BEGIN DELETE FROM retired_agent_keys WHERE agent_id = OLD.id; END;
    """,
)
