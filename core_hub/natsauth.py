"""NATS least privilege: the hub writes the server's ``authorization`` block from its fleet view.

Without it any client of the hub's NATS could publish events as any agent, read every agent's
commands, or delete the streams. With it the server itself refuses (a permissions violation),
before a message reaches the hub or a consumer. The users it lists:

- the hub: an nkey user from ``hub.key`` with least privilege too (``hub_permissions``): it
  publishes commands, live-read requests and replies into inboxes, and uses the JetStream API
  of the streams and buckets named in ``federation/streams.py`` (``HUB_STREAMS``,
  ``HUB_KV_BUCKETS``: the one list to extend) to read, consume, ack and write KV keys, but it
  can create, change, purge or delete no stream, so a bug in a responder (or a reply subject
  nobody checked) cannot wipe the fleet's events or commands;
- the hub's set-up user, an nkey from ``hub-setup.key``: the same plus creating and updating
  those streams and buckets, and purging ``OUTPOST_COMMANDS`` (a revoked agent's commands,
  which a site leaf could otherwise still serve it); never purging events or buckets, never
  deleting a stream. The hub uses it only while it starts (``Hub._set_up``) and when it
  revokes an agent (``Hub._purge_commands_of``), each time on a connection it then closes;
- ``outpost-enroll`` (public password, ``federation/natscreds.py``): may only send an
  enrollment request and read replies under ``_INBOX_ENROLL.>``;
- each enrolled, non-revoked agent: an nkey user from its current identity key, allowed to
  publish its own events and heartbeats (``outpost.v1.events.<id>``, ``outpost.v1.hb.<id>``),
  its answers to live reads (``outpost.v1.rpcreply.<id>.>``), key rotation requests
  (``outpost.v1.enroll``, signed by the old and the new key: ``keyrotation.py``), and direct
  gets of its own command subjects only (``$JS.API.DIRECT.GET.OUTPOST_COMMANDS.outpost.v1.cmd.
  <id>.*``: the subject names the message; the body form, which names it in JSON, is not
  allowed); to subscribe to its live-read requests (``outpost.v1.rpc.<id>.>``), its own
  command subjects (a wake-up when one arrives) and its own inboxes (``_INBOX.<id>.>``).
  Nothing else: not another agent's subjects, no consumer, not the stream or consumer
  management API.

``NatsAuth.refresh()`` renders the file again and reloads the server. The hub calls it at start
and from ``Hub._after_agent_change`` (enrolled, revoked, key rotated) through
``Hub.refresh_nats_auth()``, so a revoked agent's connection is closed and refused from then
on, and a rotated key replaces the old one; from another process, ``refresh_offline`` does the
same against the files of a hub's data dir.

Edge sites behind a NATS leaf node (``outpost-hub site bundle``, an external NATS with a
leafnodes port) link with a per-site nkey (``nkey`` in the bundle's ``nats-leaf.conf``) whose
permissions are those of the site's agents, in the hub's JetStream domain (the leaf maps
``$JS.API.>`` to ``$JS.hub.API.>``). The bundle makes the agent's key too, so the site's agent
ids, and with them the leaf's permissions, are fixed when the bundle is made: nats-server does
not apply changed permissions to a leaf connection that is up (checked with 2.15), so an
enrollment must not change them. A revoked agent's subjects leave the site's permissions when
the leaf next connects; until then the hub refuses its envelopes, as for any revoked agent.
``<data_dir>/nats-sites/<site>.json`` records each site's leaf key and agent ids.

A rotated-away key keeps its user for ``ROTATION_GRACE_S``: the hub refreshes before it answers
the rotation request, on the agent's old connection, and that answer must still reach it (the
agent then reconnects with its new key). ``NatsAuth.run`` drops the old key when the grace ends.
With ``--embedded-nats`` this is on by default; for an external NATS the operator sets
``nats_auth_file``, includes that file in the server's config, and either sets
``nats_pid_file`` (same host: the hub sends SIGHUP) or reloads the server after each change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from core_hub.store import HubStore
from federation import objstore, subjects
from federation.errors import OutpostError
from federation.natscreds import (
    AGENT_INBOX_ROOT,
    ENROLL_INBOX_PREFIX,
    ENROLL_PASSWORD,
    ENROLL_USER,
    HUB_INBOX_PREFIX,
    agent_inbox_prefix,
    user_nkey,
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
            subjects.ENROLL,  # key rotation requests (signed by both keys) go there too
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


def render(hub_public_key: bytes, agents: Iterable[tuple[str, bytes]],
           sites: Iterable[tuple[str, list[str]]] = (),
           setup_public_key: bytes | None = None) -> str:
    """The ``authorization { users = [...] }`` block for the hub (and its set-up user),
    ``agents`` (id, raw public key) and site leaves (leaf nkey, agent ids). JSON is valid NATS
    config syntax, so every value is quoted safely."""
    users: list[dict[str, Any]] = [
        {"nkey": user_nkey(hub_public_key), "permissions": hub_permissions(),
         "allowed_connection_types": ["STANDARD"]},
        *([{"nkey": user_nkey(setup_public_key), "permissions": hub_permissions(setup=True),
            "allowed_connection_types": ["STANDARD"]}] if setup_public_key else []),
        {"user": ENROLL_USER, "password": ENROLL_PASSWORD, "permissions": ENROLL_PERMISSIONS,
         "allowed_connection_types": ["STANDARD"]},
    ]
    for agent_id, public_key in sorted(agents):
        users.append({"nkey": user_nkey(public_key), "permissions": agent_permissions(agent_id),
                      "allowed_connection_types": ["STANDARD"]})
    for leaf_nkey, agent_ids in sorted(sites):
        users.append({"nkey": leaf_nkey, "permissions": site_permissions(agent_ids),
                      "allowed_connection_types": ["LEAFNODE"]})
    lines = ",\n    ".join(json.dumps(user, separators=(", ", ": ")) for user in users)
    return ("# written by core_hub/natsauth.py from the hub's enrolled agents; do not edit\n"
            f"authorization {{\n  users = [\n    {lines}\n  ]\n}}\n")


def trusted_agents(store: HubStore) -> list[tuple[str, bytes]]:
    """(id, public key) of every enrolled agent that is not revoked."""
    return [(agent["id"], bytes.fromhex(agent["public_key"]))
            for agent in store.list_agents() if not agent["revoked"]]


def record_site(data_dir: Path, site: str, leaf_nkey: str, agent_ids: Iterable[str]) -> None:
    """Remember a site's leaf key (a new bundle replaces it) and add its agent ids."""
    path = Path(data_dir) / SITES_DIR / f"{site}.json"
    try:
        known = json.loads(path.read_text())["agents"]
    except (FileNotFoundError, ValueError, KeyError):
        known = []
    record = {"site": site, "leaf_nkey": leaf_nkey,
              "agents": sorted({*known, *map(subjects.validate_agent_id, agent_ids)})}
    write_auth_file(path, json.dumps(record, indent=1) + "\n")


def site_leaves(data_dir: Path, revoked: set[str]) -> list[tuple[str, list[str]]]:
    """(leaf nkey, agent ids that are not revoked) of every recorded site."""
    out = []
    for path in sorted((Path(data_dir) / SITES_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            agents = [a for a in record["agents"] if subjects.is_agent_id(a) and a not in revoked]
            out.append((str(record["leaf_nkey"]), agents))
        except (ValueError, KeyError, TypeError, OSError):
            log.warning("ignoring unreadable site record %s", path, extra={"path": str(path)})
    return out


def record_managed(data_dir: Path, auth_file: Path, pid_file: Path | None) -> None:
    """Note in the hub's data dir which file (and server) the hub keeps its authorization in,
    so ``refresh_offline`` (another process) finds them."""
    write_auth_file(Path(data_dir) / MANAGED_FILE, json.dumps(
        {"auth_file": str(auth_file), "pid_file": str(pid_file) if pid_file else None}) + "\n")


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


class NatsAuth:
    """Keeps one authorization file equal to the store's trusted agents.

    Fields: ``path`` (the file the server includes), ``store``, ``hub_public_key`` (raw),
    ``reload`` (awaited after the file changed: the embedded server's ``reload``, a SIGHUP
    through a pid file, or None when the operator reloads the server), ``clock`` (monotonic
    seconds, for the rotation grace), ``sites_from`` (the data dir with ``nats-sites/``)."""

    def __init__(self, path: Path, store: HubStore, hub_public_key: bytes,
                 reload: Callable[[], Awaitable[None]] | None = None, *,
                 sites_from: Path | None = None, setup_public_key: bytes | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.setup_public_key = setup_public_key  # the hub's set-up user, if it has one
        self.sites_from = sites_from  # the hub's data dir, whose nats-sites/ lists the leaves
        self.store = store
        self.hub_public_key = bytes(hub_public_key)
        self.reload = reload
        self.clock = clock
        self._keys: dict[str, bytes] = {}  # agent id -> the key last written for it
        self._retiring: dict[str, tuple[bytes, float]] = {}  # old key, grace end
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one write-and-reload at a time (enrollments may overlap)

    def write(self) -> bool:
        """Render and write the file (no reload); True if it changed."""
        agents = trusted_agents(self.store)
        now = self.clock()
        current = dict(agents)
        for agent_id, key in self._keys.items():
            if agent_id in current and current[agent_id] != key:  # rotated since last time
                self._retiring[agent_id] = (key, now + ROTATION_GRACE_S)
        self._retiring = {agent_id: (key, until) for agent_id, (key, until)
                          in self._retiring.items() if agent_id in current and until > now}
        self._keys = current
        sites: list[tuple[str, list[str]]] = []
        if self.sites_from is not None:
            revoked = {a["id"] for a in self.store.list_agents() if a["revoked"]}
            sites = site_leaves(self.sites_from, revoked)
        changed = write_auth_file(self.path, render(
            self.hub_public_key,
            [*agents, *((agent_id, key) for agent_id, (key, _) in self._retiring.items())],
            sites, self.setup_public_key))
        if changed:
            log.info("NATS authorization written: %d agents", len(agents),
                     extra={"path": str(self.path), "agents": len(agents)})
        return changed

    async def refresh(self) -> bool:
        """Write the file from the store and, if it changed, have the server apply it: call this
        after an agent is enrolled, revoked or removed. True if anything changed."""
        async with self._lock:
            changed = self.write()
            if changed and self.reload is not None:
                await self.reload()
        return changed

    async def start(self) -> None:
        """Start ``run`` as a task this object owns (``stop`` ends it)."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="nats-auth")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        """Until cancelled: refresh when a rotated-away key's grace ends."""
        while True:
            ends = [until for _, until in self._retiring.values()]
            await asyncio.sleep(max(0.0, min(ends) - self.clock()) + 0.01 if ends else 1.0)
            if any(until <= self.clock() for until in ends):
                try:
                    await self.refresh()
                except Exception:  # the next change or tick tries again
                    log.exception("NATS authorization refresh failed")


def pid_file_reload(pid_file: Path) -> Callable[[], Awaitable[None]]:
    """A ``NatsAuth.reload`` for an external nats-server on this host (its ``pid_file``)."""
    async def reload() -> None:
        if not signal_reload(pid_file):
            log.warning("nats-server pid file %s names no running server: not reloaded",
                        pid_file, extra={"pid_file": str(pid_file)})
    return reload


def refresh_offline(data_dir: Path) -> bool:
    """From another process than the hub (a site bundle, a revocation while the hub is down):
    write the authorization file the hub in ``data_dir`` manages from its store and sites, and
    SIGHUP the server through its pid file. False (and nothing done) if the hub manages none or
    nothing changed."""
    from federation.identity import load_or_create_key

    data_dir = Path(data_dir)
    try:
        managed = json.loads((data_dir / MANAGED_FILE).read_text())
    except FileNotFoundError:
        return False
    except ValueError as exc:
        raise NatsAuthError(f"{data_dir / MANAGED_FILE} is not JSON: {exc}") from exc
    _seed, public = load_or_create_key(data_dir / "hub.key")
    _seed, setup_public = load_or_create_key(data_dir / SETUP_KEY_FILE)
    store = HubStore(data_dir / "hub.db")
    try:
        changed = NatsAuth(Path(managed["auth_file"]), store, public, sites_from=data_dir,
                           setup_public_key=setup_public).write()
    finally:
        store.close()
    pid_file = managed.get("pid_file")
    if changed and pid_file and not signal_reload(Path(pid_file)):
        log.info("no running nats-server behind %s: it reads the new file when it starts",
                 pid_file)
    return changed


def auth_command(data_dir: Path, out: Path | None, pid_file: Path | None) -> int:
    """``outpost-hub nats-auth``: (re)write the hub's authorization file from its data dir."""
    if out is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        record_managed(data_dir, out.resolve(), pid_file.resolve() if pid_file else None)
    elif not (data_dir / MANAGED_FILE).exists():
        raise NatsAuthError(f"the hub in {data_dir} manages no NATS authorization yet: "
                            "pass --out (its nats_auth_file)")
    changed = refresh_offline(data_dir)
    managed = json.loads((data_dir / MANAGED_FILE).read_text())
    print(f"{managed['auth_file']}: {'written' if changed else 'up to date'}")
    return 0
