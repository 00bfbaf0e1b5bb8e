"""NATS subject and JetStream stream names: the addressing half of the wire contract.

Every subject Outpost uses is built here, so a typo cannot split the fleet into two namespaces
and an agent id that could break out of its subject token (a ``.``, ``*`` or ``>``) is refused
before it reaches NATS. The names follow DESIGN.md, "Wire contract":

    outpost.v1.events.<agent_id>        stream OUTPOST_EVENTS (edge -> core, stored)
    outpost.v1.cmd.<agent_id>.<n>       stream OUTPOST_COMMANDS (core -> edge, command number n
                                        of that agent; read by direct get, federation/commandlog.py)
    outpost.v1.hb.<agent_id>            core NATS heartbeats, not stored
    outpost.v1.rpc.<agent_id>.<verb>    request/reply for live reads while the edge is online
    outpost.v1.rpcreply.<agent_id>.<ref> the answer to one live read (the only subject besides
                                        its own events and heartbeats an agent may publish to)
    outpost.v1.enroll                   request/reply enrollment
    outpost.v1.site.<site>.>            one site's agents among themselves
                                        (edge_agent/sitepeers.py): never over a site's uplink
"""

from __future__ import annotations

import re

from federation.errors import Invalid

PREFIX = "outpost.v1"
ENROLL = f"{PREFIX}.enroll"
# An enrolled agent's key rotations and JWT renewals: a subject per agent, which only that
# agent may publish to (the public enroll login may publish to ENROLL alone).
AGENT_REQUESTS = f"{ENROLL}.agent.*"

EVENTS_STREAM = "OUTPOST_EVENTS"
COMMANDS_STREAM = "OUTPOST_COMMANDS"

# JetStream KV buckets of the hub's own state (core_hub.registry, core_hub.hubstate): the
# hub's NATS user needs these and no others.
AGENTS_BUCKET = "OUTPOST_AGENTS"
SERVICES_BUCKET = "OUTPOST_SERVICES"
API_TOKENS_BUCKET = "OUTPOST_API_TOKENS"
JOIN_TOKENS_BUCKET = "OUTPOST_JOIN_TOKENS"
LAUNCHES_BUCKET = "OUTPOST_LAUNCHES"
LEASE_BUCKET = "OUTPOST_LEASE"  # which hub replica places (core_hub/lease.py)
MANIFESTS_BUCKET = "OUTPOST_MANIFESTS"  # federation/manifest.py: signed artifact manifests
HUB_KV_BUCKETS = (AGENTS_BUCKET, SERVICES_BUCKET, API_TOKENS_BUCKET, JOIN_TOKENS_BUCKET,
                  LAUNCHES_BUCKET, LEASE_BUCKET, MANIFESTS_BUCKET)

EVENTS_ALL = f"{PREFIX}.events.*"
COMMANDS_ALL = f"{PREFIX}.cmd.*.*"
HEARTBEATS_ALL = f"{PREFIX}.hb.*"
SITES_ALL = f"{PREFIX}.site.>"

# identity.py makes ids like "a" + 25 base32 characters; any lowercase alnum token of sane length
# is accepted so other prefixes (a hub's own key, say) fit too.
_AGENT_ID = re.compile(r"[a-z0-9]{1,64}")
_VERB = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_REF = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SITE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")  # schemas.NAME_PATTERN


def validate_agent_id(agent_id: str) -> str:
    """Return ``agent_id`` if it is one safe subject token (lowercase alnum), else raise Invalid."""
    if not isinstance(agent_id, str) or not _AGENT_ID.fullmatch(agent_id):
        raise Invalid(f"agent id {agent_id!r} is not subject-safe (lowercase letters and digits)",
                      details={"agent_id": repr(agent_id)})
    return agent_id


def is_agent_id(agent_id: object) -> bool:
    """True if ``agent_id`` is a subject-safe agent id; for checks that must not raise."""
    return isinstance(agent_id, str) and _AGENT_ID.fullmatch(agent_id) is not None


def events(agent_id: str) -> str:
    """Subject an agent publishes its events (and event batches) to."""
    return f"{PREFIX}.events.{validate_agent_id(agent_id)}"


def command(agent_id: str, number: int) -> str:
    """Subject of an agent's command number ``number`` (1, 2, ...; one message each)."""
    if type(number) is not int or number < 1:
        raise Invalid(f"command number {number!r} is not a positive int")
    return f"{PREFIX}.cmd.{validate_agent_id(agent_id)}.{number}"


def commands_of(agent_id: str) -> str:
    """Every command subject of one agent (its live subscription; its newest by direct get)."""
    return f"{PREFIX}.cmd.{validate_agent_id(agent_id)}.*"


def command_number(subject: str) -> int:
    """The number of a command subject; raise Invalid if it is not one."""
    parts = subject.split(".")
    if len(parts) == 5 and parts[2] == "cmd" and parts[4].isdigit():
        return int(parts[4])
    raise Invalid(f"subject {subject!r} is not a command subject", details={"subject": subject})


def heartbeat(agent_id: str) -> str:
    """Core-NATS subject of an agent's heartbeats."""
    return f"{PREFIX}.hb.{validate_agent_id(agent_id)}"


def rpc(agent_id: str, verb: str) -> str:
    """Request/reply subject for a live read (``logs``, ...) served by one agent."""
    if not isinstance(verb, str) or not _VERB.fullmatch(verb):
        raise Invalid(f"rpc verb {verb!r} is not subject-safe", details={"verb": repr(verb)})
    return f"{PREFIX}.rpc.{validate_agent_id(agent_id)}.{verb}"


def rpc_reply(agent_id: str, ref: str) -> str:
    """Subject one agent streams its answer to a live read ``ref`` to; the hub sets it as the
    request's reply subject, so an agent's NATS permissions can name its own replies."""
    if not isinstance(ref, str) or not _REF.fullmatch(ref):
        raise Invalid(f"rpc reference {ref!r} is not subject-safe", details={"ref": repr(ref)})
    return f"{PREFIX}.rpcreply.{validate_agent_id(agent_id)}.{ref}"


def site_peers(site: str) -> str:
    """The subject space of one site's agents. Site names may hold dots, which would split the
    token (site ``a.art`` would share ``a``'s space): they become ``~``, which names never hold."""
    if not isinstance(site, str) or not _SITE.fullmatch(site):
        raise Invalid(f"site {site!r} is not a valid site name", details={"site": repr(site)})
    return f"{PREFIX}.site.{site.replace('.', '~')}"


def msg_id(agent_id: str, seq: int) -> str:
    """``Nats-Msg-Id`` of an agent's event message: JetStream drops a re-sent duplicate."""
    return f"{validate_agent_id(agent_id)}:{seq}"


def agent_of(subject: str) -> str:
    """The agent id a per-agent subject is addressed to or from; raise Invalid if none.

    Ingest passes this to ``wire.open_envelope(expected_agent=...)``, so an agent can only speak
    on its own subject.
    """
    parts = subject.split(".")
    shaped = (len(parts) == 4 and parts[2] in {"events", "hb"}) or (
        len(parts) == 5 and parts[2] in {"rpc", "cmd"})
    if shaped and ".".join(parts[:2]) == PREFIX and is_agent_id(parts[3]):
        return parts[3]
    raise Invalid(f"subject {subject!r} does not name an agent", details={"subject": subject})


def agent_requests(agent_id: str) -> str:
    """Where agent ``agent_id`` sends its key rotations and renewals."""
    return f"{ENROLL}.agent.{agent_id}"
