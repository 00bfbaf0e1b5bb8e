"""The edge agent's settings: one frozen object from file, ``OUTPOST_*`` env and flags."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from federation.config import check_readable, check_tls_files, parse_listen
from federation.errors import ConfigError
from federation.limits import ApiLimits
from federation.schemas import LABEL_KEY_PATTERN, NAME_PATTERN

ISOLATION_MODES = ("auto", "cgroup-v2", "cgroup-v1", "rlimit")


def _total_mem_mb() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024))


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything an edge agent needs to run.

    ``data_dir`` holds the store, task directories and keys; ``listen`` is HOST:PORT of the API;
    ``cpus``/``mem_mb``/``disk_mb`` are what tasks may use in all (default: the whole box);
    ``admin_token`` is the API's admin bearer token (generated into the data dir when unset).
    ``max_tasks``: tasks not yet ended (pending to running) this agent holds at once; one more
    is refused with 409 and the agent offers nothing to the core while at the cap.
    ``rate_limit_per_s``/``rate_limit_burst``/``max_streams_per_token``: per-token API limits
    (``federation.limits``). ``tls_cert``/``tls_key``: serve the API over HTTPS (PEM files).
    ``nats_ca``: CA file that signed the NATS server's certificate (for ``tls://`` URLs).
    """

    data_dir: Path
    listen: str = "127.0.0.1:7070"
    name: str = field(default_factory=lambda: socket.gethostname().lower()[:63] or "edge")
    site: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    cpus: float = float(os.cpu_count() or 1)
    mem_mb: int = field(default_factory=_total_mem_mb)
    disk_mb: int = 10240
    admin_token: str | None = None
    stop_tasks_on_exit: bool = False
    isolation: str = "auto"
    log_max_bytes: int = 10 * 1024 * 1024
    log_keep: int = 2
    events_keep: int = 10000
    log_format: str = "text"
    log_level: str = "info"
    nats_url: str | None = None
    join_token: str | None = None
    heartbeat_s: float = 2.0
    outbox_max: int = 200_000
    max_tasks: int = 1000
    rate_limit_per_s: float = 1000.0
    rate_limit_burst: int = 2000
    max_streams_per_token: int = 32
    tls_cert: Path | None = None
    tls_key: Path | None = None
    nats_ca: Path | None = None

    def __post_init__(self) -> None:
        self.host_port  # noqa: B018 (validates listen)
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
        if self.log_format not in ("text", "json"):
            self._bad("log_format", self.log_format, "text | json")
        if self.log_level not in ("debug", "info", "warning", "error"):
            self._bad("log_level", self.log_level, "debug | info | warning | error")
        if self.nats_url is not None and not re.match(r"^(nats|tls)://[^\s/]+$", self.nats_url):
            self._bad("nats_url", self.nats_url, "nats://HOST:PORT")
        if not 0.1 <= self.heartbeat_s <= 300:
            self._bad("heartbeat_s", self.heartbeat_s, "0.1 to 300 seconds")
        if self.outbox_max < 1000:
            self._bad("outbox_max", self.outbox_max, "at least 1000")
        if self.admin_token is not None and len(self.admin_token) < 16:
            self._bad("admin_token", "(hidden)", "at least 16 characters")
        if not 1 <= self.max_tasks <= 1_000_000:
            self._bad("max_tasks", self.max_tasks, "1 to 1000000")
        self.api_limits  # noqa: B018 (validates the limits)
        check_tls_files(self.tls_cert, self.tls_key)
        check_readable(self.nats_ca, "nats_ca")

    @property
    def api_limits(self) -> ApiLimits:
        return ApiLimits(self.rate_limit_per_s, self.rate_limit_burst, self.max_streams_per_token)

    @staticmethod
    def _bad(setting: str, value: object, expected: str) -> None:
        raise ConfigError(f"{setting}: {value!r} is not valid; expected {expected}",
                          details={"setting": setting})

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_listen(self.listen)
