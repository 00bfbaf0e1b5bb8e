"""``outpost-hub agents ls|revoke|move``: the enrolled agents, how an operator distrusts one,
and how an admin changes the site, name or resources one enrolled with (``move``).

``revoke`` goes through the running hub's API (the URL in ``<data_dir>/hub.url``, the admin
token in ``<data_dir>/admin.token`` or ``--token``), so the hub applies it at once: ingest
drops the agent's events from the next envelope on, placement stops using it, the registry
bucket records it and the hub's NATS-credential hook runs. When no hub answers at that URL
(it is stopped), the revocation is written to the hub's view directly instead, and the NATS
authorization the hub manages (if any) is rewritten and reloaded (``natsauth.refresh_offline``);
ingest reads the flag for every envelope, and the hub copies it to the registry bucket when it
next starts (``Registry.restore``). Either way an unknown id is an error (exit 1) with the reason.

``ls`` reads the view (SQLite in WAL mode: safe beside a running hub).
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from federation.errors import ConfigError, NotFound, OutpostError

TIMEOUT_S = 10.0


def add_parser(sub: Any) -> None:
    """The ``agents`` subcommand and its actions, on ``outpost-hub``'s subparsers."""
    agents = sub.add_parser("agents", help="enrolled agents: list them, revoke one")
    asub = agents.add_subparsers(dest="action", required=True)
    ls = asub.add_parser("ls", help="list enrolled agents and their status")
    ls.add_argument("--data-dir", required=True)
    revoke = asub.add_parser(
        "revoke", help="distrust an agent for good: its events are rejected, it gets no "
        "placements, it cannot enroll again with the same key")
    revoke.add_argument("--data-dir", required=True)
    revoke.add_argument("agent_id", metavar="ID", help="the agent's id (see `agents ls`)")
    revoke.add_argument("--token", help="an admin API token (default: DATA_DIR/admin.token)")
    revoke.add_argument("--ca", type=Path, help="CA file for a hub serving HTTPS")
    move = asub.add_parser(
        "move", help="change an agent's enrolled site, name or resources (an agent cannot "
        "claim others itself); through the running hub")
    move.add_argument("--data-dir", required=True)
    move.add_argument("agent_id", metavar="ID", help="the agent's id (see `agents ls`)")
    move.add_argument("--site")
    move.add_argument("--name")
    for amount in ("cpus", "mem-mb", "disk-mb"):
        move.add_argument(f"--{amount}", type=float)
    move.add_argument("--token", help="an admin API token (default: DATA_DIR/admin.token)")
    move.add_argument("--ca", type=Path, help="CA file for a hub serving HTTPS")


def agents_command(args: argparse.Namespace) -> int:
    """Exit 0 on success, 1 with the reason on stderr (an unknown id, a refusal), 2 for a
    data dir without a hub."""
    if args.action == "ls":
        return _ls(Path(args.data_dir))
    try:
        if args.action == "move":
            return _move(Path(args.data_dir), args)
        return _revoke(Path(args.data_dir), args.agent_id, token=args.token, ca=args.ca)
    except ConfigError:
        raise
    except OutpostError as exc:
        print(f"outpost-hub: {exc.message}", file=sys.stderr)
        return 1


def _open_store(data: Path) -> Any:
    from core_hub.follower import refuse_if_standby
    from core_hub.store import HubStore

    if not (data / "hub.db").exists():
        raise ConfigError(f"no hub data in {data} (start the hub there first)")
    refuse_if_standby(data)
    return HubStore(data / "hub.db")


def _ls(data: Path) -> int:
    store = _open_store(data)
    try:
        agents = store.list_agents()
    finally:
        store.close()
    if not agents:
        print("no agents enrolled")
        return 0
    print(f"{'ID':26}  {'NAME':20}  {'SITE':16}  {'STATUS':12}  LAST SEEN (UTC)")
    for a in agents:
        seen = (time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(a["last_seen"]))
                if a["last_seen"] else "never")
        print(f"{a['id']:26}  {a['name'][:20]:20}  {a['site'][:16]:16}  {a['status']:12}  {seen}")
    return 0


def _revoke(data: Path, agent_id: str, *, token: str | None, ca: Path | None) -> int:
    url_file = data / "hub.url"
    if url_file.exists():
        answer = _post_revoke(url_file.read_text().strip(), agent_id,
                              token or _admin_token(data), ca)
        if answer is not None:
            print(f"revoked {answer['id']} ({answer['name']}, site {answer['site']}); "
                  f"the running hub rejects its events from now on")
            return 0
    store = _open_store(data)
    try:
        changed = store.revoke_agent(agent_id, time.time())
    except NotFound as exc:
        raise NotFound(f"{exc.message} (see `outpost-hub agents ls`)") from None
    finally:
        store.close()
    print(f"revoked {agent_id} in the hub's view{'' if changed else ' (it already was)'}; "
          f"no hub is running at {data}: it records this in the registry when it starts")
    _withdraw_nats_user(data)
    return 0


def _move(data: Path, args: argparse.Namespace) -> int:
    change: dict[str, Any] = {k: v for k, v in (("site", args.site), ("name", args.name))
                              if v is not None}
    resources = {key: value for key, value in (("cpus", args.cpus), ("mem_mb", args.mem_mb),
                                               ("disk_mb", args.disk_mb)) if value is not None}
    if resources:
        change["resources"] = resources
    if not change:
        raise OutpostError("nothing to change: give --site, --name or a resource amount")
    url_file = data / "hub.url"
    answer = None
    if url_file.exists():
        path = f"/v1/agents/{urllib.parse.quote(args.agent_id, safe='')}/enrollment"
        answer = _post(url_file.read_text().strip(), path, change,
                       args.token or _admin_token(data), args.ca)
    if answer is None:
        raise OutpostError(f"no hub is running at {data}: an enrollment changes through the "
                           "running hub (it records it in the registry bucket too)")
    print(f"agent {answer['id']} is now {answer['name']} at site {answer['site']} "
          f"with {answer['resources']}")
    return 0


def _withdraw_nats_user(data: Path) -> None:
    """With the hub down, a NATS server it manages (least privilege) may still run: rewrite its
    authorization file and reload it, so the revoked agent's connection is refused now."""
    from core_hub.natsauth import refresh_offline

    try:
        if refresh_offline(data):
            print("its NATS user is removed from the hub's NATS authorization")
    except OutpostError as exc:
        print(f"outpost-hub: warning: NATS authorization not updated: {exc.message}",
              file=sys.stderr)


def _admin_token(data: Path) -> str:
    path = data / "admin.token"
    if not path.exists():
        raise ConfigError(f"no admin token in {path}: pass --token with an admin API token")
    return path.read_text().strip()


def _post_revoke(url: str, agent_id: str, token: str, ca: Path | None) -> dict[str, Any] | None:
    """The revoked agent as the hub answers it; None when no hub listens at ``url``."""
    return _post(url, f"/v1/agents/{urllib.parse.quote(agent_id, safe='')}/revoke", None,
                 token, ca)


def _post(url: str, path: str, body: Any, token: str, ca: Path | None
          ) -> dict[str, Any] | None:
    """POST ``body`` (JSON, or nothing) to the hub's ``path``: its answer; None when no hub
    listens at ``url``. Raise OutpostError with the hub's own message for any error answer."""
    headers = {"Authorization": f"Bearer {token}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url + path, method="POST", headers=headers,
                                     data=b"" if body is None else json.dumps(body).encode())
    context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=context) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body
    except urllib.error.HTTPError as err:
        try:
            error = json.loads(err.read())["error"]
            message = error["message"]
        except (ValueError, KeyError, TypeError):
            message = f"{err.code} {err.reason}"
        if err.code == 404:
            message += " (see `outpost-hub agents ls`)"
        raise OutpostError(message) from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, ConnectionRefusedError):
            return None  # a stale hub.url: the hub is not running
        if isinstance(err.reason, ssl.SSLCertVerificationError):
            raise OutpostError(f"the hub at {url} has a TLS certificate this machine does not "
                               f"trust ({err.reason.verify_message}); pass --ca CA.pem") from None
        raise OutpostError(f"could not reach the hub at {url}: {err.reason}") from None
    except ConnectionRefusedError:
        return None
