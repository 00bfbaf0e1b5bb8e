"""``outpost services``: keep N instances of a task running across the fleet (core only).

The API has no verbs for scale or update: both read the service, change the fields the user
gave and PUT it back, so every other setting (constraints, disconnect and update rules) stays
as it was. A changed task rolls out instance by instance; ``rollout status`` shows how far.
"""

from __future__ import annotations

import argparse
import shlex
import time
from typing import Any
from urllib.parse import quote

from federation.cli import output as out
from federation.cli.api import Client, UsageError
from federation.cli.tasks import constraints, task_spec

# What a PUT takes (schemas.SERVICE); the rest of a GET is live status.
_SERVICE_FIELDS = ("name", "task", "instances", "constraints", "update", "disconnect")
# Set by the hub on every instance; never sent back.
_MANAGED_LABELS = ("outpost.service", "outpost.revision")


def _path(name: str) -> str:
    return f"/v1/services/{quote(name, safe='')}"


def _rollout(svc: dict[str, Any]) -> str:
    rollout = svc.get("rollout") or {}
    return str(rollout.get("status") or "-")


def _show(svc: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        out.print_json(svc)
    else:
        print(f"{svc['name']}  revision {svc.get('revision', '-')}  "
              f"{svc.get('running', 0)}/{svc['instances']} running  rollout {_rollout(svc)}")


def services_ls(client: Client, args: argparse.Namespace) -> int:
    page = client.get("/v1/services")
    if args.json:
        out.print_json(page)
        return 0
    out.table(["NAME", "RUNNING", "INSTANCES", "REVISION", "ROLLOUT", "COMMAND"],
              [[s["name"], str(s.get("running", 0)), str(s["instances"]),
                out.dash(s.get("revision")), _rollout(s), shlex.join(s["task"]["command"])]
               for s in page["items"]])
    return 0


def services_get(client: Client, args: argparse.Namespace) -> int:
    s = client.get(_path(args.name))
    if args.json:
        out.print_json(s)
        return 0
    task, cons = s["task"], s.get("constraints") or {}
    labels = {k: v for k, v in (task.get("labels") or {}).items() if k not in _MANAGED_LABELS}
    out.fields([
        ("NAME", s["name"]), ("INSTANCES", str(s["instances"])),
        ("RUNNING", str(s.get("running", 0))), ("REVISION", out.dash(s.get("revision"))),
        ("ROLLOUT", _rollout(s)), ("COMMAND", shlex.join(task["command"])),
        ("ENV", out.pairs(task.get("env"))), ("LABELS", out.pairs(labels)),
        ("RESOURCES", out.pairs(task.get("resources"))),
        ("SITE", out.dash(cons.get("site"))), ("UNIQUE", out.dash(cons.get("unique"))),
        ("STRATEGY", out.dash(cons.get("strategy"))),
        ("TASKS", " ".join(t[:12] for t in s.get("tasks") or []) or "-"),
        ("LOST", " ".join(t[:12] for t in s.get("lost") or []) or "-"),
    ])
    return 0


def services_run(client: Client, args: argparse.Namespace) -> int:
    if not args.argv:
        raise UsageError("services run: give the command after --, e.g. "
                         "outpost services run web --instances 2 -- python3 -m http.server")
    body: dict[str, Any] = {"name": args.name, "instances": args.instances,
                            "task": {"command": args.argv, **task_spec(args, "services run")}}
    if placement := constraints(args):
        body["constraints"] = placement
    _show(client.call("POST", "/v1/services", body=body)[1], args)
    return 0


def _editable(svc: dict[str, Any]) -> dict[str, Any]:
    """A GET answer as a PUT body: the service's own fields, the hub's labels taken out."""
    body = {k: svc[k] for k in _SERVICE_FIELDS if k in svc}
    task = {k: v for k, v in svc["task"].items() if k not in ("name", "constraints")}
    task["labels"] = {k: v for k, v in (task.get("labels") or {}).items()
                      if k not in _MANAGED_LABELS}
    body["task"] = task
    return body


def services_scale(client: Client, args: argparse.Namespace) -> int:
    body = _editable(client.get(_path(args.name)))
    body["instances"] = args.instances
    _show(client.call("PUT", _path(args.name), body=body)[1], args)
    return 0


def services_update(client: Client, args: argparse.Namespace) -> int:
    """Change the task (a rollout) and/or its placement; unchanged fields stay as they are."""
    body = _editable(client.get(_path(args.name)))
    task, change = body["task"], task_spec(args, "services update")
    if args.argv:
        change["command"] = args.argv
    placement = constraints(args)
    if not change and not placement:
        raise UsageError("services update: nothing to change; give task options (--env, "
                         "--cpus, ...), placement (--site, ...) or a new command after --")
    for key in ("env", "labels", "resources", "restart"):  # merged: --env K=V adds or sets K
        if key in change:
            change[key] = {**(task.get(key) or {}), **change[key]}
    body["task"] = {**task, **change}
    body["constraints"] = {**(body.get("constraints") or {}), **placement}
    _show(client.call("PUT", _path(args.name), body=body)[1], args)
    return 0


def services_rm(client: Client, args: argparse.Namespace) -> int:
    svc = client.call("DELETE", _path(args.name))[1]
    if args.json:
        out.print_json(svc)
    else:
        print(f"{svc['name']}  removed (its instances are being stopped)")
    return 0


def rollout_status(client: Client, args: argparse.Namespace) -> int:
    svc = client.get(_path(args.name))
    rollout = svc.get("rollout") or {}
    if args.json:
        out.print_json({"name": svc["name"], "revision": svc.get("revision"),
                        "running": svc.get("running"), "instances": svc["instances"],
                        "rollout": svc.get("rollout")})
        return 0
    now = time.time()
    out.fields([
        ("SERVICE", svc["name"]), ("REVISION", out.dash(svc.get("revision"))),
        ("STATUS", rollout.get("status") or "none (never changed)"),
        ("FROM", out.dash(rollout.get("from_revision"))),
        ("STARTED", out.when(rollout.get("started_at"), now)),
        ("RUNNING", f"{svc.get('running', 0)}/{svc['instances']}"),
        ("REASON", out.dash(rollout.get("reason"))),
    ])
    return 0
