"""The hub's lifecycle owner: NATS (embedded or not), streams, enrollment, ingest, liveness,
commands and the API, started in order and stopped in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from nats import errors as nats_errors
from nats.js import errors as js_errors

from core_hub.artifacts import CoreArtifacts
from core_hub.backend import CoreBackend
from core_hub.commands import Commander
from core_hub.config import HubConfig
from core_hub.dashboard import PUBLIC_PATHS as DASHBOARD_PATHS
from core_hub.dashboard import dashboard_routes
from core_hub.enroll import Enroller, JoinTokens, load_hub_signer
from core_hub.follower import Follower
from core_hub.hubstate import StateMirror
from core_hub.ingest import Ingest
from core_hub.lease import Lease, replica_name
from core_hub.liveness import Liveness, LivenessSettings
from core_hub.natsauth import (
    AUTH_FILE_NAME,
    SHARED_KEY_FILES,
    NatsAuth,
    NatsOperator,
    push_account,
    record_managed,
    signal_reload,
)
from core_hub.registry import Registry
from core_hub.replicaapi import LEADER, TAKING_OVER, ReplicaRouting, Switch
from core_hub.scheduler import CoreScheduler
from core_hub.services import Services
from core_hub.store import HubStore
from federation import objstore, subjects
from federation.app import RUNNER_OPTIONS, build_app
from federation.auth import TokenAuth
from federation.datadirlock import DataDirLock
from federation.identity import load_or_create_key, load_or_create_token
from federation.log import Throttled, redact_url
from federation.loopwatch import LoopWatch
from federation.streams import ensure_hub_buckets, ensure_streams

log = logging.getLogger(__name__)
throttled = Throttled(log)  # lines a peer's traffic could repeat per message

STOP_GRACE_S = 3.0
NATS_RETRY_S = 0.5
JETSTREAM_SETTLE_S = 60.0  # how long a start waits for streams to elect leaders again
TAKEOVER_CATCH_UP_S = 20.0  # a new leader waits at most this for its view before answering


class Hub:
    """One hub process. ``url`` and ``nats_url`` are set once ``start()`` returns."""

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.natsd: Any = None
        self.nc: Any = None
        self.store: HubStore | None = None
        self.parts: list[Any] = []
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.nats_url = config.nats_url or ""
        self.admin_token = ""
        self.registry: Registry | None = None
        self.nats_auth: NatsAuth | None = None  # least privilege on the hub's NATS, if managed
        self.lock: DataDirLock | None = None
        self.lease: Lease | None = None
        self.exit_code = 0  # 3: this replica lost the lease to another and stepped down
        self._stop = asyncio.Event()
        self.artifacts: CoreArtifacts | None = None
        self.follower: Follower | None = None  # a standby's live view, while it is one
        self.routing: ReplicaRouting | None = None  # set once this replica served as a standby
        self._api_backend: Switch | None = None
        self._api_artifacts: Switch | None = None
        self.loop_watch = LoopWatch()

    async def start(self) -> None:
        import nats

        import federation.natsclient  # noqa: F401 (nats-py's late-PONG fix)

        cfg = self.config
        self.loop_watch.start()
        ssl_context = None  # loaded first: a bad certificate stops the hub before it starts
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            from federation.tls import server_context

            ssl_context = server_context(cfg.tls_cert, cfg.tls_key)
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        cfg.data_dir.chmod(0o700)  # keys, tokens, the view and JetStream data live here
        self.lock = DataDirLock(cfg.data_dir, "hub")  # before the view or NATS are touched
        self.store = store = HubStore(cfg.data_dir / "hub.db", loop_writer=True)
        hub_seed, _hub_public = load_or_create_key(cfg.data_dir / "hub.key")
        self._least_privilege(store)
        if cfg.embedded_nats:
            from federation.natsd import NatsServer

            self.natsd = NatsServer(cfg.data_dir / "nats", port=cfg.nats_port,
                                    tls_cert=cfg.nats_tls_cert, tls_key=cfg.nats_tls_key)
            self.natsd.config_extra = f'include "{AUTH_FILE_NAME}"'
            await self.natsd.start()
            self.nats_url = self.natsd.url
            if self.nats_auth is not None:  # offline tools push account updates there
                record_managed(cfg.data_dir, self.nats_auth.path, self.natsd.pid_file,
                               self.nats_url)
        last_error, tries = "", 0

        async def _nats_error(exc: Exception) -> None:
            # Each failed try counts; a new kind of trouble is logged at once, the same one at
            # tries 1, 2, 4, 8, ... then every 120th (about a minute): retries show, not spam.
            nonlocal last_error, tries
            if isinstance(exc, nats_errors.SlowConsumerError):  # one per dropped message
                throttled.warning("slow-consumer", "nats: %s", exc)
                return
            tries += 1
            if repr(exc) != last_error or tries & (tries - 1) == 0 or tries % 120 == 0:
                last_error = repr(exc)
                hint = ""
                if self.nats_auth is not None and "Authorization Violation" in str(exc):
                    hint = ("; the server does not take this hub's NATS credentials: a hub "
                            "replica needs the first hub's " + ", ".join(SHARED_KEY_FILES) +
                            " (docs/scaling.md)")
                log.warning("nats %s: %r (try %d; retrying every %.1fs)%s",
                            redact_url(self.nats_url), exc, tries, NATS_RETRY_S, hint,
                            extra={"tries": tries})

        async def _reconnected() -> None:
            nonlocal last_error, tries
            last_error, tries = "", 0
            log.info("nats: reconnected")

        await self._set_up(_nats_error)
        self.nc = await nats.connect(self.nats_url, name="outpost-hub",
                                     reconnect_time_wait=NATS_RETRY_S, max_reconnect_attempts=-1,
                                     connect_timeout=5,
                                     error_cb=_nats_error, reconnected_cb=_reconnected,
                                     **_nats_tls(cfg, self.nats_url),
                                     **self._nats_credentials(hub_seed))
        js = self.nc.jetstream(timeout=5)
        signer = load_hub_signer(cfg.data_dir)
        self.admin_token = cfg.admin_token or load_or_create_token(cfg.data_dir / "admin.token")
        await self._lead(js, signer, ssl_context)
        store = self.store  # a fresh view if this replica took the lease over from another
        assert store is not None
        self.registry = registry = Registry(js, store, replicas=cfg.stream_replicas)
        state = StateMirror(js, store, replicas=cfg.stream_replicas,
                            fence=self.lease.claim if self.lease else None)

        async def rebuild() -> None:
            await registry.open()
            await registry.restore()
            await state.open()
            await state.flush()  # changes a crash left unwritten go out before any restore
            await state.restore()
        await _while_jetstream_settles(rebuild, "rebuilding the view from JetStream")
        await state.start()
        self.parts.append(state)
        await self._agents_to_nats(js)
        enroller = Enroller(self.nc, store, JoinTokens(store), signer.public,
                            rate_per_s=cfg.enroll_rate_per_s, burst=cfg.enroll_burst)
        enroller.on_enrolled = self._after_agent_change
        enroller.on_forgotten = self._after_agent_forgotten
        if self.nats_auth is not None:
            enroller.issue_jwt = self.nats_auth.issue
        ingest = Ingest(js, store)
        liveness = Liveness(self.nc, store, LivenessSettings(
            cfg.disconnected_after_s, cfg.unreachable_after_s, cfg.max_unreachable_per_s,
            cfg.sync_gap_after_s))
        for part in (enroller, ingest, liveness):
            await part.start()
            self.parts.append(part)
        commander = Commander(js, store, signer, fence=self.lease.claim if self.lease else None,
                              before_send=state.flush)
        await commander.start()  # sends what an earlier run queued, then what is queued now
        self.parts.append(commander)
        scheduler = CoreScheduler(store, commander)
        await scheduler.start()
        self.parts.append(scheduler)
        services = Services(store, scheduler, commander)
        await services.start()
        self.parts.append(services)
        backend = CoreBackend(store=store, commander=commander, liveness=liveness, js=js,
                              ingest_stats=ingest.stats, scheduler=scheduler, nc=self.nc,
                              replies_dropped=lambda: enroller.dropped,
                              enrollments=enroller.stats,
                              services=services, on_agent_change=self._after_agent_change,
                              loop_watch=self.loop_watch,
                              nats_account=None if (auth := self.nats_auth) is None
                              else lambda: auth.account_stats)
        self.artifacts = CoreArtifacts(
            js=js, nc=self.nc, store=store, signer=signer, spool_dir=cfg.data_dir / "spool",
            setup_connection=self._setup_connection,
            send_stage=lambda agent, sha: commander.send(agent, "stage", {"digest": sha}))
        services.artifacts = self.artifacts
        if self.routing is None:
            await self._serve(backend, self.artifacts, ssl_context)
        else:  # a standby that took over: the same socket now answers from the leader's parts
            # once they know at least what the standby's view did (writes get 503 meanwhile)
            await ingest.catch_up(TAKEOVER_CATCH_UP_S)
            self._api_backend.target = backend
            self._api_artifacts.target = self.artifacts
            self.routing.mode = LEADER
            log.info("leading: the API now answers from the leader's view")
            if self.follower is not None:
                await _bounded(self.follower.stop(), "stopping the standby's view")
                self.follower = None
        backend.replica_mode = lambda: LEADER
        await self._advertise()

    async def _serve(self, backend: Any, artifacts: Any, ssl_context: Any,
                     middlewares: list[Any] | None = None) -> None:
        """Open the API on ``listen`` through switches (a standby's backend is replaced by the
        leader's at a takeover, on the same socket), and write ``hub.url``."""
        cfg = self.config
        self._api_backend, self._api_artifacts = Switch(backend), Switch(artifacts)
        api_backend = self._api_backend
        app = build_app(api_backend, TokenAuth(  # type: ignore[arg-type]
                            {self.admin_token: "admin"},
                            lookup=lambda d: api_backend.store.api_token_role(d)),
                        extra_routes=dashboard_routes(), public_paths=DASHBOARD_PATHS,
                        limits=cfg.api_limits,
                        artifact_service=self._api_artifacts,  # type: ignore[arg-type]
                        middlewares=middlewares)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                    shutdown_timeout=1.0, **RUNNER_OPTIONS)
        await self.runner.setup()
        host, port = cfg.host_port
        site = web.TCPSite(self.runner, host, port, reuse_address=True, ssl_context=ssl_context)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        scheme = "https" if ssl_context else "http"
        self.url = f"{scheme}://{host if host != '0.0.0.0' else '127.0.0.1'}:{bound}"
        for name, value in (("hub.url", self.url), ("nats.url", self.nats_url)):
            (cfg.data_dir / f"{name}.tmp").write_text(value)
            (cfg.data_dir / f"{name}.tmp").replace(cfg.data_dir / name)
        log.info("hub serving %s; NATS %s", self.url, redact_url(self.nats_url),
                 extra={"url": self.url, "nats": redact_url(self.nats_url)})

    async def _advertise(self) -> None:
        """Put this replica's API URL in the lease bucket: standbys forward writes there."""
        if self.lease is None:
            return
        url = self.config.advertise_url or self.url
        try:
            await self.lease.advertise(url)
        except Exception as exc:  # standbys answer 503 to writes until it is known
            log.warning("could not advertise the API URL %s: %r", url, exc)

    async def _lead(self, js: Any, signer: Any, ssl_context: Any) -> None:
        """Wait until this replica holds the placement lease (core_hub/lease.py): replicas run
        active/standby, and only the holder enrolls, places, runs services and sends commands.
        A standby meanwhile serves the API from a live view of its own (core_hub/follower.py),
        forwarding writes to the leader.

        A replica that takes over from another has a view that is out of date (the other
        placed, enrolled and revoked meanwhile) and commands queued under its old term: both
        are dropped and the view is rebuilt from JetStream, as for a deleted view. A hub with
        embedded NATS is the only one on its NATS and always leads."""
        assert self.store is not None
        cfg = self.config
        if cfg.embedded_nats:
            return
        self.lease = lease = Lease(js, replica_name(cfg.data_dir))
        lease.on_lost = self._lost_lease
        await _while_jetstream_settles(lease.open, "opening the lease bucket")
        waiting = False
        while True:
            # On a NATS cluster the lease bucket has no leader for a few seconds after a node
            # dies: a standby that gave up then would leave the fleet with nobody to lead.
            try:
                if await lease.try_acquire():
                    break
                if not waiting:
                    holder = await lease.holder_now()
                    log.info("standby: the placement lease is held by %s; waiting for it",
                             holder.holder if holder else "another replica",
                             extra={"holder": holder.holder if holder else None})
                    waiting = True
                await self._follow(js, signer, ssl_context)  # once: a no-op while serving
            except (nats_errors.Error, js_errors.Error, TimeoutError) as exc:
                log.warning("standby: the lease cannot be read now (%r); trying again", exc)
            await asyncio.sleep(lease.ttl_s / 4)
        if self.routing is not None:
            self.routing.mode = TAKING_OVER
        await lease.start()
        if lease.previous not in (None, lease.holder):
            dropped = self.store.command_queue_depth()
            self.store.close()
            for suffix in ("", "-wal", "-shm"):
                (cfg.data_dir / f"hub.db{suffix}").unlink(missing_ok=True)
            self.store = HubStore(cfg.data_dir / "hub.db", loop_writer=True)
            log.warning("took the lease over from %s: rebuilding the view from JetStream; "
                        "%d commands queued in an earlier term dropped", lease.previous,
                        dropped, extra={"previous": lease.previous, "dropped": dropped})

    async def _follow(self, js: Any, signer: Any, ssl_context: Any) -> None:
        """Become a standby that serves: build the live view, then open the API on it."""
        if self.routing is not None:
            return
        assert self.lease is not None
        cfg = self.config
        if self.follower is not None:  # an earlier try failed half-way (NATS went away)
            await _bounded(self.follower.stop(), "stopping the standby's view")
        self.follower = follower = Follower(
            js=js, nc=self.nc, data_dir=cfg.data_dir, replica=self.lease.holder,
            liveness=LivenessSettings(cfg.disconnected_after_s, cfg.unreachable_after_s,
                                      cfg.max_unreachable_per_s, cfg.sync_gap_after_s),
            signer=signer, setup_connection=self._setup_connection,
            loop_watch=self.loop_watch)
        await follower.start()
        assert follower.backend is not None
        self.routing = routing = ReplicaRouting(self.lease.holder, self.lease.leader_url)
        follower.backend.replica_mode = lambda: routing.mode
        await self._serve(follower.backend, follower.artifacts, ssl_context,
                          middlewares=[routing.middleware()])
        await self._advertise()

    def _lost_lease(self) -> None:
        log.error("lost the placement lease to another replica: stopping; restarted, this "
                  "hub waits as a standby")
        self.exit_code = 3
        self._stop.set()

    async def _set_up(self, error_cb: Any) -> None:
        """Create or update the streams and buckets on a connection of its own, closed after:
        with least privilege it is the set-up user's (``natsauth.hub_permissions(setup=True)``),
        the only one that may create or change a stream; the hub's own user cannot."""
        cfg = self.config
        nc = await self._setup_connection(error_cb)
        try:
            js = nc.jetstream(timeout=5)
            for attempt in itertools.count(1):
                try:
                    await ensure_streams(
                        js, replicas=cfg.stream_replicas,
                        events_max_age_s=cfg.events_max_age_s,
                        events_max_bytes=cfg.events_max_bytes,
                        commands_max_age_s=cfg.commands_max_age_s,
                        commands_max_bytes=cfg.commands_max_bytes,
                        duplicate_window_s=cfg.duplicate_window_s,
                        events_max_msgs_per_subject=cfg.events_max_msgs_per_subject,
                        events_max_msg_bytes=cfg.events_max_msg_bytes)
                    await ensure_hub_buckets(js, replicas=cfg.stream_replicas)
                    await objstore.ensure_bucket(js, replicas=cfg.stream_replicas)
                    break
                except (nats_errors.TimeoutError, js_errors.ServiceUnavailableError,
                        js_errors.APIError) as exc:
                    # A NATS cluster still forming has no JetStream leader or too few peers
                    # (err 10005 "no suitable peers"): wait for it, saying so, for a while.
                    if not _forming(exc) or attempt >= SETUP_TRIES:
                        raise
                    log.warning("stream set-up: %r (try %d of %d; the cluster may still be "
                                "forming)", exc, attempt, SETUP_TRIES, extra={"tries": attempt})
                    await asyncio.sleep(NATS_RETRY_S * 2)
        finally:
            await nc.close()

    async def _setup_connection(self, error_cb: Any = None) -> Any:
        """A connection as the set-up user (the hub's own without least privilege); with an
        ``error_cb``, one that keeps trying until the server answers (the hub's start)."""
        from federation.natsclient import connect_once

        cfg = self.config
        creds: dict[str, Any] = {}
        if self.nats_auth is not None:
            creds = self.nats_auth.operator.hub_credentials(setup=True).connect_options()
        retry: dict[str, Any] = (
            {"max_reconnect_attempts": -1, "reconnect_time_wait": NATS_RETRY_S,
             "error_cb": error_cb} if error_cb is not None else {"allow_reconnect": False})
        return await connect_once(self.nats_url, name="outpost-hub-setup", connect_timeout=5,
                                  **retry, **_nats_tls(cfg, self.nats_url), **creds)

    async def _after_agent_change(self, agent_id: str) -> None:
        """The one call site for an agent whose trust changed (enrolled, key rotated, revoked):
        record it in the registry bucket, so a rebuilt view keeps it, then refresh what else
        caches who may speak (NATS credentials)."""
        assert self.registry is not None
        await self.registry.save(agent_id)
        assert self.store is not None and self.nc is not None
        key = self.store.agent_key(agent_id)
        if key is not None and key.revoked:  # nothing may be left for a stolen box to read
            await self._purge_commands_of(agent_id)
        if key is not None and (key.revoked or key.retired):
            # Only a revocation or a rotation changes the NATS account (who is refused); an
            # enrollment needs nothing there: the agent's user JWT is in the reply.
            await self.refresh_nats_auth()

    async def _purge_commands_of(self, agent_id: str) -> None:
        """Purge a revoked agent's command subjects (through a site leaf it may keep its NATS
        rights until the leaf reconnects). The hub's run-time user has no purge right, so this
        goes through the set-up user, whose only purge right is this one stream's."""
        try:
            nc = await self._setup_connection()
        except Exception as exc:
            log.warning("could not purge the commands of revoked agent %s: %r", agent_id, exc,
                        extra={"agent_id": agent_id})
            return
        try:
            await nc.jetstream(timeout=5).purge_stream(
                subjects.COMMANDS_STREAM, subject=subjects.commands_of(agent_id))
        finally:
            await nc.close()

    async def _after_agent_forgotten(self, agent_id: str) -> None:
        """An enrollment taken back (its set-up failed): out of the registry (its user JWT was
        never sent: the reply said the enrollment failed)."""
        assert self.registry is not None and self.registry.kv is not None
        await self.registry.kv.delete(agent_id)

    async def refresh_nats_auth(self) -> bool:
        """Make the NATS account's revocations equal the store's (revoked agents, keys rotated
        away past the grace) and push it to the server: after an agent is revoked or re-keyed.
        True if anything changed; a no-op without least privilege (an external NATS with no
        ``nats_auth_file``)."""
        if self.nats_auth is None:
            return False
        return await self.nats_auth.refresh()

    def _least_privilege(self, store: HubStore) -> None:
        """NATS operator mode (core_hub/natsauth.py): load or make the operator and account
        keys and write the server's config include before the hub connects (the embedded
        server reads it at start)."""
        cfg = self.config
        path = (cfg.data_dir / "nats" / AUTH_FILE_NAME if cfg.embedded_nats
                else cfg.nats_auth_file)
        if path is None:
            log.warning("NATS without least privilege: any client of %s may act as any agent "
                        "(set nats_auth_file and include it in the server's config)",
                        cfg.nats_url)
            return
        operator = NatsOperator.load(cfg.data_dir)
        self.nats_auth = NatsAuth(path, store, operator, self._push_account,
                                  agent_jwt_ttl_s=cfg.agent_jwt_ttl_s)
        record_managed(cfg.data_dir, path, cfg.data_dir / "nats" / "nats-server.pid"
                       if cfg.embedded_nats else cfg.nats_pid_file,
                       None if cfg.embedded_nats else cfg.nats_url)
        if self.nats_auth.write() and cfg.nats_pid_file is not None:
            signal_reload(cfg.nats_pid_file)

    async def _push_account(self, account_jwt: str) -> None:
        assert self.nats_auth is not None
        await push_account(self.nats_url, self.nats_auth.operator, account_jwt,
                           _nats_tls(self.config, self.nats_url))

    def _nats_credentials(self, hub_seed: bytes) -> dict[str, Any]:
        if self.nats_auth is None:
            return {}
        return self.nats_auth.operator.hub_credentials().connect_options()

    async def _agents_to_nats(self, js: Any) -> None:
        """At start, with least privilege: the server gets the account as the store says it
        now (revocations made while the hub was down, or a view restored just now), and the
        rotation grace timer starts. Nothing per agent: each holds its own user JWT."""
        if self.nats_auth is None:
            return
        assert self.store is not None
        self.nats_auth.store = self.store  # a replica that took over has a fresh view
        self.nats_auth.write()
        try:
            await self.nats_auth.push_to_server()
        except Exception as exc:  # noqa: BLE001 (owed: its loop retries until the server has it)
            log.warning("could not push the NATS account at start: %r", exc)
        await self.nats_auth.start()
        self.parts.append(self.nats_auth)

    async def stop(self) -> None:
        """Stops every part in reverse order; each gets a few seconds, so a hub whose NATS is
        gone (a hung or dead link) still exits when told to."""
        if self.runner is not None:
            await self.runner.cleanup()
        if self.routing is not None:
            await self.routing.close()
        if self.follower is not None:
            await _bounded(self.follower.stop(), "stopping the standby's view")
        for part in reversed(self.parts):
            await _bounded(part.stop(), f"stopping {type(part).__name__}")
        if self.nc is not None:
            await _bounded(self.nc.close(), "closing the NATS connection")
        if self.store is not None:
            self.store.close()
        if self.natsd is not None:
            await self.natsd.stop()
        await self.loop_watch.stop()
        if self.lock is not None:
            self.lock.release()
        log.info("hub stopped")

    async def run_until_signalled(self) -> None:
        """Run until SIGTERM or SIGINT, which stop the hub at any time: while it waits for
        NATS at start too (the start is cancelled, then what it had started is stopped)."""
        stop = self._stop
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        starting = asyncio.create_task(self.start(), name="hub-start")
        stopping = asyncio.create_task(stop.wait(), name="hub-signal")
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                log.info("signalled while starting; stopping")
                starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting  # raises what a failed start raised
            await stopping
        finally:
            stopping.cancel()
            await self.stop()


def _nats_tls(cfg: HubConfig, url: str) -> dict[str, Any]:
    """nats.connect arguments for a TLS link: the ``nats_ca`` to trust, for tls:// URLs."""
    if cfg.nats_ca is None and not url.startswith("tls://"):
        return {}
    from federation.tls import client_context

    return {"tls": client_context(cfg.nats_ca, "nats_ca")}


SETUP_TRIES = 30  # stream set-up tries while a cluster forms (about a minute)


def _forming(exc: Exception) -> bool:
    """True for the errors of a JetStream that is not ready yet (no leader, too few peers)."""
    if isinstance(exc, nats_errors.TimeoutError | js_errors.ServiceUnavailableError):
        return True
    return isinstance(exc, js_errors.APIError) and (
        exc.err_code in (10005, 10008) or exc.code == 503)


async def _while_jetstream_settles(step: Callable[[], Awaitable[None]], what: str,
                                   deadline_s: float = JETSTREAM_SETTLE_S) -> None:
    """Run ``step`` (idempotent) until it succeeds. On a NATS cluster a stream or bucket has no
    leader for a few seconds after a node dies, and its API calls time out: a replica that has
    just taken the lease over must wait that out, not exit and leave the fleet leaderless."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline_s
    for attempt in itertools.count(1):
        try:
            await step()
            return
        except (nats_errors.Error, js_errors.Error, TimeoutError) as exc:
            if loop.time() >= give_up:
                raise
            log.warning("%s: JetStream not ready (%r, try %d); trying again", what, exc,
                        attempt, extra={"tries": attempt})
            await asyncio.sleep(1.0)


async def _bounded(coro: Any, what: str, seconds: float = STOP_GRACE_S) -> None:
    try:
        await asyncio.wait_for(coro, seconds)
    except TimeoutError:
        log.warning("%s took over %.0fs; going on", what, seconds)
    except Exception as exc:
        log.warning("%s failed: %r", what, exc)
