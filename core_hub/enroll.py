"""Enrollment: how an edge's key becomes trusted by the hub, in exchange for a join token.

An operator creates a join token (``JoinTokens.create_token``, kept only as a SHA-256 digest,
with an expiry and a use count) and gives it to a new edge. The edge sends one core-NATS request
to ``outpost.v1.enroll``: a msgpack map

    {"token", "public_key" (32 raw bytes), "name", "site", "labels", "resources", "version",
     "sig"}

where ``sig`` is the Ed25519 signature, by that key, of the msgpack of the same map without
``sig`` (keys in the order sent). The signature proves the edge holds the private key, so nobody
can enroll someone else's key, and it binds the token, so a captured request can only re-enroll
the same key. The reply is msgpack ``{"ok": true, "agent_id", "hub_public_key"}`` (the edge then
verifies commands with the hub key) or ``{"ok": false, "code", "error"}``.

Re-enrolling a key that is already enrolled (and not revoked) succeeds, returns the same id,
refreshes the agent's labels and version, and neither needs nor uses up a token: the key itself
is the credential by then. Its name, site and resources are fixed at the first enrollment: a
stolen key must not be able to move its agent into another site (and receive that site's
tasks, with their environment) or claim more capacity than it was enrolled with, so a
re-enrollment claiming another name or site, or more resources, is refused; an admin at the
core changes them (``outpost-hub agents move``, ``POST /v1/agents/{id}/enrollment``). A join
token may name a site (``outpost-hub token create --site``; a site bundle's token always does):
it then enrolls agents of that site only. Names are unique among the agents that are not
revoked. So an edge whose reply was lost can simply ask
again, even after its single-use token is spent. A revoked key cannot come back, with any token:
revocation means the key is distrusted, and the edge must enroll a new key.

The agent id is ``identity.id_from_public_key``; the hub's own key is ``<data_dir>/hub.key``.
A key belongs to one agent, ever: a key that is (or was, before a rotation) another agent's
cannot enroll. Key rotation requests (``op: rotate``, see ``keyrotation.py``) and requests for a
fresh NATS user JWT (``op: renew``, see ``renewal.py``) arrive on the same subject, so an agent
needs no other permission for them, and get the same replies.

Replies go only into the requester's own inbox space (``natscreds.reply_in_inbox``): the enroll
user's ``_INBOX_ENROLL.>``, or ``_INBOX.<agent_id>.>`` of the agent the request names. Any other
reply subject (a JetStream API call, another agent's subjects, a KV key) would have the hub
publish there with its own rights, so such a request is dropped unanswered and unapplied,
counted in ``Enroller.dropped`` (``outpost_replies_dropped_total``) and logged.

The subject is open to anyone with the public enroll login, so the hub answers at most
``rate_per_s`` requests a second (``enroll_rate_per_s``, bursts of ``enroll_burst``) and
sheds the rest unread (``core_hub/requestlane.py``; ``outpost_enrollment_requests_shed_total``).
An edge whose request was shed, or that found no responder while a flood paused the subject,
retries after its back-off, like one whose reply was lost. An enrolled agent sends its key
rotations and renewals to a subject of its own (``subjects.agent_requests``), which only it
may publish to, answered in a lane of its own: a flood of the public subject cannot cut the
fleet off by starving their renewals. Refusals and drops are logged through
``federation.log.Throttled``, not one line per request.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from core_hub.keyrotation import KeyRotations, is_rotation
from core_hub.renewal import is_renewal, renew
from core_hub.requestlane import RequestLane
from core_hub.store import HubStore
from federation import subjects, wire
from federation.errors import (
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    OutpostError,
    Unauthorized,
)
from federation.identity import id_from_public_key, load_or_create_key
from federation.log import Throttled
from federation.natscreds import TOKEN_ACCOUNT_SEP, reply_in_inbox
from federation.schemas import LABEL_KEY_PATTERN, NAME_PATTERN

log = logging.getLogger(__name__)
throttled = Throttled(log)

TOKEN_PREFIX = "opj_"
QUEUE = "outpost-hub"
MAX_REQUEST_BYTES = 16 << 10
ENROLL_RATE_PER_S = 100.0  # requests answered per second (HubConfig.enroll_rate_per_s)
ENROLL_BURST = 200
REQUEST_FIELDS = ("token", "public_key", "name", "site", "labels", "resources", "version")
RESOURCE_KEYS = frozenset({"cpus", "mem_mb", "disk_mb"})
_MIN_PREFIX = 6
_NAME = re.compile(NAME_PATTERN)
_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)


def token_digest(token: str) -> str:
    """The digest a token is kept as: of its secret part (a ``.<account>`` tail, the NATS
    account the agent logs in to for enrolling, is public and not part of it)."""
    return hashlib.sha256(token.split(TOKEN_ACCOUNT_SEP, 1)[0].encode()).hexdigest()


def nats_account(data_dir: Path) -> str | None:
    """The OUTPOST account public nkey of a hub in operator mode (None: no NATS auth there):
    join tokens carry it, so an agent can make its enroll login."""
    from core_hub.natsauth import NatsOperator

    return NatsOperator.load(data_dir).account if NatsOperator.exists(data_dir) else None


def load_hub_signer(data_dir: Path) -> wire.Signer:
    """The hub's signing key, ``<data_dir>/hub.key`` (created 0600 on first use)."""
    seed, _public = load_or_create_key(Path(data_dir) / "hub.key")
    return wire.Signer(seed)


class JoinTokens:
    """Join tokens in the hub store: created, checked, counted and revoked by digest only.

    ``clock`` returns unix seconds (injected so expiry can be tested without waiting).
    """

    def __init__(self, store: HubStore, *, clock: Callable[[], float] = time.time,
                 account: str | None = None) -> None:
        self._store = store
        self._clock = clock
        self._account = account  # the hub's NATS account, appended to new tokens

    def create_token(self, ttl_s: float, uses: int | None = 1, *, site: str | None = None) -> str:
        """A new token valid for ``ttl_s`` seconds and ``uses`` enrollments (None: unlimited),
        for agents of ``site`` only if given.

        The plain token is returned once and never stored.
        """
        if site is not None and not _NAME.match(site):
            raise Invalid("a join token's site must be lowercase letters, digits, - _ .",
                          details={"site": site})
        if not ttl_s > 0:
            raise Invalid("a join token's ttl must be positive", details={"ttl_s": ttl_s})
        if uses is not None and (type(uses) is not int or uses < 1):
            raise Invalid("a join token's uses must be a positive int or unlimited",
                          details={"uses": uses})
        token = TOKEN_PREFIX + secrets.token_urlsafe(24)
        now = self._clock()
        self._store.insert_token(token_digest(token), created_at=now, expires_at=now + ttl_s,
                                 uses_left=uses, site=site)
        log.info("join token created", extra={"token_digest": token_digest(token)[:12],
                                              "ttl_s": ttl_s, "uses": uses, "site": site})
        return f"{token}{TOKEN_ACCOUNT_SEP}{self._account}" if self._account else token

    def check_token(self, token: str) -> str:
        """The token's digest if it may enroll an agent now; else raise Unauthorized."""
        digest = token_digest(token)
        row = self._store.get_token(digest)
        if row is None:
            raise Unauthorized("unknown join token")
        short = {"token_digest": digest[:12]}
        if row["revoked"]:
            raise Unauthorized("join token has been revoked", details=short)
        if row["expires_at"] <= self._clock():
            raise Unauthorized("join token has expired", details=short)
        if row["uses_left"] is not None and row["uses_left"] <= 0:
            raise Unauthorized("join token has been used up", details=short)
        return digest

    def consume_token(self, token: str, site: str | None = None) -> None:
        """Check the token (and that it may enroll an agent of ``site``) and count one use
        (inside the caller's transaction, if any)."""
        with self._store.transaction():
            digest = self.check_token(token)
            row = self._store.get_token(digest)
            if site is not None and row is not None and row["site"] not in (None, site):
                raise Forbidden(f"this join token enrolls agents of site {row['site']!r} only",
                                details={"site": site, "token_site": row["site"]})
            self._store.use_token(digest)

    def list_tokens(self) -> list[dict[str, Any]]:
        """Every token's digest, times, uses left, and ``state`` (valid, expired, used-up,
        revoked); never a token itself."""
        now = self._clock()
        tokens = self._store.list_tokens()
        for row in tokens:
            row["state"] = ("revoked" if row["revoked"] else
                            "expired" if row["expires_at"] <= now else
                            "used-up" if row["uses_left"] is not None and row["uses_left"] <= 0
                            else "valid")
        return tokens

    def revoke_token(self, ref: str) -> str:
        """Revoke by digest, a digest prefix (6+ hex characters), or the token itself; returns
        the digest. Raise NotFound, or Invalid if a prefix matches more than one token."""
        ref = ref.strip()
        if self._store.get_token(ref) is not None:
            digest = ref
        elif self._store.get_token(token_digest(ref)) is not None:
            digest = token_digest(ref)
        else:
            lowered = ref.lower()
            if len(lowered) < _MIN_PREFIX or not re.fullmatch(r"[0-9a-f]+", lowered):
                raise NotFound(f"no join token matches {ref[:16]!r}")
            found = self._store.find_tokens(lowered)
            if not found:
                raise NotFound(f"no join token matches {ref[:16]!r}")
            if len(found) > 1:
                raise Invalid(f"join token prefix {ref!r} matches several tokens",
                              details={"prefix": ref})
            digest = found[0]["digest"]
        self._store.revoke_token(digest)
        log.info("join token revoked", extra={"token_digest": digest[:12]})
        return digest


@dataclass(slots=True)
class EnrollmentStats:
    """What answering enrollments has cost this hub (``/metrics``), so whether an enrollment
    costs more as the fleet grows is measured at the hub, apart from the box's load:
    ``wall_s`` from a request's arrival to its reply, the registry write included; ``cpu_s``
    the hub's own work in them (the event loop thread's CPU time outside that write)."""

    answered: int = 0
    refused: int = 0
    shed: int = 0  # never read: over the rate, or queued past requestlane.BACKLOG_S
    wall_s: float = 0.0
    cpu_s: float = 0.0


class Enroller:
    """Answers enrollment requests on ``subjects.ENROLL`` (core NATS, queue group ``queue`` so
    one of several hub replicas answers each)."""

    def __init__(self, nc: Client, store: HubStore, tokens: JoinTokens,
                 hub_public_key: bytes, *, queue: str = QUEUE,
                 clock: Callable[[], float] = time.time,
                 rate_per_s: float = ENROLL_RATE_PER_S, burst: int = ENROLL_BURST) -> None:
        # The public subject, and the enrolled agents' own (each may publish only to its own):
        # the same rate each, so a flood of the first leaves the second alone.
        self._lanes = (
            RequestLane(nc, subjects.ENROLL, queue, self._on_request, name="enrollment",
                        rate_per_s=rate_per_s, burst=burst, on_shed=self._count_shed),
            RequestLane(nc, subjects.AGENT_REQUESTS, queue, self._agent_request,
                        name="agent request", rate_per_s=rate_per_s, burst=burst,
                        on_shed=self._count_shed))
        self._store = store
        self._tokens = tokens
        self._hub_public_key = bytes(hub_public_key)
        self._clock = clock
        self._rotations = KeyRotations(store, clock=clock)
        self.dropped = 0  # requests whose reply subject was outside the requester's inbox
        self.stats = EnrollmentStats()
        # Called after each successful enrollment or key rotation, before the reply (the hub
        # saves the agent to its JetStream registry there).
        self.on_enrolled: Callable[[str], Awaitable[None]] | None = None
        # Called after a new agent was taken back because ``on_enrolled`` failed (the hub
        # removes it from the registry and NATS users again).
        self.on_forgotten: Callable[[str], Awaitable[None]] | None = None
        # With NATS operator mode: the user JWT for (agent id, its current key), put in the
        # reply as ``nats_jwt`` (the agent logs in with it; core_hub/natsauth.py).
        self.issue_jwt: Callable[[str, bytes], str] | None = None

    async def start(self) -> None:
        for lane in self._lanes:
            await lane.start()

    async def stop(self) -> None:
        for lane in self._lanes:
            await lane.stop()

    def _count_shed(self) -> None:
        self.stats.shed += 1

    async def _agent_request(self, msg: Msg) -> None:
        """A rotation or renewal on the agent's own subject: only that agent may publish
        there, so the public enroll login cannot crowd it out. An enrollment, or a request
        for another agent, is refused."""
        if not _for_agent_subject(msg.subject, msg.data):
            self.stats.refused += 1
            throttled.warning("refused.agent-subject", "refused a request on %s: only the "
                              "agent's own rotation or renewal goes there", msg.subject[:200],
                              extra={"subject": msg.subject[:200]})
            owner = msg.subject.rpartition(".")[2]  # the one agent the server lets send here
            if subjects.is_agent_id(owner) and reply_in_inbox(msg.reply, owner):
                await msg.respond(wire.pack({
                    "ok": False, "code": "invalid",
                    "error": f"only this agent's key rotation or renewal goes to {msg.subject}; "
                             f"enroll on {subjects.ENROLL}"}))
            return
        await self._on_request(msg)

    async def _on_request(self, msg: Msg) -> None:
        requester = _requester(msg.data)
        if not reply_in_inbox(msg.reply, requester):
            self.dropped += 1
            throttled.warning("reply", "dropped a request on %s: its reply subject %r is "
                              "outside the requester's inbox", subjects.ENROLL,
                              (msg.reply or "")[:200],
                              extra={"reply": (msg.reply or "")[:200], "agent_id": requester})
            return
        started, cpu = time.perf_counter(), time.thread_time()
        reply, fresh_token = self._handle(msg.data)
        cpu = time.thread_time() - cpu
        if reply["ok"] and self.on_enrolled is not None:
            try:  # durable beyond this hub's file before the agent is told it may send
                await self.on_enrolled(reply["agent_id"])
            except Exception:
                log.exception("could not record the enrollment durably")
                if fresh_token is not None:  # new here: leave no agent the edge never got
                    await self._forget(reply["agent_id"], fresh_token)
                reply = {"ok": False, "code": "unavailable",
                         "error": "the hub could not record the enrollment; retry"}
        signing = time.thread_time()
        if reply["ok"] and self.issue_jwt is not None:
            key = self._store.agent_key(reply["agent_id"])
            if key is not None:
                reply["nats_jwt"] = self.issue_jwt(reply["agent_id"], key.public_key)
        packed = wire.pack(reply)
        cpu += time.thread_time() - signing
        await msg.respond(packed)
        stats = self.stats
        if reply["ok"]:
            stats.answered += 1
        else:
            stats.refused += 1
        stats.wall_s += time.perf_counter() - started
        stats.cpu_s += cpu

    async def _forget(self, agent_id: str, token_digest: str) -> None:
        """Undo a new enrollment whose NATS-side set-up failed: the agent row goes and the
        token gets its use back, so the edge's retry starts afresh."""
        self._store.forget_agent(agent_id, refund_token=token_digest)
        log.warning("enrollment of %s taken back", agent_id, extra={"agent_id": agent_id})
        if self.on_forgotten is not None:
            try:
                await self.on_forgotten(agent_id)
            except Exception:
                log.exception("could not remove %s from the registry", agent_id)

    def handle(self, data: bytes) -> dict[str, Any]:
        """The reply map for one request: enroll the agent or say why not."""
        return self._handle(data)[0]

    def _handle(self, data: bytes) -> tuple[dict[str, Any], str | None]:
        """The reply, and the digest of the join token a new agent used (None otherwise)."""
        try:
            agent_id, fresh_token = self._enroll(data)
        except OutpostError as err:
            throttled.warning(f"refused.{err.code}", "enrollment refused: %s", err.message,
                              extra={"code": err.code, "details": err.details})
            return {"ok": False, "code": err.code, "error": err.message}, None
        except Exception:  # a bug here must still answer, not leave the edge to time out
            log.exception("enrollment failed")
            return {"ok": False, "code": "internal", "error": "internal error at the hub"}, None
        return ({"ok": True, "agent_id": agent_id, "hub_public_key": self._hub_public_key},
                fresh_token)

    def _enroll(self, data: bytes) -> tuple[str, str | None]:
        if len(data) <= MAX_REQUEST_BYTES:
            try:
                decoded = wire.unpack(data)
            except ValueError:
                decoded = None  # _parse says why
            if is_rotation(decoded):
                return self._rotations.rotate(decoded), None
            if is_renewal(decoded):
                return renew(self._store, decoded), None
        request = _parse(data)
        public = request["public_key"]
        agent_id = id_from_public_key(public)
        known = self._store.agent_key(agent_id)
        owner = self._store.agent_with_key(public) if known is None else None
        if owner is not None:  # rotated to from another agent, or rotated away from by it
            raise Forbidden(f"this key belongs to agent {owner}", details={"agent_id": owner})
        if known is not None and known.public_key != public:  # a SHA-256 prefix collision
            raise Forbidden("agent id already belongs to another key",
                            details={"agent_id": agent_id})
        if known is not None and known.revoked:
            raise Forbidden(f"agent {agent_id} is revoked; enroll a new key",
                            details={"agent_id": agent_id})
        fresh_token = None
        with self._store.transaction():
            if known is None:
                self._tokens.consume_token(request["token"], request["site"])
                fresh_token = token_digest(request["token"])
                holder = self._store.agent_named(request["name"])
                if holder is not None:
                    raise Conflict(f"agent name {request['name']!r} is taken by agent {holder}",
                                   details={"name": request["name"], "agent_id": holder})
            else:
                _same_enrollment(self._store.get_agent(agent_id), request)
            self._store.enroll_agent(
                agent_id, public, name=request["name"], site=request["site"],
                labels=request["labels"], resources=request["resources"],
                version=request["version"], now=self._clock())
        log.info("agent %s %s", agent_id, "re-enrolled" if known else "enrolled",
                 extra={"agent_id": agent_id, "site": request["site"],
                        "agent_name": request["name"]})
        return agent_id, fresh_token


def _small_map(data: bytes) -> dict[str, Any] | None:
    """``data`` decoded, if it is a map no larger than a request may be."""
    if len(data) > MAX_REQUEST_BYTES:
        return None
    try:
        request = wire.unpack(data)
    except ValueError:
        return None
    return request if isinstance(request, dict) else None


def _for_agent_subject(subject: str, data: bytes) -> bool:
    """True if ``data`` is a rotation or renewal for the agent ``subject`` belongs to."""
    request = _small_map(data)
    return (request is not None and (is_rotation(request) or is_renewal(request))
            and subject == subjects.agent_requests(str(request.get("agent_id"))))


def _requester(data: bytes) -> str | None:
    """The agent a request on the enrollment subject speaks for, as it claims (the key of an
    enrollment, the id of a rotation), or None if it names none: what its reply may be."""
    request = _small_map(data)
    if request is None:
        return None
    if is_rotation(request) or is_renewal(request):
        agent_id = request.get("agent_id")
        return agent_id if subjects.is_agent_id(agent_id) else None
    public = request.get("public_key")
    return id_from_public_key(public) if isinstance(public, bytes) and len(public) == 32 else None


def _same_enrollment(agent: dict[str, Any], request: dict[str, Any]) -> None:
    """A re-enrollment keeps the name, site and resources the agent enrolled with; raise
    Forbidden if it claims others (an admin changes them at the core)."""
    changed = [field for field in ("name", "site") if request[field] != agent[field]]
    enrolled = agent["resources"]
    if any(value > enrolled.get(key, 0) for key, value in request["resources"].items()):
        changed.append("resources")
    if changed:
        raise Forbidden(
            f"agent {agent['id']} is enrolled as {agent['name']!r} at site {agent['site']!r} "
            f"with {enrolled}; {', '.join(changed)} change only by an admin at the core "
            "(outpost-hub agents move)", details={"agent_id": agent["id"], "fields": changed})


def _parse(data: bytes) -> dict[str, Any]:
    """Decode, validate and verify an enrollment request; raise Invalid or Unauthorized."""
    if len(data) > MAX_REQUEST_BYTES:
        raise Invalid(f"enrollment request over {MAX_REQUEST_BYTES} bytes")
    try:
        request = wire.unpack(data)
    except ValueError as err:
        raise Invalid(f"enrollment request is not msgpack: {err}") from None
    if not isinstance(request, dict):
        raise Invalid("enrollment request is not a map")
    missing = [key for key in (*REQUEST_FIELDS, "sig") if key not in request]
    extra = sorted(str(key) for key in request if key not in REQUEST_FIELDS and key != "sig")
    if missing or extra:
        raise Invalid(f"enrollment request fields: missing {missing}, unknown {extra}")
    token, public, sig = request["token"], request["public_key"], request["sig"]
    if not isinstance(token, str) or not 0 < len(token) <= 256:
        raise Invalid("token must be a non-empty string")
    if not isinstance(public, bytes) or len(public) != 32:
        raise Invalid("public_key must be 32 raw bytes (Ed25519)")
    for field in ("name", "site"):
        value = request[field]
        if not isinstance(value, str) or not _NAME.match(value):
            raise Invalid(f"{field} must be lowercase letters, digits, - _ . (max 63)")
    labels = request["labels"]
    if not isinstance(labels, dict) or len(labels) > 32 or not all(
            isinstance(k, str) and _LABEL_KEY.match(k) and isinstance(v, str) and len(v) <= 256
            for k, v in labels.items()):
        raise Invalid("labels must map label keys to strings (at most 32)")
    resources = request["resources"]
    if not isinstance(resources, dict) or not set(resources) <= RESOURCE_KEYS or not all(
            type(v) in (int, float) and v >= 0 for v in resources.values()):
        raise Invalid(f"resources may hold {sorted(RESOURCE_KEYS)}, as non-negative numbers")
    if not isinstance(request["version"], str) or len(request["version"]) > 64:
        raise Invalid("version must be a string (max 64)")
    if not isinstance(sig, bytes) or len(sig) != wire.SIG_LEN:
        raise Unauthorized("proof of key possession is missing or malformed")
    if not wire.enroll_proof_ok(request):
        raise Unauthorized("proof of key possession failed: sig does not verify with "
                           "public_key")
    return request
