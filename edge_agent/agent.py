"""The edge agent's lifecycle owner: opens the store, recovers tasks, serves the API, stops."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from aiohttp import web

from edge_agent.artifact_service import EdgeArtifacts
from edge_agent.artifacts import ArtifactCache
from edge_agent.backend import EdgeBackend
from edge_agent.config import AgentConfig
from edge_agent.executor import Executor, boot_id
from edge_agent.faults import NO_FAULTS, Faults
from edge_agent.isolation import choose
from edge_agent.oci import OciDriver
from edge_agent.reserve import Reserve
from edge_agent.scheduler import Capacity
from edge_agent.sitepeers import SitePeers
from edge_agent.staging import Stager
from edge_agent.status_page import status_page
from edge_agent.store import Store
from edge_agent.supervisor import Supervisor
from federation.app import RUNNER_OPTIONS, build_app
from federation.auth import TokenAuth
from federation.datadirlock import DataDirLock
from federation.identity import id_from_public_key, load_or_create_key, load_or_create_token
from federation.loopguard import LoopGuard
from federation.loopwatch import LoopWatch

log = logging.getLogger(__name__)

# What a task's environment inherits from the agent's; nothing else leaks into tasks.
INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "HOME")


class Agent:
    """Starts and stops every part of one edge agent, in order."""

    def __init__(self, config: AgentConfig, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = dict(os.environ if env is None else env)
        self.runner: web.AppRunner | None = None
        self.store: Store | None = None
        self.supervisor: Supervisor | None = None
        self.url = ""
        self.admin_token = ""
        self.sync: Any = None
        self.backend: EdgeBackend | None = None
        self.lock: DataDirLock | None = None
        self.loops = LoopGuard()
        self.faults = NO_FAULTS
        self.artifacts: EdgeArtifacts | None = None
        # On a Raspberry-Pi-class box a slow SD card can hold the loop, and with it the
        # supervisor's tick, the API and the link: such a stall is logged with its stack.
        self.loop_watch = LoopWatch()

    def _artifacts(self, store: Store) -> EdgeArtifacts:
        """The artifact cache and its stager: fetches go over the link's connection while
        there is one, verified with the hub key this agent enrolled with."""
        cfg = self.config
        cache = ArtifactCache(store, cfg.data_dir / "artifacts", cfg.artifact_cache_mb << 20)
        stager = Stager(cache, nc=lambda: getattr(self.sync, "nc", None),
                        hub_key=lambda: getattr(self.sync, "hub_key", None),
                        rate_kbps=cfg.artifact_rate_kbps)
        return EdgeArtifacts(stager)

    def _identity(self, store: Store) -> str:
        agent_id = store.get_meta("agent_id")
        if agent_id is None:
            _, public = load_or_create_key(self.config.data_dir / "agent.key")
            agent_id = id_from_public_key(public)
            store.set_meta("agent_id", agent_id)
        return agent_id

    async def start(self) -> None:
        cfg = self.config
        self.loop_watch.start()
        ssl_context = None  # loaded first: a bad certificate stops the agent before anything runs
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            from federation.tls import server_context

            ssl_context = server_context(cfg.tls_cert, cfg.tls_key)
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(cfg.data_dir, 0o700)
        # Before anything else reads the data dir: a second agent here must not adopt tasks.
        self.lock = DataDirLock(cfg.data_dir, "agent")
        self.store = store = Store(cfg.data_dir / "agent.db")
        agent_id = self._identity(store)
        store.agent_id, store.site = agent_id, cfg.site
        isolation = choose(cfg.isolation, f"outpost-{agent_id[:12]}")
        base_env = {k: self.env[k] for k in INHERITED_ENV if k in self.env}
        base_env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        executor = Executor(cfg.data_dir / "tasks", isolation, base_env, on_exit=lambda *_: None,
                            log_max_bytes=cfg.log_max_bytes, log_keep=cfg.log_keep)
        reserve = Reserve(cfg.data_dir / "reserve")
        reserve.ensure()
        self.faults = faults = Faults.from_env(self.env)
        self.loops = loops = LoopGuard(faults.loop_errors)
        self.supervisor = supervisor = Supervisor(
            store, executor, Capacity(cfg.cpus, cfg.mem_mb, cfg.disk_mb), boot_id(),
            stop_tasks_on_exit=cfg.stop_tasks_on_exit, events_keep=cfg.events_keep,
            max_tasks=cfg.max_tasks, faults=faults, loops=loops, reserve=reserve,
            oci=OciDriver.detect(cfg.data_dir, executor.tasks_dir, isolation, base_env))
        self.artifacts = self._artifacts(store)
        if cfg.artifact_site_peers:
            stager = self.artifacts.stager
            stager.peers = SitePeers(agent_id, cfg.site, blob=self.artifacts.cache.path,
                                     progress=stager.progress)
        supervisor.stager = self.artifacts.stager
        if supervisor.oci is not None:  # images can be artifacts too
            supervisor.oci.stager = self.artifacts.stager
        await supervisor.start()
        backend = EdgeBackend(agent_id=agent_id, name=cfg.name, site=cfg.site,
                              labels=cfg.labels, isolation=isolation.name, store=store,
                              supervisor=supervisor, loop_watch=self.loop_watch)
        backend.extra_metrics = self.artifacts.metrics
        backend.held_artifacts = self.artifacts.cache.held
        backend.stage_artifact = self.artifacts.stage_ahead
        self.backend = backend
        if cfg.nats_url:
            await self._start_sync(backend)
        self.admin_token = cfg.admin_token or load_or_create_token(cfg.data_dir / "admin.token")
        app = build_app(backend, TokenAuth({self.admin_token: "admin"}),
                        extra_routes=[web.get("/", status_page)], public_paths=("/",),
                        limits=cfg.api_limits, artifact_service=self.artifacts)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                    shutdown_timeout=1.0, **RUNNER_OPTIONS)
        await self.runner.setup()
        host, port = cfg.host_port
        site = web.TCPSite(self.runner, host, port, reuse_address=True, ssl_context=ssl_context)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        scheme = "https" if ssl_context else "http"
        self.url = f"{scheme}://{host if host != '0.0.0.0' else '127.0.0.1'}:{bound}"
        # Written whole then renamed: whoever polls for this file never reads it half-written.
        (cfg.data_dir / "agent.url.tmp").write_text(self.url)
        (cfg.data_dir / "agent.url.tmp").replace(cfg.data_dir / "agent.url")
        log.info("edge agent %s (%s, site %s) serving %s; isolation %s", cfg.name, agent_id,
                 cfg.site, self.url, isolation.name,
                 extra={"agent": agent_id, "url": self.url})

    async def _start_sync(self, backend: EdgeBackend) -> None:
        from edge_agent.commands import CommandApplier
        from edge_agent.keyrotation import KeyRotation
        from edge_agent.sync import Sync, SyncSettings
        from federation import __version__
        from federation.wire import Signer

        cfg = self.config
        assert self.store is not None and self.supervisor is not None
        seed, _ = load_or_create_key(cfg.data_dir / "agent.key")
        self.sync = Sync(
            SyncSettings(cfg.nats_url or "", cfg.join_token, cfg.heartbeat_s, cfg.outbox_max,
                         __version__, nats_ca=cfg.nats_ca),
            self.store, Signer(seed), backend.agent_record, self.supervisor.snapshot,
            CommandApplier(backend), offer=backend.current_offer, nats_key=seed)
        backend.link_status = self.sync.status
        self.sync.rpc_backend = backend
        if self.artifacts is not None:
            self.sync.site_peers = self.artifacts.stager.peers
        self.sync.rotation = KeyRotation(cfg.data_dir, self.store)
        self.sync.loops = self.loops
        self.sync.clock = self.faults.wall_clock
        await self.sync.start()

    async def stop(self) -> None:
        if self.sync is not None:
            await self.sync.stop()
        if self.runner is not None:
            await self.runner.cleanup()
        if self.artifacts is not None:
            await self.artifacts.stop()
        if self.supervisor is not None:
            await self.supervisor.stop()
            self.supervisor.executor.isolation.close()
        if self.store is not None:
            self.store.close()
        await self.loop_watch.stop()
        if self.lock is not None:
            self.lock.release()
        log.info("edge agent stopped")

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()
