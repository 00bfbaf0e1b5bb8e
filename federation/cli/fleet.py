"""``outpost agents|offers|info|events``: the fleet as a node sees it."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any
from urllib.parse import quote

from federation.cli import api
from federation.cli import output as out
from federation.cli.api import EVENTS_READ_TIMEOUT, Client, Unreachable, parse_sse


def agents_revoke(client: Client, args: argparse.Namespace) -> int:
    """Distrust an agent for good (admin token, at the core; an edge answers 409)."""
    agent = client.call("POST", f"/v1/agents/{quote(args.id, safe='')}/revoke")[1]
    if args.json:
        out.print_json(agent)
    else:
        print(f"{agent['id']}  {agent['status']}  {agent['name']}  {agent['site']}")
    return 0


def agents_ls(client: Client, args: argparse.Namespace) -> int:
    page = api.pages(client, "/v1/agents", {}, every=True)
    if args.json:
        out.print_json(page)
        return 0
    now = time.time()

    def used(a: dict[str, Any], key: str) -> str:
        return f"{(a.get('used') or {}).get(key, 0):g}/{(a.get('resources') or {}).get(key, 0):g}"

    out.table(["ID", "NAME", "SITE", "STATUS", "CPUS", "MEM_MB", "VERSION", "ISOLATION", "SEEN"],
           [[a["id"], a["name"], a["site"], a["status"], used(a, "cpus"), used(a, "mem_mb"),
             out.dash(a.get("version")), out.dash(a.get("isolation")),
             out.age(a.get("last_seen"), now)] for a in page["items"]])
    return 0


def offers_ls(client: Client, args: argparse.Namespace) -> int:
    page = client.get("/v1/offers")  # offers are not paged: one current offer per agent
    if args.json:
        out.print_json(page)
        return 0
    now = time.time()
    out.table(["AGENT", "SITE", "CPUS", "MEM_MB", "DISK_MB", "LABELS", "EXPIRES"],
           [[o["agent_id"], out.dash(o.get("site")), f"{o['cpus']:g}", str(o["mem_mb"]),
             out.dash(o.get("disk_mb")), out.pairs(o.get("labels")),
             f"in {out.duration(o['expires_at'] - now)}" if o.get("expires_at") else "-"]
            for o in page["items"]])
    return 0


def info(client: Client, args: argparse.Namespace) -> int:
    data = client.get("/v1/info")
    if args.json:
        out.print_json(data)
        return 0
    now = time.time()
    out.fields([(k.upper(), out.pairs(v) if isinstance(v, dict)
                 else out.when(v, now) if k.endswith("_at") else out.dash(v))
                for k, v in data.items()])
    return 0


def _summary(kind: str, data: Any) -> str:
    if kind == "task" and isinstance(data, dict):
        text = f"{str(data.get('id'))[:12]}  {data.get('name')}  {data.get('state')}"
        if data.get("exit_code") is not None:
            text += f"  exit {data['exit_code']}"
        return text + (f"  ({data['reason']})" if data.get("reason") else "")
    if kind == "agent" and isinstance(data, dict):
        return f"{data.get('id')}  {data.get('name')}  {data.get('status')}"
    if kind == "offer" and isinstance(data, dict):
        agent = data.get("agent_id") or data.get("_agent")
        text = (f"{str(agent)[:12]}  {out.dash(data.get('site'))}  free: "
                f"cpus {data.get('cpus', 0):g}  mem {data.get('mem_mb')} MB")
        if data.get("disk_mb") is not None:
            text += f"  disk {data['disk_mb']} MB"
        return text
    if kind == "result" and isinstance(data, dict):
        # A command's outcome at an agent: what was asked, of which task, and how it went.
        text = f"{out.dash(data.get('kind'))} {str(data.get('command_id') or '-')[:12]}"
        if data.get("task_id"):
            text += f"  task {str(data['task_id'])[:12]}"
        text += f"  {out.dash(data.get('status'))}"
        return text + (f"  ({data['detail']})" if data.get("detail") else "")
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


def events(client: Client, args: argparse.Namespace) -> int:
    query = None if args.after is None else {"after": args.after}
    timeout = max(client.timeout, EVENTS_READ_TIMEOUT)
    last = args.after
    stream = client.lines("/v1/events", query, headers={"Accept": "text/event-stream"},
                          timeout=timeout)
    try:
        for ev in parse_sse(stream):
            last = ev.id if ev.id is not None else last
            try:
                data = json.loads(ev.data)
            except ValueError:
                data = ev.data
            if args.json:
                line = json.dumps({"id": ev.id, "event": ev.kind, "data": data},
                                  separators=(",", ":"))
            else:
                line = f"{out.dash(ev.id):>6}  {ev.kind:<8}  {_summary(ev.kind, data)}"
            print(line, flush=True)
    except Unreachable as err:
        raise Unreachable(f"{err}{_resume_hint(last)}") from None
    raise Unreachable(f"the event stream from {client.url} ended{_resume_hint(last)}")


def _resume_hint(last: int | None) -> str:
    return "" if last is None else f"; resume with: outpost events --after {last}"
