"""The edge agent's settings: one frozen object from file, ``OUTPOST_*`` env and flags."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field

from federation.config import NodeConfig
from federation.errors import ConfigError
from federation.schemas import LABEL_KEY_PATTERN, NAME_PATTERN

ISOLATION_MODES = ("auto", "cgroup-v2", "cgroup-v1", "rlimit")


def _total_mem_mb() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024))


@dataclass(frozen=True, slots=True)
class AgentConfig(NodeConfig):
    """Everything an edge agent needs to run; the settings every node takes (``data_dir``,
    ``listen``, ``admin_token``, logging, ``nats_url``, API limits, TLS) are in ``NodeConfig``.

    ``data_dir`` holds the store, task directories and keys; ``listen`` is HOST:PORT of the API;
    ``cpus``/``mem_mb``/``disk_mb`` are what tasks may use in all (default: the whole box);
    ``admin_token`` is the API's admin bearer token (generated into the data dir when unset).
    ``max_tasks``: tasks not yet ended (pending to running) this agent holds at once; one more
    is refused with 409 and the agent offers nothing to the core while at the cap.
    ``join_token``: enrols the agent at the core it reaches through ``nats_url``.
    ``artifact_cache_mb``: the most the artifact cache holds (least recently used artifacts no
    task that has not ended uses go first); ``artifact_rate_kbps``: cap on artifact fetches
    from the core (0: none), so a fetch leaves the link to events, heartbeats and commands.
    ``artifact_site_peers``: get artifacts from the agents of the same site that have them
    (behind one site leaf node: ``edge_agent/sitepeers.py``), so each crosses the uplink once.
    """

    listen: str = "127.0.0.1:7070"
    name: str = field(default_factory=lambda: socket.gethostname().lower()[:63] or "edge")
    site: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    cpus: float = float(os.cpu_count() or 1)
    mem_mb: int = field(default_factory=_total_mem_mb)
    disk_mb: int = 10240
    stop_tasks_on_exit: bool = False
    isolation: str = "auto"
    log_max_bytes: int = 10 * 1024 * 1024
    log_keep: int = 2
    events_keep: int = 10000
    join_token: str | None = None
    heartbeat_s: float = 2.0
    outbox_max: int = 200_000
    max_tasks: int = 1000
    artifact_cache_mb: int = 2048
    artifact_rate_kbps: int = 0
    artifact_site_peers: bool = False

    def __post_init__(self) -> None:
        NodeConfig.__post_init__(self)
        if not re.match(NAME_PATTERN, self.name):
            self._bad("name", self.name, "lowercase letters, digits, - _ . (max 63)")
        if not re.match(NAME_PATTERN, self.site):
            self._bad("site", self.site, "lowercase letters, digits, - _ . (max 63)")
        for key in self.labels:
            if not re.match(LABEL_KEY_PATTERN, key):
                self._bad("labels", key, "label keys are letters, digits, - _ . /")
        if not 0 < self.cpus <= 1024:
            self._bad("cpus", self.cpus, "a number above 0")
        if self.mem_mb < 1:
            self._bad("mem_mb", self.mem_mb, "at least 1")
        if self.disk_mb < 0:
            self._bad("disk_mb", self.disk_mb, "0 or more")
        if self.isolation not in ISOLATION_MODES:
            self._bad("isolation", self.isolation, " | ".join(ISOLATION_MODES))
        if self.log_max_bytes < 1024:
            self._bad("log_max_bytes", self.log_max_bytes, "at least 1024")
        if not 0 <= self.log_keep <= 100:
            self._bad("log_keep", self.log_keep, "0 to 100")
        if self.events_keep < 100:
            self._bad("events_keep", self.events_keep, "at least 100")
        if self.join_token is not None and self.nats_url is None:
            raise ConfigError("join_token: given without nats_url; pass --nats URL (the NATS "
                              "of the core or of the site's leaf) with it",
                              details={"setting": "join_token"})
        if not 0.1 <= self.heartbeat_s <= 300:
            self._bad("heartbeat_s", self.heartbeat_s, "0.1 to 300 seconds")
        if self.outbox_max < 1000:
            self._bad("outbox_max", self.outbox_max, "at least 1000")
        if not 1 <= self.max_tasks <= 1_000_000:
            self._bad("max_tasks", self.max_tasks, "1 to 1000000")
        if not 1 <= self.artifact_cache_mb <= 16_777_216:
            self._bad("artifact_cache_mb", self.artifact_cache_mb, "1 to 16777216 MB")
        if not 0 <= self.artifact_rate_kbps <= 10_000_000:
            self._bad("artifact_rate_kbps", self.artifact_rate_kbps,
                      "0 (no cap) to 10000000 kB/s")
