"""Every key's current value in a JetStream KV bucket, read completely.

nats-py's watcher ends its initial values (``updates()`` returns None) as soon as the
consumer's info reports nothing pending and the client has read no message yet. The server
may have sent every message already, unread in the socket: the watcher then ends before the
first entry (3 of 200 watches of a 50-key bucket here, tests/test_kv_restore.py;
nats-io/nats.py#842, and #995 for a second way, a per-message pending count that reaches 0
and grows again on a cluster under writes). So the end is taken from the stream itself: its
last sequence, asked before the watch, is delivered last among the values there were then
(each key's last message is delivered, in stream order).
"""

from __future__ import annotations

from typing import Any

import nats.errors

DELETES = frozenset({"DEL", "PURGE"})  # the operations that leave a key without a value


async def values_end(kv: Any) -> int:
    """The revision a watch started now has all the bucket's current values at (0: it holds
    none): the stream's last sequence."""
    state = (await kv.status()).stream_info.state
    return int(state.last_seq) if state.messages else 0


async def current_entries(kv: Any, *, timeout_s: float = 10.0) -> dict[str, Any]:
    """Key -> ``KeyValue.Entry`` of each key with a value now (deleted and purged ones left
    out). Raise nats' TimeoutError if the server stops sending for ``timeout_s`` before the
    values end."""
    last = await values_end(kv)
    if last == 0:
        return {}
    watcher = await kv.watchall()
    entries: dict[str, Any] = {}
    caught_up = False  # the server said nothing more was pending
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=timeout_s)
            except nats.errors.TimeoutError:
                if caught_up:  # the last message went (a purge) after the stream was asked
                    return entries
                raise
            if entry is None:  # nats-py's own end marker: not trusted (see above)
                continue
            if entry.operation in DELETES or not entry.value:
                entries.pop(entry.key, None)
            else:
                entries[entry.key] = entry
            if entry.revision >= last:
                return entries
            caught_up = entry.delta == 0
    finally:
        await watcher.stop()
