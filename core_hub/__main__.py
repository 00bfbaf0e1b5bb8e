"""``outpost-hub``: run the hub, and manage join tokens.

    outpost-hub run --data-dir DIR [--listen HOST:PORT] (--nats URL | --embedded-nats
                    [--nats-port N]) [--config hub.toml]
    outpost-hub token create --data-dir DIR [--ttl SECONDS] [--uses N] [--site SITE]
    outpost-hub token ls|revoke --data-dir DIR [REF]
    outpost-hub agents ls --data-dir DIR
    outpost-hub agents revoke --data-dir DIR ID [--token T] [--ca FILE]
    outpost-hub agents move --data-dir DIR ID [--site S] [--name N] [--cpus C] [--mem-mb M]
    outpost-hub site bundle --data-dir DIR --site NAME --out DIR [--hub-nats URL] [--ttl S]
                    [--python python3] [--wheel outpost-*.whl]
    outpost-hub nats-auth --data-dir DIR [--out FILE [--pid-file FILE]]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from core_hub import agents_cli
from core_hub.config import HubConfig
from federation.config import API_FLAGS, ArgParser, add_api_flags, build_settings, load_toml
from federation.errors import ConfigError, OutpostError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgParser(prog="outpost-hub", description="Run the Outpost core hub.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the hub")
    run.add_argument("--config", type=Path, help="TOML file ([hub] table or top level)")
    run.add_argument("--data-dir")
    run.add_argument("--listen", help="HOST:PORT for the API (port 0: any free port)")
    run.add_argument("--nats", dest="nats_url", help="NATS URL")
    run.add_argument("--embedded-nats", action="store_const", const=True, default=None,
                     help="run a nats-server (JetStream) as a child of the hub")
    run.add_argument("--nats-port", help="port of the embedded nats-server (0: any)")
    run.add_argument("--unreachable-after", dest="unreachable_after_s",
                     help="seconds without heartbeats before an agent is unreachable")
    run.add_argument("--disconnected-after", dest="disconnected_after_s")
    run.add_argument("--agent-jwt-ttl", dest="agent_jwt_ttl_s",
                     help="seconds an agent's NATS user JWT is valid (it renews at half)")
    run.add_argument("--enroll-rate", dest="enroll_rate_per_s",
                     help="enrollment requests answered per second (the rest are shed)")
    run.add_argument("--enroll-burst", dest="enroll_burst",
                     help="enrollment requests answered at once after a quiet spell")
    run.add_argument("--log-format")
    run.add_argument("--log-level")
    add_api_flags(run)
    run.add_argument("--nats-tls-cert", help="embedded nats-server: require TLS, this cert")
    run.add_argument("--nats-tls-key", help="embedded nats-server: key of --nats-tls-cert")
    api = sub.add_parser("apitoken", help="API tokens with roles (viewer, operator, admin)")
    asub = api.add_subparsers(dest="action", required=True)
    acreate = asub.add_parser("create", help="print a new API token")
    acreate.add_argument("--data-dir", required=True)
    acreate.add_argument("--role", choices=("viewer", "operator", "admin"), default="viewer")
    acreate.add_argument("--name", default="", help="who or what it is for")
    als = asub.add_parser("ls", help="list API tokens (digests only)")
    als.add_argument("--data-dir", required=True)
    arevoke = asub.add_parser("revoke", help="revoke an API token by digest prefix")
    arevoke.add_argument("--data-dir", required=True)
    arevoke.add_argument("ref")
    sub.add_parser("demo", help="a hub, embedded NATS and two agents on this machine",
                   add_help=False)
    token = sub.add_parser("token", help="join tokens for agents")
    tsub = token.add_subparsers(dest="action", required=True)
    create = tsub.add_parser("create", help="print a new join token")
    create.add_argument("--data-dir", required=True)
    create.add_argument("--ttl", type=float, default=3600.0, help="seconds it stays valid")
    create.add_argument("--uses", type=int, default=1, help="how many agents may use it (0: any)")
    create.add_argument("--site", help="enroll agents of this site only (their site is fixed "
                        "at enrollment)")
    ls = tsub.add_parser("ls", help="list join tokens")
    ls.add_argument("--data-dir", required=True)
    revoke = tsub.add_parser("revoke", help="revoke a join token (token or digest prefix)")
    revoke.add_argument("--data-dir", required=True)
    revoke.add_argument("ref")
    agents_cli.add_parser(sub)
    site = sub.add_parser("site", help="edge sites: bundles that join a site to this hub")
    ssub = site.add_subparsers(dest="action", required=True)
    bundle = ssub.add_parser(
        "bundle", help="write a site bundle: edge.toml with a fresh join token, a NATS leaf "
        "config, systemd units and install.sh")
    bundle.add_argument("--data-dir", required=True, help="the hub's data dir")
    bundle.add_argument("--site", required=True, help="the site's name")
    bundle.add_argument("--out", required=True, type=Path, help="new (or empty) directory")
    bundle.add_argument("--hub-nats", help="the hub NATS leafnodes URL the site's leaf connects "
                        "to (default: nats-leaf://<this host>:7422)")
    bundle.add_argument("--ttl", type=float, default=7 * 86400.0,
                        help="seconds the join token stays valid (default: 7 days)")
    bundle.add_argument("--python", default="python3",
                        help="the interpreter install.sh makes the venv with (3.11 or newer)")
    bundle.add_argument("--wheel", type=Path, help="an outpost wheel or sdist to ship in it")
    nauth = sub.add_parser("nats-auth", help="write the NATS authorization file the hub "
                           "manages (least privilege), e.g. before nats-server first starts")
    nauth.add_argument("--data-dir", required=True, help="the hub's data dir")
    nauth.add_argument("--out", type=Path, help="the file (the hub's nats_auth_file); default: "
                       "the one the hub last used")
    nauth.add_argument("--pid-file", type=Path, help="nats-server's pid file")
    nauth.add_argument("--nats-url", help="the server's client URL: account updates made "
                       "while the hub is down (outpost-hub agents revoke) are pushed there")
    return p.parse_args(argv)


def load_config(args: argparse.Namespace, env: dict[str, str]) -> HubConfig:
    file = load_toml(args.config, section="hub")
    flags: dict[str, Any] = {k: getattr(args, k) for k in (
        "data_dir", "listen", "nats_url", "embedded_nats", "nats_port", "unreachable_after_s",
        "disconnected_after_s", "agent_jwt_ttl_s", "enroll_rate_per_s", "enroll_burst",
        "log_format", "log_level", "nats_tls_cert", "nats_tls_key", *API_FLAGS)}
    if "data_dir" not in file and not args.data_dir and "OUTPOST_DATA_DIR" not in env:
        raise ConfigError("data_dir: required (--data-dir, $OUTPOST_DATA_DIR or the config file)")
    return build_settings(HubConfig, file=file, env=env, flags=flags,
                          file_name=str(args.config or "config file"))


def _open_store(data_dir: str) -> Any:
    from core_hub.follower import refuse_if_standby
    from core_hub.store import HubStore

    data = Path(data_dir)
    if not (data / "hub.db").exists():
        raise ConfigError(f"no hub data in {data} (start the hub there first)")
    refuse_if_standby(data)
    return HubStore(data / "hub.db")


def apitokens_command(args: argparse.Namespace) -> int:
    from federation.auth import digest, new_token

    store = _open_store(args.data_dir)
    try:
        if args.action == "create":
            token = new_token()
            store.add_api_token(digest(token), args.role, args.name, time.time())
            print(token)
        elif args.action == "ls":
            for t in store.api_tokens():
                state = "revoked" if t["revoked"] else "valid"
                print(f"{t['digest'][:12]}  {t['role']:8}  {state:7}  {t['name']}")
        else:
            print(f"revoked {store.revoke_api_token(args.ref)[:12]}")
    finally:
        store.close()
    return 0


def tokens_command(args: argparse.Namespace) -> int:
    from core_hub.enroll import JoinTokens, nats_account

    store = _open_store(args.data_dir)
    try:
        tokens = JoinTokens(store, account=nats_account(Path(args.data_dir)))
        if args.action == "create":
            if args.ttl <= 0 or args.uses < 0:
                raise ConfigError("--ttl must be above 0 and --uses 0 or more")
            print(tokens.create_token(args.ttl, args.uses or None, site=args.site))
        elif args.action == "ls":
            for t in tokens.list_tokens():
                left = "any" if t["uses_left"] is None else t["uses_left"]
                expires = time.strftime("%Y-%m-%d %H:%M", time.gmtime(t["expires_at"]))
                print(f"{t['digest'][:12]}  {t['state']:8}  uses left {left}  "
                      f"expires {expires} UTC")
        else:
            print(f"revoked {tokens.revoke_token(args.ref)[:12]}")
    finally:
        store.close()
    return 0


def site_command(args: argparse.Namespace) -> int:
    from core_hub.bundle import write_bundle

    made = write_bundle(Path(args.data_dir), args.site, args.out, hub_url=args.hub_nats,
                        ttl_s=args.ttl, python=args.python, wheel=args.wheel)
    expires = time.strftime("%Y-%m-%d %H:%M", time.gmtime(made.expires_at))
    print(f"site bundle for {made.site} in {made.path}")
    print(f"  join token: one use, valid until {expires} UTC")
    print(f"  the site's leaf node connects to {made.hub_url}")
    if args.hub_nats is None:
        print("  (from this machine's name: pass --hub-nats nats-leaf://HOST:7422 with the "
              "address the site reaches)")
    if not made.has_package:
        print("  no outpost wheel in it: add one (--wheel, or `pip wheel --no-deps SOURCE`) or "
              "set OUTPOST_WHEEL when installing")
    print(f"copy {made.path} to the site and run there: sudo ./install.sh")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from core_hub.demo import main as demo

        return demo(argv[1:])
    args = parse_args(argv)
    env = dict(os.environ)
    try:
        if args.command == "token":
            return tokens_command(args)
        if args.command == "apitoken":
            return apitokens_command(args)
        if args.command == "site":
            return site_command(args)
        if args.command == "agents":
            return agents_cli.agents_command(args)
        if args.command == "nats-auth":
            from core_hub.natsauth import auth_command

            return auth_command(Path(args.data_dir), args.out, args.pid_file, args.nats_url)
        config = load_config(args, env)
    except OutpostError as exc:
        print(f"outpost-hub: {exc.message}", file=sys.stderr)
        return 2
    from core_hub.hub import Hub
    from federation.log import configure

    configure(config.log_format, config.log_level)
    hub = Hub(config)
    try:
        asyncio.run(hub.run_until_signalled())
    except OutpostError as exc:
        print(f"outpost-hub: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:  # NATS timeouts are OSErrors too: the log says where it was
        logging.getLogger("core_hub").debug("hub stopped by %r", exc, exc_info=True)
        print(f"outpost-hub: {exc}", file=sys.stderr)
        return 1
    return hub.exit_code


if __name__ == "__main__":
    sys.exit(main())
