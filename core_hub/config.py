"""The hub's settings: one frozen object from file, ``OUTPOST_*`` env and flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from federation.config import NodeConfig, check_tls_files
from federation.errors import ConfigError


@dataclass(frozen=True, slots=True)
class HubConfig(NodeConfig):
    """The hub's settings; those every node takes (``data_dir``, ``listen``, ``admin_token``,
    logging, ``nats_url``, API limits, TLS, ``nats_ca``) are in ``NodeConfig``.

    ``data_dir`` holds the view, keys and (embedded) NATS data; ``listen`` is the API's
    HOST:PORT; ``nats_url`` an external NATS, or ``embedded_nats`` to run one on ``nats_port``
    (0: any free port); liveness thresholds are seconds since an agent's last heartbeat.
    ``nats_tls_cert``/``nats_tls_key``: the embedded nats-server requires TLS with these;
    ``nats_ca``: CA file the hub trusts for its own NATS connection (a private CA)."""

    listen: str = "127.0.0.1:7000"
    embedded_nats: bool = False
    nats_port: int = 4222
    # NATS least privilege (core_hub/natsauth.py): always on with embedded_nats; for an external
    # NATS, the file the hub keeps its authorization in (the server's config includes it) and,
    # on the same host, the server's pid file (the hub then reloads it after each change).
    nats_auth_file: Path | None = None
    nats_pid_file: Path | None = None
    # How long an agent's NATS user JWT is valid; the agent renews its own at half of it
    # (core_hub/renewal.py), and a key revoked or rotated away leaves the account's
    # revocations once every JWT issued for it has expired.
    agent_jwt_ttl_s: float = 7 * 86400.0
    # The enrollment subject is open to the public enroll login: the hub answers this many
    # requests a second (bursts of enroll_burst) and sheds the rest unread (core_hub/enroll.py).
    enroll_rate_per_s: float = 100.0
    enroll_burst: int = 200
    disconnected_after_s: float = 5.0
    unreachable_after_s: float = 10.0
    max_unreachable_per_s: int = 20
    # An agent whose JetStream-acked seq stays ahead of the applied one this long has a gap.
    sync_gap_after_s: float = 30.0
    stream_replicas: int = 1
    events_max_age_s: float = 7 * 86400.0
    events_max_bytes: int = 1 << 30
    commands_max_age_s: float = 7 * 86400.0
    commands_max_bytes: int = 256 << 20
    duplicate_window_s: float = 120.0
    # Per-agent quota on OUTPOST_EVENTS (federation/streams.py): messages per agent subject and
    # the largest message; one agent holds at most their product.
    events_max_msgs_per_subject: int = 20_000
    events_max_msg_bytes: int = 1 << 20
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    # The API URL other hub replicas forward writes to while this one leads (default: the
    # address it listens on; set it when that is not what the other replicas reach).
    advertise_url: str | None = None

    def __post_init__(self) -> None:
        if self.nats_url is None and not self.embedded_nats:
            raise ConfigError("nats_url: not set; give --nats URL (an external NATS server) "
                              "or --embedded-nats (the hub runs one)",
                              details={"setting": "nats_url"})
        NodeConfig.__post_init__(self)
        if not 0 <= self.nats_port <= 65535:
            self._bad("nats_port", self.nats_port, "0 to 65535")
        if self.nats_auth_file is not None and self.embedded_nats:
            self._bad("nats_auth_file", str(self.nats_auth_file),
                      "unset with embedded_nats (it keeps its own, under data_dir/nats)")
        if self.nats_pid_file is not None and self.nats_auth_file is None:
            self._bad("nats_pid_file", str(self.nats_pid_file), "only with nats_auth_file")
        if not 10.0 <= self.agent_jwt_ttl_s <= 366 * 86400.0:
            self._bad("agent_jwt_ttl_s", self.agent_jwt_ttl_s, "10 s to 366 days")
        if not 1.0 <= self.enroll_rate_per_s <= 100_000:
            self._bad("enroll_rate_per_s", self.enroll_rate_per_s, "1 to 100000 a second")
        if not 1 <= self.enroll_burst <= 100_000:
            self._bad("enroll_burst", self.enroll_burst, "1 to 100000")
        if not 0 < self.disconnected_after_s < self.unreachable_after_s:
            self._bad("unreachable_after_s", self.unreachable_after_s,
                      "more than disconnected_after_s, both above 0")
        if self.max_unreachable_per_s < 1:
            self._bad("max_unreachable_per_s", self.max_unreachable_per_s, "at least 1")
        if not self.sync_gap_after_s > 0:
            self._bad("sync_gap_after_s", self.sync_gap_after_s, "above 0")
        if self.stream_replicas not in (1, 3, 5):
            self._bad("stream_replicas", self.stream_replicas, "1, 3 or 5")
        if not 0 < self.duplicate_window_s <= min(self.events_max_age_s,
                                                  self.commands_max_age_s):
            self._bad("duplicate_window_s", self.duplicate_window_s,
                      "above 0 and not longer than either stream's max age")
        if self.events_max_bytes < 1 << 20 or self.commands_max_bytes < 1 << 20:
            self._bad("events_max_bytes", self.events_max_bytes, "at least 1 MiB (both streams)")
        if self.events_max_msgs_per_subject < 10:
            self._bad("events_max_msgs_per_subject", self.events_max_msgs_per_subject,
                      "at least 10")
        if not 512 << 10 <= self.events_max_msg_bytes <= 8 << 20:
            self._bad("events_max_msg_bytes", self.events_max_msg_bytes,
                      "512 KiB to 8 MiB (an edge's batches reach 400 kB)")
        if self.advertise_url is not None and (
                not self.advertise_url.startswith(("http://", "https://"))
                or len(self.advertise_url) > 512):
            self._bad("advertise_url", self.advertise_url, "an http:// or https:// URL")
        check_tls_files(self.nats_tls_cert, self.nats_tls_key, "nats_tls")
        if self.nats_tls_cert is not None and not self.embedded_nats:
            self._bad("nats_tls_cert", str(self.nats_tls_cert),
                      "only with embedded_nats (an external NATS has its own tls block)")
