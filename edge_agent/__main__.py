"""``outpost-agent``: run one edge agent.

    outpost-agent --data-dir DIR [--listen HOST:PORT] [--name N] [--site S] [--label k=v ...]
                  [--cpus C] [--mem-mb M] [--config edge.toml] [--stop-tasks-on-exit]
    outpost-agent rotate-key --data-dir DIR [--wait SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig
from federation.config import (
    API_FLAGS,
    ArgParser,
    add_api_flags,
    build_settings,
    load_toml,
    parse_pairs,
)
from federation.errors import ConfigError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgParser(prog="outpost-agent", description="Run an Outpost edge agent.")
    p.add_argument("--config", type=Path, help="TOML file ([agent] table or top level)")
    p.add_argument("--data-dir", help="where the store, task dirs and keys live")
    p.add_argument("--listen", help="HOST:PORT for the API (port 0: any free port)")
    p.add_argument("--name", help="agent name (default: host name)")
    p.add_argument("--site", help="site this agent belongs to")
    p.add_argument("--label", action="append", default=[], metavar="K=V", help="repeatable")
    p.add_argument("--cpus", help="cpus tasks may use in all")
    p.add_argument("--mem-mb", help="memory (MB) tasks may use in all")
    p.add_argument("--disk-mb", help="disk (MB) tasks may use in all")
    p.add_argument("--isolation", help="auto | cgroup-v2 | cgroup-v1 | rlimit")
    p.add_argument("--stop-tasks-on-exit", action="store_const", const=True, default=None,
                   help="kill tasks when the agent stops (default: they keep running)")
    p.add_argument("--nats", dest="nats_url", help="NATS URL of the core or the site leaf")
    p.add_argument("--join-token", help="one-time token from `outpost-hub token create`")
    p.add_argument("--heartbeat", dest="heartbeat_s", help="seconds between heartbeats")
    p.add_argument("--outbox-max", help="unshipped events kept before superseded ones coalesce")
    p.add_argument("--max-tasks", help="tasks not yet ended this agent holds at once (1000)")
    p.add_argument("--artifact-cache-mb", help="most MB the artifact cache holds (2048)")
    p.add_argument("--artifact-rate-kbps", help="cap on artifact fetches in kB/s (0: none)")
    p.add_argument("--artifact-site-peers", action="store_const", const=True, default=None,
                   help="get artifacts from this site's agents that have them (behind a leaf)")
    add_api_flags(p)
    p.add_argument("--log-format", help="text | json")
    p.add_argument("--log-level", help="debug | info | warning | error")
    return p.parse_args(argv)


def load_config(args: argparse.Namespace, env: dict[str, str]) -> AgentConfig:
    file = load_toml(args.config, section="agent")
    flags: dict[str, Any] = {
        "data_dir": args.data_dir, "listen": args.listen, "name": args.name, "site": args.site,
        "labels": parse_pairs(args.label, "label") if args.label else None,
        "cpus": args.cpus, "mem_mb": args.mem_mb, "disk_mb": args.disk_mb,
        "isolation": args.isolation, "stop_tasks_on_exit": args.stop_tasks_on_exit,
        "artifact_site_peers": args.artifact_site_peers,
        "log_format": args.log_format, "log_level": args.log_level,
        "nats_url": args.nats_url, "join_token": args.join_token,
        "heartbeat_s": args.heartbeat_s, "outbox_max": args.outbox_max,
        **{k: getattr(args, k) for k in ("max_tasks", "artifact_cache_mb", "artifact_rate_kbps",
                                             *API_FLAGS)},
    }
    merged_file = dict(file)
    if "data_dir" not in merged_file and not args.data_dir and "OUTPOST_DATA_DIR" not in env:
        raise ConfigError("data_dir: required (--data-dir, $OUTPOST_DATA_DIR or the config file)")
    return build_settings(AgentConfig, file=merged_file, env=env, flags=flags,
                          file_name=str(args.config or "config file"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rotate-key"]:
        from edge_agent.keyrotation import main as rotate_key

        return rotate_key(argv[1:])
    args = parse_args(argv)
    env = dict(os.environ)
    try:
        config = load_config(args, env)
    except ConfigError as exc:
        print(f"outpost-agent: {exc.message}", file=sys.stderr)
        return 2
    from edge_agent.agent import Agent
    from federation.log import configure

    configure(config.log_format, config.log_level)
    try:
        asyncio.run(Agent(config, env).run_until_signalled())
    except OSError as exc:
        print(f"outpost-agent: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"outpost-agent: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
