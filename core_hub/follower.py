"""A standby replica's live view, so every hub replica serves the whole API.

Replicas run active/standby under the placement lease (core_hub/lease.py), but a standby is not
idle: it keeps a view of its own (``follower.db``, rebuilt at each start) from the same sources
a leader rebuilds from, followed live rather than read once:

- the agent registry (KV ``OUTPOST_AGENTS``): enrollments, key rotations, revocations and
  enrollments taken back, as the leader writes them;
- the hub state buckets (services, API and join tokens, launches: core_hub/hubstate.py);
- the agents' events (``OUTPOST_EVENTS``), through an ingest consumer of its own
  (``outpost-hub-follow-<replica>``, removed by the server once unused for an hour);
- heartbeats, for the same liveness the leader computes.

The view is read-only: it enrolls, places and commands nothing and writes nothing to JetStream.
Reads are answered from it; writes are forwarded to the leader (core_hub/replicaapi.py). When
the standby takes the lease over, the leader's parts start on the leader's own view and the
API switches to them; the follower then stops and its file is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from nats import errors as nats_errors
from nats.js import errors as js_errors

from core_hub.artifacts import CoreArtifacts
from core_hub.backend import CoreBackend
from core_hub.commands import Commander
from core_hub.hubstate import BUCKETS
from core_hub.ingest import Ingest
from core_hub.liveness import Liveness, LivenessSettings
from core_hub.registry import BUCKET as AGENTS_BUCKET
from core_hub.registry import Registry
from core_hub.scheduler import CoreScheduler
from core_hub.services import Services
from core_hub.store import HubStore
from federation import wire
from federation.datadirlock import DataDirLock, DataDirLocked
from federation.errors import ConfigError
from federation.kvsnapshot import DELETES, values_end
from federation.loopguard import stop_loops
from federation.loopwatch import LoopWatch

log = logging.getLogger(__name__)

VIEW_FILE = "follower.db"
INGEST_IDLE_S = 3600.0  # the server removes a gone standby's consumer after this
READY_TIMEOUT_S = 20.0  # then serve what is known: the lease waits meanwhile


class Follower:
    """Builds and keeps a standby's view; ``start()`` returns once it has caught up with the
    buckets (the events follow as ingest reads them), ``stop()`` ends it and deletes it."""

    def __init__(self, *, js: Any, nc: Any, data_dir: Path, replica: str,
                 liveness: LivenessSettings, signer: wire.Signer,
                 setup_connection: Callable[..., Any],
                 loop_watch: LoopWatch | None = None) -> None:
        self.js = js
        self.loop_watch = loop_watch
        self.nc = nc
        self.data_dir = data_dir
        self.replica = replica
        self.liveness_settings = liveness
        self.signer = signer
        self.setup_connection = setup_connection
        self.store: HubStore | None = None
        self.backend: CoreBackend | None = None
        self.artifacts: CoreArtifacts | None = None
        self.applied = 0  # KV changes taken from the leader
        self.errors = 0
        self._watches: list[asyncio.Task[None]] = []
        self._parts: list[Any] = []

    async def start(self) -> None:
        self._delete_view()
        self.store = store = HubStore(self.data_dir / VIEW_FILE, loop_writer=True)
        registry = Registry(self.js, store)
        ready: list[asyncio.Event] = []
        for bucket, apply in [(AGENTS_BUCKET, registry.follow),
                              *((bucket, _state_apply(store, kind))
                                for kind, bucket in BUCKETS.items())]:
            event = asyncio.Event()
            ready.append(event)
            self._watches.append(asyncio.create_task(
                self._follow(bucket, apply, event), name=f"follow-{bucket}"))
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await asyncio.gather(*(event.wait() for event in ready))
        except TimeoutError:
            log.warning("standby: the buckets were not all read within %.0fs; serving what "
                        "is known and catching up", READY_TIMEOUT_S)
        ingest = Ingest(self.js, store, durable=f"outpost-hub-follow-{self.replica}",
                        inactive_threshold_s=INGEST_IDLE_S)
        liveness = Liveness(self.nc, store, self.liveness_settings)
        for part in (ingest, liveness):
            await part.start()
            self._parts.append(part)
        # The leader's parts, never started here: the backend reads through them (service
        # lists, metrics); every write is forwarded to the leader before it reaches them.
        commander = Commander(self.js, store, self.signer)
        scheduler = CoreScheduler(store, commander)
        services = Services(store, scheduler, commander)
        self.backend = CoreBackend(store=store, commander=commander, liveness=liveness,
                                   js=self.js, ingest_stats=ingest.stats, scheduler=scheduler,
                                   nc=self.nc, services=services,
                                   loop_watch=self.loop_watch)
        self.artifacts = CoreArtifacts(
            js=self.js, nc=self.nc, store=store, signer=self.signer,
            spool_dir=self.data_dir / "spool", setup_connection=self.setup_connection,
            send_stage=_no_stage)
        log.info("standby: serving the API from a live view (%d KV records so far)",
                 self.applied, extra={"applied": self.applied})

    async def stop(self) -> None:
        await stop_loops(*self._watches)
        self._watches.clear()
        for part in reversed(self._parts):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await part.stop()
        self._parts.clear()
        if self.store is not None:
            self.store.close()
            self.store = None
        self._delete_view()

    def _delete_view(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            (self.data_dir / f"{VIEW_FILE}{suffix}").unlink(missing_ok=True)

    async def _follow(self, bucket: str, apply: Callable[[str, bytes | None], None],
                      ready: asyncio.Event) -> None:
        """Apply every change of ``bucket`` as it comes; a watch that fails (a node died, the
        link was cut) is opened again and replays the bucket, which ``apply`` takes twice
        without harm."""
        while True:
            watcher = None
            try:
                kv = await self.js.key_value(bucket)
                end = await values_end(kv)
                if end == 0:
                    ready.set()
                watcher = await kv.watchall()
                while True:
                    try:
                        entry = await watcher.updates(timeout=30.0)
                    except nats_errors.TimeoutError:
                        continue
                    if entry is None:  # nats-py's marker comes too early at times
                        continue  # (federation/kvsnapshot.py): the server's count decides
                    value = None if entry.operation in DELETES else entry.value
                    try:
                        apply(entry.key, value)
                        self.applied += 1
                    except Exception:  # one bad record must not stop the view (it is logged)
                        self.errors += 1
                        log.exception("standby: could not apply %s key %r", bucket,
                                      entry.key[:80])
                    if entry.revision >= end:  # the bucket's values then are in
                        ready.set()
            except asyncio.CancelledError:
                raise
            except (nats_errors.Error, js_errors.Error, OSError, TimeoutError) as exc:
                self.errors += 1
                log.warning("standby: following %s failed (%r); watching again", bucket, exc)
            except Exception:
                self.errors += 1
                log.exception("standby: following %s failed; watching again", bucket)
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await watcher.stop()
            await asyncio.sleep(1.0)


def refuse_if_standby(data_dir: Path) -> None:
    """The offline CLI (tokens, revocations) writes the view in ``data_dir``; a running
    standby's is not the leader's and is rebuilt when it takes over, so what the CLI wrote
    there would be lost: refuse, and say where to run it."""
    if not (data_dir / VIEW_FILE).exists():
        return
    try:
        DataDirLock(data_dir, "hub").release()
    except DataDirLocked:
        raise ConfigError(
            f"{data_dir} is a standby hub replica's (it follows the leader): run this on the "
            "leader's data dir (its GET /v1/health says \"replica\": \"leader\")",
            details={"data_dir": str(data_dir)}) from None


def _state_apply(store: HubStore, kind: str) -> Callable[[str, bytes | None], None]:
    def apply(key: str, value: bytes | None) -> None:
        store.follow_state(kind, key, None if not value else orjson.loads(value))
    return apply


async def _no_stage(agent: str, sha: str) -> str:
    raise RuntimeError("a standby sends no commands")  # writes are forwarded to the leader
