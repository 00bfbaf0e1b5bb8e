"""Which hub replica may place and command: a lease in the ``OUTPOST_LEASE`` KV bucket, fenced.

Hub replicas run active/standby: one holds the lease and runs the hub (placement, services,
enrollment, commands); the others wait for it. The lease is one KV key, ``leader``, holding
``{"holder", "epoch", "expires"}``:

- *Acquire* with ``create`` (the key never existed) or, once the record's ``expires`` has
  passed, with ``update(last=revision)``: of several contenders exactly one wins. A replica
  that finds its own name in the record takes it back at once: the data dir lock proves the
  process that wrote it is gone (a hub restarted after a crash does not wait out its TTL).
- *Renew* with ``update(last=revision)``, the revision we last wrote. Any other write since
  makes it fail, and we stop at once.
- *Fence* every batch of commands with the same compare-and-set before it is published
  (``claim``). Safety rests on that compare-and-set, not on clocks: a replica that was frozen
  (SIGSTOP, a partition) and wakes still believing it leads holds a stale revision, so
  JetStream refuses its claim and nothing it decided is sent. Clocks only decide *when* a
  contender may take over an unrenewed lease (``expires`` is the holder's clock; replicas are
  assumed to be within a second or two of each other, as NTP keeps them).
- *Release* at a clean stop by writing ``expires: 0``, so a standby takes over within one
  retry rather than one TTL. The record keeps the holder's name: ``previous`` says, at
  acquisition, whether anyone else led since this replica did (its queued commands are then
  stale decisions and are dropped: core_hub/hub.py).

The revision of the acquiring write is the epoch (stream sequences only grow).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from federation import subjects
from federation.errors import OutpostError
from federation.loopguard import stop_loops

log = logging.getLogger(__name__)

KEY = "leader"
TTL_S = 6.0


def replica_name(data_dir: Path) -> str:
    """This replica's name in the lease: the host and an id kept in its data dir, so a
    restarted hub knows the lease it finds was its own. (A copied data dir would copy the id:
    give each replica its own data dir and copy only ``hub.key``.)"""
    path = data_dir / "replica.id"
    try:
        rid = path.read_text().strip()
    except FileNotFoundError:
        rid = ""
    if not rid or len(rid) > 64 or not rid.isalnum():
        rid = secrets.token_hex(6)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(rid + "\n")
        tmp.replace(path)
    return f"{socket.gethostname()[:64]}-{rid}"


def _api_key(holder: str) -> str:
    """The lease bucket's key for a replica's advertised API URL (KV keys allow few chars)."""
    return "api." + re.sub(r"[^-_a-zA-Z0-9]", "_", holder)


class LeaseLost(OutpostError):
    """This replica does not hold the lease (any more): place nothing."""

    code = "lease_lost"
    status = 503


@dataclass(frozen=True)
class LeaseRecord:
    holder: str
    epoch: int
    expires: float
    term: str = ""  # random per acquisition: tells our own write from anyone else's

    @classmethod
    def decode(cls, raw: bytes) -> LeaseRecord | None:
        """None for anything that is not a well-formed record (a node is hostile until proven
        otherwise: a corrupt record is treated as expired, not trusted)."""
        try:
            body = orjson.loads(raw)
            holder, epoch, expires = body["holder"], body["epoch"], body["expires"]
            term = body.get("term", "")
        except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
            return None
        if (not isinstance(holder, str) or not holder or isinstance(epoch, bool)
                or not isinstance(epoch, int) or isinstance(expires, bool)
                or not isinstance(expires, int | float) or expires != expires
                or not isinstance(term, str)):
            return None
        return cls(holder=holder, epoch=epoch, expires=float(expires), term=term)

    def encode(self) -> bytes:
        return orjson.dumps({"holder": self.holder, "epoch": self.epoch,
                             "expires": self.expires, "term": self.term})


class Lease:
    """One replica's view of the lease. ``held`` is true only between a successful acquire or
    renew and the next failure; ``claim()`` re-checks it against JetStream."""

    def __init__(self, js: Any, holder: str, *, ttl_s: float = TTL_S) -> None:
        self.js = js
        self.holder = holder
        self.ttl_s = ttl_s
        self.revision = 0  # the KV revision we last wrote; 0 when we do not hold the lease
        self.epoch = 0
        self.acquired = 0
        self.previous: str | None = None  # who held the lease before we acquired it
        self.on_lost: Callable[[], None] | None = None
        self.term = ""
        self.lost = 0
        self._kv: Any = None
        self._lock = asyncio.Lock()
        self._loop: asyncio.Task[None] | None = None

    @property
    def held(self) -> bool:
        return self.revision > 0

    async def open(self) -> None:
        self._kv = await self.js.key_value(subjects.LEASE_BUCKET)

    async def start(self) -> None:
        await self.open()
        await self.try_acquire()
        self._loop = asyncio.create_task(self._run(), name="lease")

    async def stop(self, *, release: bool = True) -> None:
        await stop_loops(self._loop)
        if release and self.held:
            # Hand over at once rather than after a TTL (fenced: a lease we already lost is
            # left alone).
            with contextlib.suppress(Exception):
                await self._write(self._record(0.0))
            self.revision = 0

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3 if self.held else self.ttl_s / 4)
            try:
                if self.held:
                    await self.renew()
                else:
                    await self.try_acquire()
            except asyncio.CancelledError:
                raise
            except LeaseLost:
                pass  # logged where it was lost; try to acquire on the next turn
            except Exception:  # noqa: BLE001 - a lease loop that dies would stop placement
                log.exception("lease loop error")

    async def try_acquire(self) -> bool:
        """Take the lease if it was never held, has expired, or was ours (see the module)."""
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        async with self._lock:
            if self.held:
                return True
            try:
                entry = await self._kv.get(KEY)
            except KeyNotFoundError:
                entry = None
            now = time.time()
            self.term = secrets.token_hex(8)
            try:
                if entry is None or not entry.value:
                    self.previous = None
                    revision = await self._kv.create(KEY, self._record().encode())
                else:
                    current = LeaseRecord.decode(entry.value)
                    ours = current is not None and current.holder == self.holder
                    if current is not None and not ours and current.expires > now:
                        return False
                    self.previous = current.holder if current is not None else None
                    revision = await self._kv.update(KEY, self._record().encode(),
                                                     last=entry.revision)
            except KeyWrongLastSequenceError:
                return False  # another replica was faster
            self.revision = self.epoch = revision
            self.acquired += 1
            log.info("lease acquired", extra={"holder": self.holder, "epoch": revision,
                                              "previous": self.previous})
            return True

    def _record(self, expires: float | None = None) -> LeaseRecord:
        return LeaseRecord(self.holder, self.epoch,
                           time.time() + self.ttl_s if expires is None else expires, self.term)

    async def holder_now(self) -> LeaseRecord | None:
        """Who holds the lease, as the bucket says (None: nobody, or a record not ours to
        trust)."""
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self._kv.get(KEY)
        except KeyNotFoundError:
            return None
        return LeaseRecord.decode(entry.value) if entry.value else None

    async def advertise(self, url: str) -> None:
        """Say where this replica's API serves, so standbys can forward writes to it."""
        await self._kv.put(_api_key(self.holder), url.encode())

    async def leader_url(self) -> tuple[str | None, str | None]:
        """The holder of a live lease and the API URL it advertised (None where unknown)."""
        from nats.js.errors import KeyNotFoundError

        record = await self.holder_now()
        if record is None or record.expires <= time.time():
            return None, None
        try:
            entry = await self._kv.get(_api_key(record.holder))
        except KeyNotFoundError:
            return record.holder, None
        url = (entry.value or b"").decode("utf-8", "replace")
        if not url.startswith(("http://", "https://")) or len(url) > 512:
            log.warning("the lease holder's advertised API URL %r is not one: ignored",
                        url[:80])
            return record.holder, None
        return record.holder, url

    async def renew(self) -> None:
        await self.claim()

    async def claim(self) -> int:
        """Compare-and-set the lease: extends it and proves we still hold it. Returns the
        revision written (the fencing token); raises ``LeaseLost`` otherwise."""
        async with self._lock:
            if not self.held:
                raise LeaseLost("this replica does not hold the placement lease")
            return await self._write(self._record())

    async def _write(self, record: LeaseRecord) -> int:
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            self.revision = await self._kv.update(KEY, record.encode(), last=self.revision)
        except KeyWrongLastSequenceError:
            if not await self._was_ours():
                self._lose("another replica holds the lease")
            return await self._write(record)  # our own earlier write, its answer lost
        except Exception as exc:
            # No answer does not prove we lost it, but a claim we cannot prove must not pass;
            # keep the revision: the next renew (or the TTL) decides.
            raise LeaseLost(f"the lease could not be checked: {exc}") from exc
        return self.revision

    async def _was_ours(self) -> bool:
        """After a refused compare-and-set: was the last write our own, whose answer we never
        got (a claim that timed out on a hung NATS yet was stored)? Then nobody else wrote
        since, and we adopt its revision."""
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self._kv.get(KEY)
        except KeyNotFoundError:
            return False
        current = LeaseRecord.decode(entry.value) if entry.value else None
        if (current is None or current.holder != self.holder or not self.term
                or current.term != self.term or entry.revision <= self.revision):
            return False
        self.revision = entry.revision
        return True

    def _lose(self, why: str) -> None:
        self.revision = 0
        self.lost += 1
        log.warning("lease lost", extra={"holder": self.holder, "epoch": self.epoch,
                                         "why": why})
        if self.on_lost is not None:
            self.on_lost()
        raise LeaseLost(why)
