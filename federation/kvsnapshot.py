"""Every key's current value in a JetStream KV bucket, read completely.

nats-py's watcher ends its initial values (``updates()`` returns None) as soon as the
consumer's info reports nothing pending and the client has read no message yet. The server
may have sent every message already, unread in the socket: the watcher then ends before the
first entry (3 of 200 watches of a 50-key bucket here, tests/test_kv_restore.py). This reads
until the server's own count says the last value is in: the entry delivered with nothing
pending after it (``delta == 0``), having first asked the stream whether it holds any.
"""

from __future__ import annotations

from typing import Any

_DELETES = frozenset({"DEL", "PURGE"})


async def current_entries(kv: Any, *, timeout_s: float = 10.0) -> dict[str, Any]:
    """Key -> ``KeyValue.Entry`` of each key with a value now (deleted and purged ones left
    out). Raise nats' TimeoutError if the server stops sending for ``timeout_s``."""
    if (await kv.status()).values == 0:
        return {}
    watcher = await kv.watchall()
    entries: dict[str, Any] = {}
    try:
        while True:
            entry = await watcher.updates(timeout=timeout_s)
            if entry is None:  # nats-py's own end marker: not trusted (see above)
                continue
            if entry.operation in _DELETES or not entry.value:
                entries.pop(entry.key, None)
            else:
                entries[entry.key] = entry
            if entry.delta == 0:
                return entries
    finally:
        await watcher.stop()
