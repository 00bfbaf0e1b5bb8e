"""NATS least privilege in operator mode: the hub is the NATS operator and signs every login.

Without it any client of the hub's NATS could publish events as any agent, read every agent's
commands, or delete the streams. With it the server itself refuses (a permissions violation),
before a message reaches the hub or a consumer. The server trusts the hub's operator key (its
config include, ``NatsOperator.server_config``: operator, system account, a full resolver and
the two accounts preloaded; no users); each client presents a user JWT signed by the hub's
``OUTPOST`` account key carrying its permissions, and signs the server's nonce with its own
key. Why JWTs and not an ``authorization`` block: the block listed every agent, so each
enrollment re-rendered it and reloaded the server (O(fleet) per enrollment; server memory
grew faster than the fleet, docs/scaling.md). Now an enrollment is one signature.

The users, all in the ``OUTPOST`` account:

- the hub: ``hub.key`` with least privilege too (``hub_permissions``): it publishes commands,
  live-read requests and replies into inboxes, and uses the JetStream API of the streams and
  buckets named in ``federation/streams.py`` (``HUB_STREAMS``, ``HUB_KV_BUCKETS``) to read,
  consume, ack and write KV keys, but it can create, change, purge or delete no stream;
- the set-up user, ``hub-setup.key``: the same plus creating and updating those streams and
  buckets and purging ``OUTPOST_COMMANDS`` (a revoked agent's commands); never purging events
  or buckets, never deleting a stream. Used only while the hub starts (``Hub._set_up``) and
  when it revokes an agent, each time on a connection it then closes. Both JWTs are made at
  each start from today's rules;
- the public enroll login (``federation/natscreds.enroll_credentials``): the account lists a
  signing key whose seed is public, scoped to ``ENROLL_PERMISSIONS``, so the server gives any
  user it signs the right to send an enrollment request and read replies under
  ``_INBOX_ENROLL.>``, whatever its JWT says. An agent makes it from the account's public key,
  which join tokens carry (``opj_<secret>.<account>``);
- each enrolled agent: a user JWT for its identity key (``NatsOperator.agent_jwt``), returned
  in the enroll reply (and for the new key in a rotation answer), allowed its own events and
  heartbeats, its answers to live reads, key rotation requests and direct gets of its own
  command subjects; to subscribe to its live-read requests, its own command subjects and its
  own inboxes (``_INBOX.<id>.>``). Nothing else;
- each site leaf: a JWT in its bundle's ``nats-leaf.creds``, leaf connections only, with its
  agents' subjects in the hub's JetStream domain (``site_permissions``). The bundle makes the
  agent's key too, so those are fixed when it is made; a new bundle for the site revokes the
  old leaf.

Revocation (``NatsAuth.refresh``): the account JWT's ``revocations`` list every revoked agent's
keys, keys rotated away more than ``ROTATION_GRACE_S`` ago (the rotation answer must still
reach the old connection) and replaced site leaves; when that set changes the hub re-signs the
account, keeps it in ``nats-account.jwt`` and pushes it as the system user
(``$SYS.REQ.ACCOUNT.<account>.CLAIMS.UPDATE``): the server closes the revoked user's
connections at once. ``refresh_offline`` does the same from another process (the preload in the
include covers a server that is down). With ``--embedded-nats`` this is on by default; for an
external NATS the operator sets ``nats_auth_file``, writes it with ``outpost-hub nats-auth``
and includes it in the server's config.

Agent JWTs expire (``agent_jwt_ttl_s``, 7 days by default); the agent renews its own at half
of that (core_hub/renewal.py, edge_agent/jwtrenewal.py). So a key leaves the revocations once
every JWT issued for it has expired: it became the agent's key after the hub began issuing
expiring JWTs (``AgentJwtExpiry``, ``nats-agent-jwts.json``) and was revoked or rotated away
longer ago than the longest lifetime since, plus ``JWT_CLOCK_SKEW_S``. Without that the list
only grew: past ~11,000 entries the account JWT is over 1 MB, nats-server's max payload, and
then no push reaches the server and a server restarted with it refuses its config.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core_hub.store import HubStore
from federation import natsjwt, objstore, subjects
from federation.errors import OutpostError
from federation.loopguard import stop_loops
from federation.natscreds import (
    AGENT_INBOX_ROOT,
    ENROLL_INBOX_PREFIX,
    ENROLL_SIGNER_SEED,
    HUB_INBOX_PREFIX,
    NatsCredentials,
    agent_inbox_prefix,
    user_nkey,
    user_seed,
)
from federation.streams import HUB_KV_BUCKETS, HUB_STREAMS
from federation.subjects import MANIFESTS_BUCKET

log = logging.getLogger(__name__)

AUTH_FILE_NAME = "outpost-auth.conf"  # beside the embedded server's own config
MANAGED_FILE = "nats-auth.json"  # in the hub's data dir: which file and server it manages
SITES_DIR = "nats-sites"
HUB_JS_DOMAIN = "hub"  # configs/nats/hub.conf; core_hub/bundle.py maps the leaves' API to it
ROTATION_GRACE_S = 30.0
SETUP_KEY_FILE = "hub-setup.key"  # in the hub's data dir: the set-up user's nkey seed
# Never granted to any user: what would empty or remove a stream (or a bucket: a KV_ stream).
NEVER = ["$JS.API.STREAM.PURGE.>", "$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.MSG.DELETE.>"]


class NatsAuthError(OutpostError):
    """The authorization file could not be written or the server not told to reload it."""

    code = "nats_auth"


def hub_permissions(*, setup: bool = False) -> dict[str, Any]:
    """The hub's server permissions, derived from ``HUB_STREAMS`` and ``HUB_KV_BUCKETS``;
    ``setup`` adds creating and updating those streams and purging the commands stream (the
    set-up user's)."""
    api = "$JS.API"
    publish = [
        subjects.COMMANDS_ALL, f"{subjects.PREFIX}.rpc.*.*",
        # replies, into the requester's inbox only (enroll.py checks which)
        f"{ENROLL_INBOX_PREFIX}.>", f"{AGENT_INBOX_ROOT}.*.>",
        f"{api}.INFO", f"{api}.STREAM.NAMES", f"{api}.STREAM.LIST",
    ]
    # The artifact object store (federation/objstore.py) is one more stream: the hub puts
    # chunks and meta on its $O subjects; only the set-up user may purge (a delete).
    streams = [*HUB_STREAMS, *(f"KV_{bucket}" for bucket in HUB_KV_BUCKETS), objstore.STREAM]
    for stream in streams:
        publish += [
            f"{api}.STREAM.INFO.{stream}", f"{api}.STREAM.MSG.GET.{stream}",
            f"{api}.DIRECT.GET.{stream}", f"{api}.DIRECT.GET.{stream}.>",
            f"{api}.CONSUMER.CREATE.{stream}", f"{api}.CONSUMER.CREATE.{stream}.>",
            f"{api}.CONSUMER.DURABLE.CREATE.{stream}.*", f"{api}.CONSUMER.INFO.{stream}.*",
            f"{api}.CONSUMER.NAMES.{stream}", f"{api}.CONSUMER.LIST.{stream}",
            f"{api}.CONSUMER.MSG.NEXT.{stream}.*", f"{api}.CONSUMER.DELETE.{stream}.*",
            f"$JS.ACK.{stream}.>", f"$JS.FC.{stream}.>",
        ]
        if setup:
            publish += [f"{api}.STREAM.CREATE.{stream}", f"{api}.STREAM.UPDATE.{stream}"]
    publish += [f"$KV.{bucket}.>" for bucket in HUB_KV_BUCKETS]
    publish.append(f"$O.{objstore.BUCKET}.>")
    deny = NEVER
    if setup:  # deny wins over allow in NATS: the purges are carved out of NEVER
        purgeable = (subjects.COMMANDS_STREAM, objstore.STREAM)
        publish += [f"{api}.STREAM.PURGE.{stream}" for stream in purgeable]
        deny = [f"{api}.STREAM.PURGE.{stream}" for stream in streams
                if stream not in purgeable] + NEVER[1:]
    return {"publish": {"allow": publish, "deny": deny},
            "subscribe": {"allow": [f"{subjects.PREFIX}.>", f"{HUB_INBOX_PREFIX}.>"]}}


def agent_permissions(agent_id: str) -> dict[str, Any]:
    """The server permissions of one enrolled agent (see the module docstring for why)."""
    stream = subjects.COMMANDS_STREAM
    return {
        "publish": {"allow": [
            subjects.events(agent_id),
            subjects.heartbeat(agent_id),
            # its own rotations and renewals; ENROLL too, for agents from before that subject
            subjects.agent_requests(agent_id),
            subjects.ENROLL,
            f"{subjects.PREFIX}.rpcreply.{agent_id}.>",
            f"$JS.API.DIRECT.GET.{stream}.{subjects.commands_of(agent_id)}",
            # Artifacts: read only. Chunks by sequence (the body form of a direct get, on the
            # object stream alone), an object's meta and a manifest by subject; no put, no
            # delete, no purge, no consumer.
            f"$JS.API.DIRECT.GET.{objstore.STREAM}",
            f"$JS.API.DIRECT.GET.{objstore.STREAM}.$O.{objstore.BUCKET}.M.*",
            f"$JS.API.DIRECT.GET.KV_{MANIFESTS_BUCKET}.$KV.{MANIFESTS_BUCKET}.>",
        ]},
        "subscribe": {"allow": [
            f"{subjects.PREFIX}.rpc.{agent_id}.>",
            subjects.commands_of(agent_id),
            f"{agent_inbox_prefix(agent_id)}.>",
        ]},
    }


def site_permissions(agent_ids: Iterable[str]) -> dict[str, Any]:
    """A site leaf's permissions: its agents' together, with the JetStream API subjects as
    they cross a leaf link (``$JS.hub.API.*``), plus enrollment for agents not enrolled yet."""
    publish, subscribe = [subjects.ENROLL], [f"{ENROLL_INBOX_PREFIX}.>"]
    for agent_id in sorted(set(agent_ids)):
        perms = agent_permissions(agent_id)
        publish += [subject.replace("$JS.API.", f"$JS.{HUB_JS_DOMAIN}.API.", 1)
                    for subject in perms["publish"]["allow"] if subject != subjects.ENROLL]
        subscribe += perms["subscribe"]["allow"]
    return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}


ENROLL_PERMISSIONS: dict[str, Any] = {
    "publish": {"allow": [subjects.ENROLL]},
    "subscribe": {"allow": [f"{ENROLL_INBOX_PREFIX}.>"]},
}


# -- operator mode: the hub's keys, JWTs and the server's config -------------------------------

OPERATOR_KEY_FILE = "nats-operator.nk"  # in the hub's data dir, each an nkey seed, 0600
SYS_ACCOUNT_KEY_FILE = "nats-sys-account.nk"
ACCOUNT_KEY_FILE = "nats-account.nk"  # the OUTPOST account: it signs every user JWT
SYSTEM_USER_KEY_FILE = "nats-sys-user.nk"  # pushes account updates ($SYS.REQ.ACCOUNT...)
ACCOUNT_JWT_FILE = "nats-account.jwt"  # the OUTPOST account JWT as last signed (revocations)
# What every hub replica must hold the same of (copied from the first, docs/scaling.md): the
# hub's identity key agents trust, the admin token forwarded writes carry, and the NATS
# operator, accounts and system user, so any replica's JWTs and account pushes are good.
SHARED_KEY_FILES = ("hub.key", "admin.token", OPERATOR_KEY_FILE, SYS_ACCOUNT_KEY_FILE,
                    ACCOUNT_KEY_FILE, SYSTEM_USER_KEY_FILE)
RESOLVER_DIR = "jwt"  # beside the auth file: the server's full resolver keeps accounts there
ACCOUNT_NAME = "OUTPOST"
MAX_CONTROL_LINE = 65536  # bytes; nats-server's default (4 KB) is less than the hub's JWT
FAR_FUTURE = 2**31 - 1  # a revocation with no known time: every JWT of that key, ever
# Agent user JWTs expire (an agent renews its own: core_hub/renewal.py), so a revoked or
# rotated-away key can leave the account's revocations once every JWT issued for it has
# expired. Without that the list only grows: at ~93 bytes an entry the account JWT passes
# nats-server's 1 MB max payload near 11,000 entries, and then no revocation can be pushed.
# The lifetime is the hub's setting ``agent_jwt_ttl_s``.
AGENT_JWTS_FILE = "nats-agent-jwts.json"  # since when agent JWTs expire, their longest lifetime
JWT_CLOCK_SKEW_S = 3600.0  # kept this much longer: the server's clock may be behind the hub's
PRUNE_EVERY_S = 3600.0  # how often the hub drops revocations whose JWTs have all expired
PUSH_RETRY_S = (1.0, 30.0)  # a failed account push is retried after 1 s, doubling up to 30 s
# nats-server's default max payload, which an account update must fit in; warned of at 3/4.
ACCOUNT_JWT_LIMIT = 1 << 20


def _load_or_create_seed(path: Path, kind: str) -> str:
    """An nkey seed kept in ``path`` (0600), made on first use."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    seed = natsjwt.new_seed(kind)
    write_auth_file(path, seed + "\n")
    return seed


@dataclass(frozen=True, slots=True)
class NatsOperator:
    """The hub's NATS identity in operator mode: the operator key (the server trusts it), the
    system account and its user (to push account updates), the OUTPOST account (every user of
    the fleet is in it) and the hub's two users (``hub.key``, ``hub-setup.key``, raw Ed25519
    seeds, as before). Everything lives in the hub's data dir."""

    data_dir: Path
    operator_seed: str
    sys_account_seed: str
    account_seed: str
    system_user_seed: str
    hub_seed: bytes
    setup_seed: bytes

    @classmethod
    def load(cls, data_dir: Path) -> NatsOperator:
        """Load the keys from ``data_dir``, making the missing ones."""
        from federation.identity import load_or_create_key

        data_dir = Path(data_dir)
        hub_seed, _ = load_or_create_key(data_dir / "hub.key")
        setup_seed, _ = load_or_create_key(data_dir / SETUP_KEY_FILE)
        return cls(data_dir,
                   _load_or_create_seed(data_dir / OPERATOR_KEY_FILE, natsjwt.OPERATOR),
                   _load_or_create_seed(data_dir / SYS_ACCOUNT_KEY_FILE, natsjwt.ACCOUNT),
                   _load_or_create_seed(data_dir / ACCOUNT_KEY_FILE, natsjwt.ACCOUNT),
                   _load_or_create_seed(data_dir / SYSTEM_USER_KEY_FILE, natsjwt.USER),
                   hub_seed, setup_seed)

    @staticmethod
    def exists(data_dir: Path) -> bool:
        return (Path(data_dir) / OPERATOR_KEY_FILE).exists()

    @property
    def account(self) -> str:
        """The OUTPOST account's public nkey (``A...``): join tokens carry it."""
        return natsjwt.public_of(self.account_seed)

    @property
    def sys_account(self) -> str:
        return natsjwt.public_of(self.sys_account_seed)

    def operator_jwt(self) -> str:
        return natsjwt.operator_jwt(self.operator_seed, "outpost",  # iat 0: the same text
                                    system_account=self.sys_account, now=0)

    def sys_account_jwt(self) -> str:
        return natsjwt.account_jwt(self.operator_seed, self.sys_account, "SYS", now=0)

    def account_jwt(self, revocations: dict[str, int], *, after: int = 0) -> str:
        """The OUTPOST account: JetStream on, the public enroll signing key (scoped to
        ``ENROLL_PERMISSIONS``), and ``revocations``. Its ``iat`` is above ``after`` (the
        last one's): the server's resolver keeps only a newer account JWT."""
        scope = natsjwt.user_scope(natsjwt.public_of(ENROLL_SIGNER_SEED), "enroll",
                                   ENROLL_PERMISSIONS)
        return natsjwt.account_jwt(self.operator_seed, self.account, ACCOUNT_NAME,
                                   jetstream=True, signing_keys=[scope],
                                   revocations=revocations, now=max(time.time(), after + 1))

    def user_jwt(self, user: str, name: str, perms: dict[str, Any], *,
                 connection_types: Iterable[str] = ("STANDARD",),
                 expires: float | None = None) -> str:
        return natsjwt.user_jwt(self.account_seed, user, name, perms,
                                connection_types=connection_types, expires=expires)

    def leaf_jwt(self, leaf: str, site: str, agent_ids: Iterable[str]) -> str:
        """A site leaf node's user JWT: leaf connections only, its agents' subjects."""
        return self.user_jwt(leaf, f"leaf-{site}", site_permissions(agent_ids),
                             connection_types=("LEAFNODE",))

    def agent_jwt(self, agent_id: str, public_key: bytes, *,
                  expires: float | None = None) -> str:
        """The user JWT an agent connects with: its identity key, its own subjects only,
        refused by the server after ``expires`` (unix seconds) if given."""
        return self.user_jwt(user_nkey(public_key), agent_id, agent_permissions(agent_id),
                             expires=expires)

    def hub_credentials(self, *, setup: bool = False) -> NatsCredentials:
        """The hub's run-time user (or its set-up user), JWT made now from today's rules."""
        seed = self.setup_seed if setup else self.hub_seed
        jwt = self.user_jwt(user_nkey(_public(seed)), "outpost-hub-setup" if setup
                            else "outpost-hub", hub_permissions(setup=setup))
        return NatsCredentials(seed=user_seed(seed), jwt=jwt, inbox_prefix=HUB_INBOX_PREFIX)

    def system_credentials(self) -> NatsCredentials:
        jwt = natsjwt.user_jwt(self.sys_account_seed, natsjwt.public_of(self.system_user_seed),
                               "outpost-system", None)
        return NatsCredentials(seed=self.system_user_seed, jwt=jwt)

    def server_config(self, resolver_dir: Path, account_jwt: str) -> str:
        """The operator-mode lines of the server's config (no ``authorization`` block)."""
        return "\n".join([
            "# written by core_hub/natsauth.py: NATS operator mode, the hub is the operator;",
            "# users present JWTs the hub signed, nothing per user is in this file; do not edit",
            f"operator: {self.operator_jwt()}",
            f"system_account: {self.sys_account}",
            "# a CONNECT carries the user JWT: the hub's lists every stream's API subjects",
            f"max_control_line: {MAX_CONTROL_LINE}",
            f"resolver: {{ type: full, dir: {json.dumps(str(resolver_dir))}, "
            'allow_delete: false, interval: "2m" }',
            "resolver_preload: {",
            f"  {self.sys_account}: {self.sys_account_jwt()}",
            f"  {self.account}: {account_jwt}",
            "}",
            "",
        ])


def hub_login(data_dir: Path, *, setup: bool = False) -> NatsCredentials:
    """The hub's NATS login from its data dir (tools, benchmarks): its user JWT in operator
    mode, else its plain nkey."""
    from federation.natscreds import hub_credentials

    if NatsOperator.exists(data_dir):
        return NatsOperator.load(data_dir).hub_credentials(setup=setup)
    return hub_credentials((Path(data_dir) / (SETUP_KEY_FILE if setup else "hub.key"))
                           .read_bytes())


def _public(seed: bytes) -> bytes:
    from nacl.signing import SigningKey

    return bytes(SigningKey(seed).verify_key)


@dataclass(frozen=True, slots=True)
class AgentJwtExpiry:
    """Since when (``since``, unix seconds) every agent JWT this hub issues expires, and the
    longest lifetime any of them got since (``max_ttl_s``). A key that became an agent's key
    before ``since`` may hold a JWT that never expires: its revocation is kept for good."""

    since: float
    max_ttl_s: float


def agent_jwt_expiry(data_dir: Path) -> AgentJwtExpiry | None:
    """What ``record_agent_jwt_ttl`` wrote, or None (never written, or unreadable: then no
    revocation is dropped, which is always safe)."""
    path = Path(data_dir) / AGENT_JWTS_FILE
    try:
        record = json.loads(path.read_text())
        since, ttl = record["expiring_since"], record["max_ttl_s"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("%s is unreadable (%s): every revocation is kept", path, exc)
        return None
    if not all(type(v) in (int, float) and math.isfinite(v) and v >= 0 for v in (since, ttl)):
        log.warning("%s holds bad values: every revocation is kept", path)
        return None
    return AgentJwtExpiry(float(since), float(ttl))


def record_agent_jwt_ttl(data_dir: Path, ttl_s: float, now: float) -> AgentJwtExpiry:
    """Note, before any JWT with it is issued, that agent JWTs now live ``ttl_s``. The first
    record's time is ``since``; a longer lifetime raises ``max_ttl_s``, a shorter one leaves it
    (JWTs issued before still live that long)."""
    current = agent_jwt_expiry(data_dir)
    wanted = (AgentJwtExpiry(now, ttl_s) if current is None
              else AgentJwtExpiry(current.since, max(current.max_ttl_s, ttl_s)))
    if wanted != current:
        write_auth_file(Path(data_dir) / AGENT_JWTS_FILE, json.dumps(
            {"expiring_since": wanted.since, "max_ttl_s": wanted.max_ttl_s}) + "\n")
    return wanted


def revocations(store: HubStore, data_dir: Path | None, now: float) -> dict[str, int]:
    """Who the OUTPOST account refuses: every revoked agent's keys, keys rotated away from
    more than ``ROTATION_GRACE_S`` ago, and site leaf keys a newer bundle replaced. Values are
    unix times (that user's JWTs issued at or before it are refused).

    A key is left out once every JWT issued for it has expired: it became the agent's key
    after agent JWTs began to expire (``AgentJwtExpiry.since``), and the last JWT it can have
    had (issued at the latest when it was revoked or rotated away) is past its lifetime."""
    expiry = agent_jwt_expiry(data_dir) if data_dir is not None else None

    def all_expired(became_current: float, last_issued: float) -> bool:
        return (expiry is not None and 0 < expiry.since <= became_current and last_issued > 0
                and last_issued + expiry.max_ttl_s + JWT_CLOCK_SKEW_S < now)

    out: dict[str, int] = {}
    for public_key, revoked_at, retired, enrolled_at in store.nats_revocations():
        # Each key's time as the agent's key began at enrollment or at the rotation before.
        timeline = sorted(retired, key=lambda key: key[1])
        began = [enrolled_at, *(rotated_at for _hex, rotated_at in timeline)]
        if revoked_at is not None and not all_expired(began[-1], revoked_at):
            out[user_nkey(public_key)] = math.ceil(revoked_at) if revoked_at else FAR_FUTURE
        for (old_hex, rotated_at), start in zip(timeline, began, strict=False):
            ends = (rotated_at or 0) + ROTATION_GRACE_S
            if (revoked_at is not None or ends <= now) and not all_expired(start, rotated_at):
                out[user_nkey(bytes.fromhex(old_hex))] = FAR_FUTURE
    if data_dir is not None:
        for leaf in retired_leaves(data_dir):
            out[leaf] = FAR_FUTURE
    return out


def next_grace_end(store: HubStore, now: float) -> float | None:
    """When the next rotated-away key's grace ends (monotonic-free unix seconds), if any."""
    ends = [(rotated_at or 0) + ROTATION_GRACE_S
            for _key, revoked_at, retired, _enrolled in store.nats_revocations()
            if revoked_at is None
            for _old, rotated_at in retired if (rotated_at or 0) + ROTATION_GRACE_S > now]
    return min(ends) if ends else None


def record_site(data_dir: Path, site: str, leaf_nkey: str, agent_ids: Iterable[str]) -> None:
    """Remember a site's leaf key (a new bundle replaces it: the old one is revoked) and add
    its agent ids."""
    path = Path(data_dir) / SITES_DIR / f"{site}.json"
    try:
        record = json.loads(path.read_text())
        known, retired = list(record["agents"]), list(record.get("retired_leaf_nkeys", []))
        if record["leaf_nkey"] != leaf_nkey:
            retired.append(record["leaf_nkey"])
    except (FileNotFoundError, ValueError, KeyError):
        known, retired = [], []
    record = {"site": site, "leaf_nkey": leaf_nkey, "retired_leaf_nkeys": sorted(set(retired)),
              "agents": sorted({*known, *map(subjects.validate_agent_id, agent_ids)})}
    write_auth_file(path, json.dumps(record, indent=1) + "\n")


def site_agents(data_dir: Path, site: str, revoked: set[str]) -> list[str]:
    """The agent ids a site's leaf may carry (recorded, not revoked)."""
    try:
        record = json.loads((Path(data_dir) / SITES_DIR / f"{site}.json").read_text())
    except (FileNotFoundError, ValueError):
        return []
    return [a for a in record.get("agents", []) if subjects.is_agent_id(a) and a not in revoked]


def retired_leaves(data_dir: Path) -> list[str]:
    """Leaf nkeys of every site whose bundle was made again (the old leaf is refused)."""
    out = []
    for path in sorted((Path(data_dir) / SITES_DIR).glob("*.json")):
        try:
            out += [str(k) for k in json.loads(path.read_text()).get("retired_leaf_nkeys", [])]
        except (ValueError, OSError, AttributeError):
            log.warning("ignoring unreadable site record %s", path, extra={"path": str(path)})
    return out


def record_managed(data_dir: Path, auth_file: Path, pid_file: Path | None,
                   nats_url: str | None = None) -> None:
    """Note in the hub's data dir which file (and server) the hub keeps its NATS auth in, so
    ``refresh_offline`` (another process) finds them."""
    write_auth_file(Path(data_dir) / MANAGED_FILE, json.dumps(
        {"auth_file": str(auth_file), "pid_file": str(pid_file) if pid_file else None,
         "nats_url": nats_url}) + "\n")


def write_auth_file(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` (0600, whole or not at all); False if it was already there."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # the hub and a CLI may race
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        tmp.replace(path)
    except OSError as exc:
        raise NatsAuthError(f"cannot write the NATS authorization file {path}: {exc}",
                            details={"path": str(path)}) from exc
    return True


def signal_reload(pid_file: Path) -> bool:
    """SIGHUP the nats-server whose pid is in ``pid_file``; False if it is not running."""
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    except PermissionError as exc:
        raise NatsAuthError(f"not allowed to signal nats-server (pid file {pid_file})",
                            details={"pid_file": str(pid_file)}) from exc
    return True


async def push_account(nats_url: str, operator: NatsOperator, account_jwt: str,
                       connect_options: dict[str, Any] | None = None) -> None:
    """Hand the server an updated account JWT as the system user: it applies it at once (a
    revoked user's connections are closed) and its resolver keeps it."""
    from federation.natsclient import connect_once

    nc = await connect_once(nats_url, allow_reconnect=False, connect_timeout=5,
                            name="outpost-hub-system", **(connect_options or {}),
                            **operator.system_credentials().connect_options())
    try:
        reply = await nc.request(f"$SYS.REQ.ACCOUNT.{operator.account}.CLAIMS.UPDATE",
                                 account_jwt.encode(), timeout=5)
        answer = json.loads(reply.data)
        if "error" in answer:
            raise NatsAuthError(f"nats-server refused the account update: {answer['error']}")
    finally:
        await nc.close()


@dataclass(frozen=True, slots=True)
class AccountStats:
    """The OUTPOST account as last signed, for /metrics: how many keys it refuses, its size
    (it must fit nats-server's max payload), and whether the server still lacks it (a push
    that failed and is being retried: until then revoked boxes keep their connections)."""

    revocations: int = 0
    jwt_bytes: int = 0
    push_pending: bool = False


class NatsAuth:
    """Keeps the server's view of the OUTPOST account equal to the store: writes the
    operator-mode config include (operator, system account, resolver, preloaded accounts) and,
    when who is revoked changes, re-signs the account JWT and pushes it to the running server.
    Enrollment changes nothing here: the agent's user JWT is all it needs (``issue``).

    Fields: ``path`` (the include the server reads), ``store``, ``operator`` (keys),
    ``push`` (awaited with a new account JWT: the hub's system-user push, or None when no
    server is reachable), ``clock`` (unix seconds, for the rotation grace)."""

    def __init__(self, path: Path, store: HubStore, operator: NatsOperator,
                 push: Callable[[str], Awaitable[None]] | None = None, *,
                 clock: Callable[[], float] = time.time,
                 agent_jwt_ttl_s: float | None = None) -> None:
        self.path = Path(path)
        self.store = store
        self.operator = operator
        self.push = push
        self.clock = clock
        # None: agent JWTs that never expire (then no revocation is ever dropped).
        self.agent_jwt_ttl_s = agent_jwt_ttl_s
        if agent_jwt_ttl_s is not None:
            record_agent_jwt_ttl(operator.data_dir, agent_jwt_ttl_s, clock())
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one re-sign-and-push at a time
        self._revoked: dict[str, int] | None = None
        # The account JWT the server last took from us (None: not known to have any). The file
        # is written before the push, so "the file changed" cannot tell a push is still owed.
        self._on_server: str | None = None
        self._stats = (0, 0)  # (revocations, bytes) of the account JWT as last written

    @property
    def account_jwt_path(self) -> Path:
        return self.operator.data_dir / ACCOUNT_JWT_FILE

    def issue(self, agent_id: str, public_key: bytes) -> str:
        """The user JWT for an agent just enrolled, rotated to ``public_key`` or renewing."""
        ttl = self.agent_jwt_ttl_s
        return self.operator.agent_jwt(agent_id, public_key,
                                       expires=None if ttl is None else self.clock() + ttl)

    def current_account_jwt(self) -> str | None:
        try:
            return self.account_jwt_path.read_text().strip() or None
        except FileNotFoundError:
            return None

    def write(self) -> bool:
        """Sign the account JWT if what it revokes changed, and write it and the config
        include; True if the account changed (no push here)."""
        wanted = revocations(self.store, self.operator.data_dir, self.clock())
        current = self.current_account_jwt()
        known: dict[str, int] | None = None
        last_iat = 0
        if current is not None:
            try:
                claims = natsjwt.decode(current, kind=natsjwt.ACCOUNT)
                last_iat = int(claims.get("iat", 0))
                if claims["iss"] == natsjwt.public_of(self.operator.operator_seed):
                    known = dict(claims["nats"].get("revocations", {}))
            except (natsjwt.NatsJwtError, KeyError, ValueError):
                known = None
        changed = known != wanted
        if changed or current is None:
            current = self.operator.account_jwt(wanted, after=last_iat)
            write_auth_file(self.account_jwt_path, current + "\n")
        write_auth_file(self.path, self.operator.server_config(
            self.path.parent / RESOLVER_DIR, current))
        if changed:
            log.info("NATS account re-signed: %d users revoked", len(wanted),
                     extra={"path": str(self.account_jwt_path), "revoked": len(wanted)})
            if len(current) > ACCOUNT_JWT_LIMIT * 3 // 4:
                log.warning("the NATS account JWT is %d bytes (%d revocations): at %d, "
                            "nats-server's max payload, no revocation reaches the server; "
                            "a shorter agent_jwt_ttl_s lets revoked keys leave sooner",
                            len(current), len(wanted), ACCOUNT_JWT_LIMIT,
                            extra={"bytes": len(current), "revoked": len(wanted)})
        self._revoked = wanted
        self._stats = (len(wanted), len(current))
        return changed

    @property
    def push_pending(self) -> bool:
        """True while the running server has not taken the account JWT as last written."""
        return self.push is not None and self.current_account_jwt() != self._on_server

    @property
    def account_stats(self) -> AccountStats:
        return AccountStats(*self._stats, push_pending=self.push_pending)

    async def refresh(self) -> bool:
        """After an agent is revoked or re-keyed (or a rotation's grace ended): re-sign the
        account if its revocations changed, and push it unless the server already has it (a
        failed push is owed until one succeeds). True if the account's revocations changed."""
        async with self._lock:
            changed = self.write()
            await self._push_owed()
        return changed

    async def push_to_server(self) -> None:
        """At the hub's start: the server gets the account as the store says it now (its
        preload may be older: revocations made while the hub was down)."""
        async with self._lock:
            self._on_server = None
            await self._push_owed()

    async def _push_owed(self) -> None:
        jwt = self.current_account_jwt()
        if self.push is None or jwt is None or jwt == self._on_server:
            return
        await self.push(jwt)
        self._on_server = jwt
        log.info("NATS account pushed to the server", extra={"bytes": len(jwt)})

    async def start(self) -> None:
        """Start ``run`` as a task this object owns (``stop`` ends it)."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="nats-auth")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_loops(task)

    async def run(self) -> None:
        """Until cancelled: refresh when a rotated-away key's grace ends, every
        ``PRUNE_EVERY_S`` (revocations whose JWTs have all expired leave the account), and
        while a push is owed, with a doubling back-off (``PUSH_RETRY_S``)."""
        pruned_at = time.monotonic()
        retry_s, retry_at = PUSH_RETRY_S[0], 0.0
        while True:
            due = next_grace_end(self.store, self.clock())
            await asyncio.sleep(1.0 if due is None
                                else min(1.0, max(0.0, due - self.clock()) + 0.01))
            prune = time.monotonic() - pruned_at >= PRUNE_EVERY_S
            if prune:
                pruned_at = time.monotonic()
            owed = self.push_pending and time.monotonic() >= retry_at
            if not (prune or owed or (due is not None and due <= self.clock())):
                continue
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 (kept owed: retried after the back-off)
                log.warning("NATS account refresh failed, retrying in %.0f s: %r", retry_s,
                            exc, extra={"retry_s": retry_s})
                retry_at = time.monotonic() + retry_s
                retry_s = min(retry_s * 2, PUSH_RETRY_S[1])
            else:
                retry_s, retry_at = PUSH_RETRY_S[0], 0.0


def refresh_offline(data_dir: Path) -> bool:
    """From another process than the hub (a site bundle, a revocation while the hub is down):
    re-sign the OUTPOST account from the hub's store and sites, write it and the config
    include, and push it to the server if one answers at the recorded URL (else the server
    reads it when it starts: resolver preload). False (and nothing done) if the hub manages no
    NATS auth or nothing changed."""
    data_dir = Path(data_dir)
    try:
        managed = json.loads((data_dir / MANAGED_FILE).read_text())
    except FileNotFoundError:
        return False
    except ValueError as exc:
        raise NatsAuthError(f"{data_dir / MANAGED_FILE} is not JSON: {exc}") from exc
    operator = NatsOperator.load(data_dir)
    store = HubStore(data_dir / "hub.db")
    try:
        auth = NatsAuth(Path(managed["auth_file"]), store, operator)
        changed = auth.write()
    finally:
        store.close()
    url = managed.get("nats_url")
    if changed and url:
        jwt = auth.current_account_jwt()
        assert jwt is not None
        try:
            _run_in_thread(lambda: push_account(url, operator, jwt))
        except Exception as exc:  # noqa: BLE001 (down: it reads the file when it starts)
            log.info("no nats-server answered at %s (%r): it reads the new account when it "
                     "starts", url, exc)
    return changed


def _run_in_thread(make: Callable[[], Awaitable[None]]) -> None:
    """Run a coroutine to its end from sync code, even when the caller is inside an event
    loop (a test, a CLI called from async code): in a thread with a loop of its own."""
    import threading

    failed: list[BaseException] = []

    def run() -> None:
        async def main() -> None:
            await make()

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
            failed.append(exc)

    thread = threading.Thread(target=run, name="nats-account-push")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def auth_command(data_dir: Path, out: Path | None, pid_file: Path | None,
                 nats_url: str | None = None) -> int:
    """``outpost-hub nats-auth``: (re)write the hub's operator-mode config include from its
    data dir (making the operator and account keys on first use)."""
    if out is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        record_managed(data_dir, out.resolve(), pid_file.resolve() if pid_file else None,
                       nats_url)
    elif not (data_dir / MANAGED_FILE).exists():
        raise NatsAuthError(f"the hub in {data_dir} manages no NATS authorization yet: "
                            "pass --out (its nats_auth_file)")
    managed = json.loads((data_dir / MANAGED_FILE).read_text())
    before = _read(Path(managed["auth_file"]))
    refresh_offline(data_dir)
    changed = _read(Path(managed["auth_file"])) != before
    print(f"{managed['auth_file']}: {'written' if changed else 'up to date'}")
    return 0


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
