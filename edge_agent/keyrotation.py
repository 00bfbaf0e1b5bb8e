"""Key rotation at the edge: a new signing key, the same agent id, tasks and history.

The agent id was fixed at the first start (store meta ``agent_id``: the fingerprint of the
first key) and never changes; only the key that signs the agent's events does. Files in the
data dir, all 0600:

    agent.key           the key the agent signs with (32-byte Ed25519 seed)
    agent.key.next      a new key waiting for the hub to accept it: a rotation is pending
    key-rotation.json   what happened, for ``outpost-agent rotate-key`` to report:
                        {"state": "pending" | "done" | "refused", "public_key", "error", ...}

``outpost-agent rotate-key`` only writes ``agent.key.next`` (the agent may be running or not).
The agent's sync loop then finishes the rotation while it is connected:

1. It fixes ``until``, the last event seq the old key may sign: the newest event now (store
   meta ``key_rotation_until``). From here until the hub answers, only events up to ``until``
   are published (with the old key); later ones wait in the outbox.
2. It sends ``wire.rotate_request`` (signed by both keys) on the enrollment subject.
3. Only after the hub's ok does it replace ``agent.key`` with ``agent.key.next`` (one rename),
   then clear ``until``; from then on everything, older seqs too, is signed with the new key.

A crash anywhere in between loses nothing: before the rename the old key is still the key, the
pending key and ``until`` are on disk, and the same request is sent again (the hub answers a
rotation it already recorded with ok). Where the NATS user is the identity key (least
privilege), a hub that took the new key has also told NATS; if its answer was lost, the link
comes back as the pending key (``other_key``) and asks again from there.

The hub keeps accepting the old key for envelopes that end at or below ``until`` (those
already in JetStream) and for nothing later. A refusal from the hub (revoked, wrong key) drops
the pending key and says why in ``key-rotation.json``; a hub that cannot answer now leaves it
pending for the next try.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from edge_agent.store import Store
from federation import wire

log = logging.getLogger(__name__)

KEY = "agent.key"
NEXT = "agent.key.next"
STATUS = "key-rotation.json"
UNTIL_META = "key_rotation_until"
RETRY_S = 2.0
# Refusals worth trying again later; anything else means this rotation cannot happen.
TRANSIENT = frozenset({"unavailable", "internal"})


def _write_private(path: Path, data: bytes) -> None:
    """``data`` to ``path`` (0600), whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def read_status(data_dir: Path) -> dict[str, Any]:
    try:
        status: dict[str, Any] = json.loads((data_dir / STATUS).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return status


def write_status(data_dir: Path, **status: Any) -> None:
    _write_private(data_dir / STATUS, json.dumps({**status, "at": time.time()}).encode())


def begin(data_dir: Path) -> tuple[bytes, bool]:
    """Make the pending key (``agent.key.next``) unless one is pending already; returns its
    public key and whether it is new. The CLI calls this; the agent does the rest."""
    from nacl.signing import SigningKey

    path = data_dir / NEXT
    if path.exists():
        return wire.Signer(path.read_bytes()).public, False
    seed = bytes(SigningKey.generate())
    _write_private(path, seed)
    public = wire.Signer(seed).public
    write_status(data_dir, state="pending", public_key=public.hex())
    return public, True


class KeyRotation:
    """The agent's side of a pending rotation, driven by its sync loop (one task: no locks)."""

    def __init__(self, data_dir: Path, store: Store) -> None:
        self.data_dir = Path(data_dir)
        self.store = store
        self._next_try = 0.0
        if not self.pending():  # a crash right after the swap left it behind
            self._clear_until()

    def pending(self) -> bool:
        return (self.data_dir / NEXT).exists()

    def until(self) -> int:
        """The last seq the old key signs (fixed on first use, kept in the store)."""
        value = self.store.get_meta(UNTIL_META)
        if not value:
            value = str(self.store.last_event_seq())
            self.store.set_meta(UNTIL_META, value)
            log.info("key rotation: the old key signs events up to seq %s", value,
                     extra={"agent": self.store.agent_id, "until": int(value)})
        return int(value)

    def other_key(self, seed: bytes | None) -> bytes | None:
        """While a rotation is pending, the NATS user the agent tries next: the pending key
        after the current one failed, and back (the hub may hold either, see the module doc)."""
        if not self.pending():
            return seed
        current = (self.data_dir / KEY).read_bytes()
        return (self.data_dir / NEXT).read_bytes() if seed == current else current

    def due(self) -> bool:
        """Time to send the request (again): at most every RETRY_S."""
        return time.monotonic() >= self._next_try

    def request(self, current: wire.Signer) -> bytes:
        self._next_try = time.monotonic() + RETRY_S
        new = wire.Signer((self.data_dir / NEXT).read_bytes())
        return wire.rotate_request(current, new, self.store.agent_id, self.until())

    def answered(self, answer: Any) -> bytes | None:
        """Act on the hub's reply: the new key's seed once the rotation is done (the caller
        signs with it from now on), else None (refused, or to be tried again)."""
        if not isinstance(answer, dict):
            log.warning("key rotation: the hub's answer is not a map; trying again later")
            return None
        if answer.get("ok") and answer.get("agent_id") == self.store.agent_id:
            return self._commit()
        code, error = str(answer.get("code")), str(answer.get("error"))
        if answer.get("ok") or code in TRANSIENT:
            log.warning("key rotation not confirmed yet (%s: %s); trying again", code, error,
                        extra={"agent": self.store.agent_id})
            return None
        log.error("key rotation refused by the hub (%s): %s; the current key stays", code,
                  error, extra={"agent": self.store.agent_id})
        (self.data_dir / NEXT).unlink(missing_ok=True)
        write_status(self.data_dir, state="refused", error=f"{code}: {error}")
        self._clear_until()
        return None

    def _commit(self) -> bytes:
        seed = (self.data_dir / NEXT).read_bytes()
        until = self.until()
        (self.data_dir / NEXT).replace(self.data_dir / KEY)  # the one step that swaps keys
        self._clear_until()
        public = wire.Signer(seed).public
        write_status(self.data_dir, state="done", public_key=public.hex(), until=until)
        log.warning("key rotated: agent %s signs with its new key from seq %d on",
                    self.store.agent_id, until + 1,
                    extra={"agent": self.store.agent_id, "until": until})
        return seed

    def _clear_until(self) -> None:
        if self.store.get_meta(UNTIL_META):
            self.store.set_meta(UNTIL_META, "")  # "": no rotation under way


# ---------------------------------------------------------------- outpost-agent rotate-key


def main(argv: list[str]) -> int:
    """``outpost-agent rotate-key --data-dir DIR [--wait S]``: make the pending key, then wait
    for the agent to finish the rotation with the hub. Exit 0 once it is done (or at once with
    ``--wait 0``), 1 if the hub refused it or it is not done within ``--wait`` seconds (it
    stays pending: the agent finishes it when it next reaches the hub), 2 for a data dir that
    is not an enrolled agent's."""
    import argparse
    import sqlite3

    p = argparse.ArgumentParser(
        prog="outpost-agent rotate-key", allow_abbrev=False,
        description="Give this agent a new signing key; it keeps its id, tasks and history.")
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--wait", type=float, default=30.0,
                   help="seconds to wait for the hub to confirm (0: do not wait)")
    args = p.parse_args(argv)
    data: Path = args.data_dir
    try:
        db = sqlite3.connect(f"file:{data / 'agent.db'}?mode=ro", uri=True)
        try:
            rows = dict(db.execute("SELECT key, value FROM meta WHERE key IN"
                                   " ('agent_id', 'hub_public_key')").fetchall())
        finally:
            db.close()
    except sqlite3.Error:
        rows = {}
    if not (data / KEY).exists() or "agent_id" not in rows:
        print(f"outpost-agent: no agent in {data}", file=sys.stderr)
        return 2
    if "hub_public_key" not in rows:
        print(f"outpost-agent: agent {rows['agent_id']} has not enrolled with a hub yet; "
              f"its key can change only once the hub knows it", file=sys.stderr)
        return 2
    public, new = begin(data)
    print(f"{'new' if new else 'pending'} key {public.hex()[:16]}... for agent "
          f"{rows['agent_id']}; the agent finishes the rotation with the hub")
    deadline = time.monotonic() + args.wait
    while args.wait > 0:
        status = read_status(data)
        if status.get("state") == "done" and status.get("public_key") == public.hex():
            print(f"key rotated: agent {rows['agent_id']} signs with the new key from seq "
                  f"{status['until'] + 1} on; the old key is gone")
            return 0
        if status.get("state") == "refused":
            print(f"outpost-agent: the hub refused the rotation: {status.get('error')}",
                  file=sys.stderr)
            return 1
        if time.monotonic() >= deadline:
            print(f"outpost-agent: not confirmed within {args.wait:g}s; the new key waits in "
                  f"{data / NEXT} and the agent finishes when it reaches the hub",
                  file=sys.stderr)
            return 1
        time.sleep(0.2)
    return 0
