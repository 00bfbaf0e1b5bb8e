"""The two JetStream streams of the wire contract, created or brought up to date at start.

Both the hub and the embedded demo call ``ensure_streams`` every time they start: it is
idempotent, so a second hub replica or a restart never fails on "stream exists", and a changed
limit (a longer retention, say) is applied to the existing stream without losing its messages.

Both streams use limits retention: the hub rebuilds its whole view from ``OUTPOST_EVENTS``
(DESIGN.md, "Scale"), and an agent finds its commands on ``OUTPOST_COMMANDS`` even after hours
away: it reads them by direct get (``allow_direct``), with no consumer per agent
(``federation/commandlog.py`` says why). ``max_consumers`` is set explicitly: the commands
stream needs none (a few are left for tools), so nothing piles up server state per agent.
The duplicate window is what makes ``Nats-Msg-Id = <agent>:<first>:<last>:<tag>`` dedupe
re-sent outbox rows; it must cover the publisher's retry horizon. The id's ``tag`` is keyed by
the agent's own secret (``edge_agent/sync.py``), because JetStream dedupes across the whole
stream: with a guessable id, one agent could make the stream drop another's batches.

Per-agent quotas: every agent publishes on its own subject, so ``max_msgs_per_subject`` with
``max_msg_size`` bounds what one agent can hold in ``OUTPOST_EVENTS`` (at most
``max_msgs_per_subject * max_msg_size`` bytes; NATS has no per-subject byte limit). A flooding
edge then only turns over its own oldest messages (discard old applies per subject first), and
cannot push the other agents' events out of a size-limited stream while the stream's
``max_bytes`` is at least the sum of those bounds over the fleet's agents.

What the hub may touch is listed here once: ``HUB_STREAMS`` and ``HUB_KV_BUCKETS``. The hub's
NATS permissions (``core_hub/natsauth.py``) are derived from these two tuples, and
``ensure_hub_buckets`` creates every bucket listed; a new bucket is one more name (and, if it
needs them, its options in ``KV_OPTIONS``).
"""

from __future__ import annotations

import logging
from typing import Any

from nats.js.api import (
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import BadRequestError
from nats.js.manager import JetStreamManager

from federation import subjects

log = logging.getLogger(__name__)

DAY_S = 86400.0
AGENTS_BUCKET = subjects.AGENTS_BUCKET  # core_hub/registry.py: enrolled agents' keys
# Every stream and key-value bucket the hub uses; its NATS user may touch these and no other.
HUB_STREAMS: tuple[str, ...] = (subjects.EVENTS_STREAM, subjects.COMMANDS_STREAM)
HUB_KV_BUCKETS: tuple[str, ...] = subjects.HUB_KV_BUCKETS  # registry and core_hub/hubstate.py
# KeyValueConfig options per bucket beyond the defaults (history 1, no TTL).
KV_OPTIONS: dict[str, dict[str, Any]] = {
    # Agents read manifests by direct get of one key (core_hub/natsauth.py allows only that).
    subjects.MANIFESTS_BUCKET: {"direct": True},
}
# Per-agent quota on OUTPOST_EVENTS (see the module docstring): messages per agent subject and
# the largest message (the edge's batches stay under 400 kB: edge_agent/sync.py).
EVENTS_MAX_MSGS_PER_SUBJECT = 20_000
EVENTS_MAX_MSG_BYTES = 1 << 20
# JetStream's error code for "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE = 10058
# No per-agent consumers on the commands stream any more; a few for tools and tests.
COMMANDS_MAX_CONSUMERS = 16


def stream_configs(*, replicas: int = 1,
                   events_max_age_s: float = 7 * DAY_S,
                   events_max_bytes: int = 1 << 30,
                   commands_max_age_s: float = 7 * DAY_S,
                   commands_max_bytes: int = 256 << 20,
                   duplicate_window_s: float = 120.0,
                   events_max_msgs_per_subject: int = EVENTS_MAX_MSGS_PER_SUBJECT,
                   events_max_msg_bytes: int = EVENTS_MAX_MSG_BYTES) -> list[StreamConfig]:
    """The desired configuration of both streams; separate so tests and tools can read it."""
    if duplicate_window_s > min(events_max_age_s, commands_max_age_s):
        raise ValueError("duplicate window must not be longer than a stream's max age")
    common: dict[str, Any] = dict(retention=RetentionPolicy.LIMITS, discard=DiscardPolicy.OLD,
                  storage=StorageType.FILE, num_replicas=replicas,
                  duplicate_window=duplicate_window_s)
    return [
        StreamConfig(name=subjects.EVENTS_STREAM, subjects=[subjects.EVENTS_ALL],
                     description="Outpost agent events, per-agent seq order",
                     max_age=events_max_age_s, max_bytes=events_max_bytes,
                     max_msgs_per_subject=events_max_msgs_per_subject,
                     max_msg_size=events_max_msg_bytes, **common),
        StreamConfig(name=subjects.COMMANDS_STREAM, subjects=[subjects.COMMANDS_ALL],
                     description="Outpost hub commands, numbered per agent, read by direct get",
                     max_age=commands_max_age_s, max_bytes=commands_max_bytes,
                     allow_direct=True, max_consumers=COMMANDS_MAX_CONSUMERS, **common),
    ]


async def ensure_streams(js: JetStreamManager, *, replicas: int = 1,
                         events_max_age_s: float = 7 * DAY_S,
                         events_max_bytes: int = 1 << 30,
                         commands_max_age_s: float = 7 * DAY_S,
                         commands_max_bytes: int = 256 << 20,
                         duplicate_window_s: float = 120.0,
                         events_max_msgs_per_subject: int = EVENTS_MAX_MSGS_PER_SUBJECT,
                         events_max_msg_bytes: int = EVENTS_MAX_MSG_BYTES
                         ) -> dict[str, StreamInfo]:
    """Create both streams, or update them in place if they exist with other limits.

    Returns the server's view of each stream by name. Settings JetStream cannot change in place
    (storage type, a replica count the cluster cannot meet) raise the server's error unchanged.
    """
    configs = stream_configs(replicas=replicas, events_max_age_s=events_max_age_s,
                             events_max_bytes=events_max_bytes,
                             commands_max_age_s=commands_max_age_s,
                             commands_max_bytes=commands_max_bytes,
                             duplicate_window_s=duplicate_window_s,
                             events_max_msgs_per_subject=events_max_msgs_per_subject,
                             events_max_msg_bytes=events_max_msg_bytes)
    infos: dict[str, StreamInfo] = {}
    for config in configs:
        try:
            # Creating with an identical config succeeds on the server: nothing to compare.
            info = await js.add_stream(config)
        except BadRequestError as err:
            if err.err_code != _STREAM_NAME_IN_USE:
                raise
            info = await js.update_stream(config)
            log.info("updated stream %s to new limits", config.name,
                     extra={"stream": config.name})
        assert config.name is not None
        infos[config.name] = info
    return infos


async def ensure_hub_buckets(js: Any, *, replicas: int = 1) -> None:
    """Create every bucket in ``HUB_KV_BUCKETS`` that does not exist yet (idempotent)."""
    from nats.js.api import KeyValueConfig
    from nats.js.errors import BucketNotFoundError

    for bucket in HUB_KV_BUCKETS:
        try:
            await js.key_value(bucket)
        except BucketNotFoundError:
            options: dict[str, Any] = {"history": 1, **KV_OPTIONS.get(bucket, {})}
            await js.create_key_value(KeyValueConfig(bucket=bucket, replicas=replicas,
                                                     **options))
            log.info("created key-value bucket %s", bucket, extra={"bucket": bucket})

