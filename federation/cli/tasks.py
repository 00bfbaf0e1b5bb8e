"""``outpost tasks``: run, list, inspect, kill tasks and read their logs."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Any

from federation.cli import api
from federation.cli import output as out
from federation.cli.api import Client, UsageError


def given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def task_spec(args: argparse.Namespace, what: str) -> dict[str, Any]:
    """The task options of ``args`` (``tasks run``, ``services run``): only what the user
    chose, so the node fills its own defaults."""
    if args.max_restarts is not None and args.restart in (None, "never"):
        raise UsageError(f"{what}: --max-restarts needs --restart on-failure or always")
    resources = given(cpus=args.cpus, mem_mb=args.mem_mb, disk_mb=args.disk_mb)
    restart = given(policy=args.restart, max=args.max_restarts)
    return given(resources=resources or None, restart=restart or None,
                 env=dict(args.env) or None, labels=dict(args.label) or None,
                 kill_timeout=args.kill_timeout, **container(args, what))


def container(args: argparse.Namespace, what: str) -> dict[str, Any]:
    """``--image`` and the container options: driver oci, its image and ``oci``."""
    opts = given(network=args.network, user=args.user, mounts=list(args.mount) or None,
                 read_only_root=False if args.writable_root else None)
    if args.image is None:
        if opts:
            raise UsageError(f"{what}: --network, --user, --writable-root and --mount are "
                             "container options; give --image too")
        return {}
    image = args.image
    if os.path.exists(image):  # a local path: the agent on this machine reads it
        image = os.path.abspath(image)
    return given(driver="oci", image=image, oci=opts or None)


def constraints(args: argparse.Namespace) -> dict[str, Any]:
    """Placement at the core: ``--site``, ``--label-constraint``, ``--spread|--binpack``
    (and ``--unique`` for services)."""
    return given(site=args.site, labels=list(args.label_constraint) or None,
                 strategy=args.strategy, unique=getattr(args, "unique", None))


def tasks_run(client: Client, args: argparse.Namespace) -> int:
    if not args.argv:
        raise UsageError("tasks run: give the command after --, e.g. "
                         "outpost tasks run hello -- echo hi")
    spec: dict[str, Any] = {"name": args.name, "command": args.argv,
                            **task_spec(args, "tasks run")}
    if placement := constraints(args):
        spec["constraints"] = placement
    _, task = client.call("POST", "/v1/tasks", body=spec)
    if args.json:
        out.print_json(task)
    else:
        print(task["id"])
    return 0


def tasks_ls(client: Client, args: argparse.Namespace) -> int:
    query: dict[str, Any] = {}
    if args.state:
        query["state"] = ",".join(s for arg in args.state for s in arg.split(",") if s)
    if args.label:
        query["label"] = "=".join(args.label)
    if args.name:
        query["name"] = args.name
    if args.limit:
        query["limit"] = args.limit
    page = api.pages(client, "/v1/tasks", query, args.all)
    if args.json:
        out.print_json(page)
        return 0
    now = time.time()
    # At the core, two `web` rows differ by where they run: show SITE and the agent's name.
    names = _agent_names(client) if client.get("/v1/health").get("role") == "core" else None
    header = ["ID", "NAME", "STATE", "EXIT", "RESTARTS", "AGE", "REASON"]
    rows = []
    for t in page["items"]:
        row = [t["id"][:12], t["name"], t["state"], out.dash(t.get("exit_code")),
               str(t.get("restarts", 0)), out.age(t.get("created_at"), now),
               out.dash(t.get("reason"))]
        if names is not None:
            agent = t.get("agent_id")
            row[6:6] = [out.dash(t.get("site")),
                        out.dash(names.get(agent, agent[:12]) if agent else None)]
        rows.append(row)
    if names is not None:
        header[6:6] = ["SITE", "AGENT"]
    out.table(header, rows)
    if page["next_cursor"]:
        print(f"outpost: showing the first {len(page['items'])} tasks; --all lists every page",
              file=sys.stderr)
    return 0


def _agent_names(client: Client) -> dict[str, str]:
    agents = api.pages(client, "/v1/agents", {}, every=True)["items"]
    return {a["id"]: a["name"] for a in agents}


def tasks_get(client: Client, args: argparse.Namespace) -> int:
    t = client.get(api.task_path(args.id))
    if args.json:
        out.print_json(t)
        return 0
    now, res, rs = time.time(), t.get("resources") or {}, t.get("restart") or {}
    restart = rs.get("policy", "never")
    if rs.get("policy") not in (None, "never"):
        cap = "no cap" if rs.get("max") is None else f"max {rs['max']}"
        restart += f" ({cap}, backoff {rs.get('backoff')}s..{rs.get('max_backoff')}s)"
    out.fields([
        ("ID", t["id"]), ("NAME", t["name"]), ("STATE", t["state"]),
        ("EXIT", out.dash(t.get("exit_code"))), ("REASON", out.dash(t.get("reason"))),
        ("RESTARTS", str(t.get("restarts", 0))), ("COMMAND", shlex.join(t["command"])),
        ("DRIVER", t.get("driver") or "process"), ("IMAGE", out.dash(t.get("image"))),
        ("ENV", out.pairs(t.get("env"))), ("LABELS", out.pairs(t.get("labels"))),
        ("RESOURCES", out.pairs(res)), ("RESTART", restart),
        ("KILL_TIMEOUT", f"{t.get('kill_timeout')}s"),
        ("AGENT", out.dash(t.get("agent_id"))), ("SITE", out.dash(t.get("site"))),
        ("ORIGIN", out.dash(t.get("origin"))), ("GENERATION", out.dash(t.get("generation"))),
        ("PID", out.dash(t.get("pid"))), ("HEALTHY", out.dash(t.get("healthy"))),
        ("CREATED", out.when(t.get("created_at"), now)),
        ("STARTED", out.when(t.get("started_at"), now)),
        ("FINISHED", out.when(t.get("finished_at"), now)),
    ])
    return 0


def tasks_history(client: Client, args: argparse.Namespace) -> int:
    answer = client.get(api.task_path(args.id, "/history"))
    if args.json:
        out.print_json(answer)
        return 0
    now = time.time()
    out.table(["WHEN", "STATE", "EXIT", "RESTARTS", "REASON"],
           [[out.when(e["ts"], now), e["state"], out.dash(e.get("exit_code")),
             out.dash(e.get("restarts")), out.dash(e.get("reason"))] for e in answer["items"]])
    return 0


def tasks_kill(client: Client, args: argparse.Namespace) -> int:
    status, task = client.call("DELETE", api.task_path(args.id))
    if args.json:
        out.print_json(task)
    elif status == 202:
        print(f"{task['id']}  stopping (the node is killing it)")
    else:
        print(f"{task['id']}  {task['state']}  {out.dash(task.get('reason'))}")
    return 0


def tasks_logs(client: Client, args: argparse.Namespace) -> int:
    query: dict[str, Any] = {"stream": "stderr" if args.stderr else "stdout"}
    if args.tail is not None:
        query["tail"] = args.tail
    timeout: float | None = client.timeout
    if args.follow:
        # Check task and node with the normal timeout first: a quiet task may then stay silent
        # for hours, so the follow request itself must have no read timeout.
        client.get(api.task_path(args.id))
        query["follow"] = "true"
        timeout = None
    out = sys.stdout.buffer
    for line in client.lines(api.task_path(args.id, "/logs"), query, timeout=timeout):
        out.write(line)
        if args.follow:
            out.flush()
    out.flush()
    return 0
