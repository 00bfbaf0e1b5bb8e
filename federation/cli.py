"""``outpost``: the command-line client for the /v1 API that every node (edge or core) serves.

One client serves the whole fleet because the API is the same everywhere: point ``--url`` at an
edge to steer that site alone, or at the core to steer the fleet. It uses only the standard
library so it installs anywhere an operator has Python, and streams (``logs -f``, ``events``)
are read line by line so output appears as the node writes it.

    outpost [--url URL] [--token T] [--json] tasks run NAME [options] -- CMD [ARGS...]
    outpost tasks ls [--state S] [--label K=V] [--name N] [--limit N] [--all]
    outpost tasks get|kill ID        outpost tasks logs ID [-f] [--tail N] [--stderr]
    outpost agents ls | agents revoke ID | offers ls | info | events [--after N]
    (an https:// node signed by a private CA: --cacert CA.pem or OUTPOST_CACERT)

Exit status: 0 ok, 1 the API refused (the line on stderr says why), 2 usage error, 3 the node
could not be reached (or a stream was cut), 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote, urlencode, urlsplit

from federation.config import ArgParser

EXIT_API, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED, EXIT_PIPE = 1, 2, 3, 130, 141
# The server sends an SSE keepalive every 15 s; three missed ones mean the link is dead.
EVENTS_READ_TIMEOUT = 45.0


class CliError(Exception):
    """A failure reported as one line on stderr; ``exit_code`` says which kind."""

    exit_code = EXIT_API


class UsageError(CliError):
    exit_code = EXIT_USAGE


class Unreachable(CliError):
    exit_code = EXIT_UNREACHABLE


class ApiError(CliError):
    """The node answered with an error body; printed as ``STATUS CODE: MESSAGE``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


# ---------------------------------------------------------------- HTTP


@dataclass(frozen=True, slots=True)
class Client:
    """Talks to one node. Fields: ``url`` (no trailing slash), ``token``, ``timeout`` seconds,
    ``context`` (TLS for https:// URLs: trusts ``--cacert``; None: the system's CAs)."""

    url: str
    token: str | None
    timeout: float
    context: ssl.SSLContext | None = None

    def _open(self, method: str, path: str, query: dict[str, Any] | None, body: Any,
              headers: dict[str, str], timeout: float | None) -> http.client.HTTPResponse:
        target = self.url + path + (f"?{urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(target, data=data, method=method, headers=headers)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            resp: http.client.HTTPResponse = urllib.request.urlopen(req, timeout=timeout,
                                                                    context=self.context)
            return resp
        except urllib.error.HTTPError as err:
            raise self._api_error(err) from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, ssl.SSLCertVerificationError):
                raise Unreachable(
                    f"cannot reach {self.url}: its TLS certificate is not trusted "
                    f"({err.reason.verify_message}); pass --cacert CA.pem (or set "
                    "OUTPOST_CACERT) if a private CA signed it") from None
            raise Unreachable(f"cannot reach {self.url}: {_reason(err.reason)}") from None
        except (OSError, http.client.HTTPException) as err:
            raise Unreachable(f"cannot reach {self.url}: {_reason(err)}") from None

    def _api_error(self, err: urllib.error.HTTPError) -> ApiError:
        try:
            raw = err.read()
        except (OSError, http.client.HTTPException):
            raw = b""
        finally:
            err.close()
        try:
            body = json.loads(raw)["error"]
            code, message = str(body["code"]), str(body["message"])
        except (ValueError, TypeError, KeyError):
            code, message = "http_error", str(err.reason)  # not an Outpost error body
        if err.code == 401 and not self.token:
            message += "; pass --token or set OUTPOST_TOKEN"
        return ApiError(err.code, code, " ".join(message.split()))

    def call(self, method: str, path: str, query: dict[str, Any] | None = None,
             body: Any = None) -> tuple[int, Any]:
        """One JSON request: (status, decoded body)."""
        with self._open(method, path, query, body, {"Accept": "application/json"},
                        self.timeout) as resp:
            try:
                raw = resp.read()
            except (OSError, http.client.HTTPException) as err:
                raise Unreachable(f"lost the connection to {self.url}: {_reason(err)}") from None
            status = resp.status
        try:
            return status, json.loads(raw)
        except ValueError:
            raise CliError(f"{self.url}{path} did not answer with JSON; is it an Outpost node?") \
                from None

    def get(self, path: str, query: dict[str, Any] | None = None) -> Any:
        return self.call("GET", path, query)[1]

    def lines(self, path: str, query: dict[str, Any] | None = None, *,
              headers: dict[str, str] | None = None,
              timeout: float | None) -> Iterator[bytes]:
        """The response body line by line as the node sends it; ends when the node ends it."""
        with self._open("GET", path, query, None, headers or {}, timeout) as resp:
            while True:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException) as err:
                    raise Unreachable(
                        f"lost the connection to {self.url}: {_reason(err)}") from None
                if not line:
                    return
                yield line


def _reason(err: object) -> str:
    if isinstance(err, TimeoutError):
        return "no answer in time"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return str(err) or type(err).__name__


def _task_path(task_id: str, suffix: str = "") -> str:
    return f"/v1/tasks/{quote(task_id, safe='')}{suffix}"


def _pages(client: Client, path: str, query: dict[str, Any], every: bool) -> dict[str, Any]:
    """One page, or with ``every`` all of them merged (``next_cursor`` then null)."""
    page = client.get(path, query)
    items = list(page["items"])
    seen: set[str] = set()
    while every and page.get("next_cursor"):
        cursor = page["next_cursor"]
        if cursor in seen:
            raise CliError(f"{client.url} returned the same cursor twice; stopping")
        seen.add(cursor)
        page = client.get(path, {**query, "cursor": cursor})
        items.extend(page["items"])
    return {"items": items, "next_cursor": None if every else page.get("next_cursor")}


# ---------------------------------------------------------------- output


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _fields(pairs: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        print(f"{key.ljust(width)}  {value}".rstrip())


def _age(ts: float | None, now: float) -> str:
    return "-" if not ts else _duration(now - ts)


def _duration(seconds: float) -> str:
    secs = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def _when(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))} ({_age(ts, now)} ago)"


def _pairs(mapping: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (mapping or {}).items()) or "-"


def _dash(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


# ---------------------------------------------------------------- commands


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def tasks_run(client: Client, args: argparse.Namespace) -> int:
    if not args.argv:
        raise UsageError("tasks run: give the command after --, e.g. "
                         "outpost tasks run hello -- echo hi")
    if args.max_restarts is not None and args.restart in (None, "never"):
        raise UsageError("tasks run: --max-restarts needs --restart on-failure or always")
    # Send only what the user chose: the node fills its own defaults.
    spec: dict[str, Any] = {"name": args.name, "command": args.argv}
    resources = _given(cpus=args.cpus, mem_mb=args.mem_mb, disk_mb=args.disk_mb)
    restart = _given(policy=args.restart, max=args.max_restarts)
    spec.update(_given(resources=resources or None, restart=restart or None,
                       env=dict(args.env) or None, labels=dict(args.label) or None,
                       kill_timeout=args.kill_timeout))
    _, task = client.call("POST", "/v1/tasks", body=spec)
    if args.json:
        _print_json(task)
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
    page = _pages(client, "/v1/tasks", query, args.all)
    if args.json:
        _print_json(page)
        return 0
    now = time.time()
    _table(["ID", "NAME", "STATE", "EXIT", "RESTARTS", "AGE", "REASON"],
           [[t["id"][:12], t["name"], t["state"], _dash(t.get("exit_code")),
             str(t.get("restarts", 0)), _age(t.get("created_at"), now), _dash(t.get("reason"))]
            for t in page["items"]])
    if page["next_cursor"]:
        print(f"outpost: showing the first {len(page['items'])} tasks; --all lists every page",
              file=sys.stderr)
    return 0


def tasks_get(client: Client, args: argparse.Namespace) -> int:
    t = client.get(_task_path(args.id))
    if args.json:
        _print_json(t)
        return 0
    now, res, rs = time.time(), t.get("resources") or {}, t.get("restart") or {}
    restart = rs.get("policy", "never")
    if rs.get("policy") not in (None, "never"):
        cap = "no cap" if rs.get("max") is None else f"max {rs['max']}"
        restart += f" ({cap}, backoff {rs.get('backoff')}s..{rs.get('max_backoff')}s)"
    _fields([
        ("ID", t["id"]), ("NAME", t["name"]), ("STATE", t["state"]),
        ("EXIT", _dash(t.get("exit_code"))), ("REASON", _dash(t.get("reason"))),
        ("RESTARTS", str(t.get("restarts", 0))), ("COMMAND", shlex.join(t["command"])),
        ("ENV", _pairs(t.get("env"))), ("LABELS", _pairs(t.get("labels"))),
        ("RESOURCES", _pairs(res)), ("RESTART", restart),
        ("KILL_TIMEOUT", f"{t.get('kill_timeout')}s"),
        ("AGENT", _dash(t.get("agent_id"))), ("SITE", _dash(t.get("site"))),
        ("ORIGIN", _dash(t.get("origin"))), ("GENERATION", _dash(t.get("generation"))),
        ("PID", _dash(t.get("pid"))), ("HEALTHY", _dash(t.get("healthy"))),
        ("CREATED", _when(t.get("created_at"), now)),
        ("STARTED", _when(t.get("started_at"), now)),
        ("FINISHED", _when(t.get("finished_at"), now)),
    ])
    return 0


def tasks_history(client: Client, args: argparse.Namespace) -> int:
    answer = client.get(_task_path(args.id, "/history"))
    if args.json:
        _print_json(answer)
        return 0
    now = time.time()
    _table(["WHEN", "STATE", "EXIT", "RESTARTS", "REASON"],
           [[_when(e["ts"], now), e["state"], _dash(e.get("exit_code")),
             _dash(e.get("restarts")), _dash(e.get("reason"))] for e in answer["items"]])
    return 0


def tasks_kill(client: Client, args: argparse.Namespace) -> int:
    status, task = client.call("DELETE", _task_path(args.id))
    if args.json:
        _print_json(task)
    elif status == 202:
        print(f"{task['id']}  stopping (the node is killing it)")
    else:
        print(f"{task['id']}  {task['state']}  {_dash(task.get('reason'))}")
    return 0


def tasks_logs(client: Client, args: argparse.Namespace) -> int:
    query: dict[str, Any] = {"stream": "stderr" if args.stderr else "stdout"}
    if args.tail is not None:
        query["tail"] = args.tail
    timeout: float | None = client.timeout
    if args.follow:
        # Check task and node with the normal timeout first: a quiet task may then stay silent
        # for hours, so the follow request itself must have no read timeout.
        client.get(_task_path(args.id))
        query["follow"] = "true"
        timeout = None
    out = sys.stdout.buffer
    for line in client.lines(_task_path(args.id, "/logs"), query, timeout=timeout):
        out.write(line)
        if args.follow:
            out.flush()
    out.flush()
    return 0


def agents_revoke(client: Client, args: argparse.Namespace) -> int:
    """Distrust an agent for good (admin token, at the core; an edge answers 409)."""
    agent = client.call("POST", f"/v1/agents/{quote(args.id, safe='')}/revoke")[1]
    if args.json:
        _print_json(agent)
    else:
        print(f"{agent['id']}  {agent['status']}  {agent['name']}  {agent['site']}")
    return 0


def agents_ls(client: Client, args: argparse.Namespace) -> int:
    page = _pages(client, "/v1/agents", {}, every=True)
    if args.json:
        _print_json(page)
        return 0
    now = time.time()

    def used(a: dict[str, Any], key: str) -> str:
        return f"{(a.get('used') or {}).get(key, 0):g}/{(a.get('resources') or {}).get(key, 0):g}"

    _table(["ID", "NAME", "SITE", "STATUS", "CPUS", "MEM_MB", "VERSION", "ISOLATION", "SEEN"],
           [[a["id"], a["name"], a["site"], a["status"], used(a, "cpus"), used(a, "mem_mb"),
             _dash(a.get("version")), _dash(a.get("isolation")),
             _age(a.get("last_seen"), now)] for a in page["items"]])
    return 0


def offers_ls(client: Client, args: argparse.Namespace) -> int:
    page = client.get("/v1/offers")  # offers are not paged: one current offer per agent
    if args.json:
        _print_json(page)
        return 0
    now = time.time()
    _table(["AGENT", "SITE", "CPUS", "MEM_MB", "DISK_MB", "LABELS", "EXPIRES"],
           [[o["agent_id"], _dash(o.get("site")), f"{o['cpus']:g}", str(o["mem_mb"]),
             _dash(o.get("disk_mb")), _pairs(o.get("labels")),
             f"in {_duration(o['expires_at'] - now)}" if o.get("expires_at") else "-"]
            for o in page["items"]])
    return 0


def info(client: Client, args: argparse.Namespace) -> int:
    data = client.get("/v1/info")
    if args.json:
        _print_json(data)
        return 0
    now = time.time()
    _fields([(k.upper(), _pairs(v) if isinstance(v, dict)
              else _when(v, now) if k.endswith("_at") else _dash(v)) for k, v in data.items()])
    return 0


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One server-sent event: ``id`` (None if the server sent none), ``kind``, raw ``data``."""

    id: int | None
    kind: str
    data: str


def parse_sse(lines: Iterator[bytes]) -> Iterator[SseEvent]:
    """Events from an ``text/event-stream`` body; comments (keepalives) and ``retry`` skipped."""
    ident: int | None = None
    kind, data = "message", list[str]()
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield SseEvent(ident, kind, "\n".join(data))
            kind, data = "message", []
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id":
            ident = int(value) if value.isdigit() else ident
        elif field == "event":
            kind = value
        elif field == "data":
            data.append(value)


def _summary(kind: str, data: Any) -> str:
    if kind == "task" and isinstance(data, dict):
        text = f"{str(data.get('id'))[:12]}  {data.get('name')}  {data.get('state')}"
        if data.get("exit_code") is not None:
            text += f"  exit {data['exit_code']}"
        return text + (f"  ({data['reason']})" if data.get("reason") else "")
    if kind == "agent" and isinstance(data, dict):
        return f"{data.get('id')}  {data.get('name')}  {data.get('status')}"
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
                line = f"{_dash(ev.id):>6}  {ev.kind:<8}  {_summary(ev.kind, data)}"
            print(line, flush=True)
    except Unreachable as err:
        raise Unreachable(f"{err}{_resume_hint(last)}") from None
    raise Unreachable(f"the event stream from {client.url} ended{_resume_hint(last)}")


def _resume_hint(last: int | None) -> str:
    return "" if last is None else f"; resume with: outpost events --after {last}"


# ---------------------------------------------------------------- arguments


class _Parser(ArgParser):
    """Usage errors as one line (exit 2), like every other error of this command; no
    abbreviated options (``--cpu`` is not ``--cpus``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected K=V, got {text!r}")
    return key, value


def _number(kind: Callable[[str], Any], low: float, strict: bool = False) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}: {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Options accepted before or after the subcommand (``outpost tasks ls --json``)."""
    default: Any = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    parser.add_argument("--url", default=default(None),
                        help="node API address, e.g. http://127.0.0.1:7070 (env OUTPOST_URL)")
    parser.add_argument("--token", default=default(None),
                        help="bearer token (env OUTPOST_TOKEN)")
    parser.add_argument("--cacert", default=default(None), metavar="FILE",
                        help="CA certificate (PEM) to trust for an https:// node signed by a "
                        "private CA (env OUTPOST_CACERT)")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the API's JSON instead of a table")
    parser.add_argument("--timeout", type=_number(float, 0, strict=True),
                        default=default(10.0), help="seconds to wait for an answer (10)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="outpost", description="Talk to an Outpost node (edge or core).",
                epilog="Exit status: 0 ok, 1 API error, 2 usage error, 3 node unreachable.")
    _common(p, top=True)
    nouns = p.add_subparsers(dest="noun", metavar="{tasks,agents,offers,events,info}",
                             required=True)

    def leaf(parent: Any, name: str, func: Callable[..., int], text: str,
             **kw: Any) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=text, description=text, **kw)
        _common(sub, top=False)
        sub.set_defaults(func=func)
        return sub

    tasks = nouns.add_parser("tasks", help="run, list, inspect, kill tasks and read their logs")
    verbs = tasks.add_subparsers(dest="verb", metavar="{run,ls,get,history,kill,logs}",
                                 required=True)
    run = leaf(verbs, "run", tasks_run, "submit a task; prints its id",
               usage="%(prog)s [options] NAME -- CMD [ARGS...]")
    run.add_argument("name", help="task name: a-z 0-9 _ . -")
    run.add_argument("--cpus", type=_number(float, 0, strict=True))
    run.add_argument("--mem-mb", type=_number(int, 1))
    run.add_argument("--disk-mb", type=_number(int, 0))
    run.add_argument("--restart", choices=["never", "on-failure", "always"])
    run.add_argument("--max-restarts", type=_number(int, 0), help="no cap if not given")
    run.add_argument("--env", type=_key_value, action="append", default=[], metavar="K=V")
    run.add_argument("--label", type=_key_value, action="append", default=[], metavar="K=V")
    run.add_argument("--kill-timeout", type=_number(float, 0), metavar="S",
                     help="seconds between SIGTERM and SIGKILL")
    ls = leaf(verbs, "ls", tasks_ls, "list tasks")
    ls.add_argument("--state", action="append", help="e.g. running or running,pending")
    ls.add_argument("--label", type=_key_value, metavar="K=V")
    ls.add_argument("--name")
    ls.add_argument("--limit", type=_number(int, 1), help="page size (the node's default: 100)")
    ls.add_argument("--all", action="store_true", help="follow next_cursor through every page")
    for verb, func, text in (("get", tasks_get, "show one task"),
                             ("history", tasks_history, "a task's state changes, oldest first"),
                             ("kill", tasks_kill, "kill a task")):
        leaf(verbs, verb, func, text).add_argument("id", help="task id or a unique prefix (6+)")
    logs = leaf(verbs, "logs", tasks_logs, "print a task's output")
    logs.add_argument("id", help="task id or a unique prefix (6+)")
    logs.add_argument("-f", "--follow", action="store_true", help="stream until the task ends")
    logs.add_argument("--tail", type=_number(int, 0), metavar="N", help="last N lines (100)")
    logs.add_argument("--stderr", action="store_true", help="stderr instead of stdout")

    for noun, func, text in (("agents", agents_ls, "list agents"),
                             ("offers", offers_ls, "list free resources offered by agents")):
        verbs = nouns.add_parser(noun, help=text).add_subparsers(
            dest="verb", metavar="{ls,revoke}" if noun == "agents" else "{ls}", required=True)
        leaf(verbs, "ls", func, text)
        if noun == "agents":
            leaf(verbs, "revoke", agents_revoke, "revoke an agent for good: the core rejects "
                 "its events and places nothing on it (admin token)").add_argument(
                "id", help="the agent's id")
    ev = leaf(nouns, "events", events, "print events as they happen, until Ctrl-C "
              "(with --json: one JSON object per line)")
    ev.add_argument("--after", type=_number(int, 0), metavar="N",
                    help="replay from after event N (default: only new events)")
    leaf(nouns, "info", info, "role, version and identity of the node")
    return p


def _split_argv(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Options, and the task's command after ``--`` (kept verbatim, dashes and all)."""
    options, command = argv, None
    if "--" in argv:
        i = argv.index("--")
        options, command = argv[:i], argv[i + 1:]
    # Tokens are URL-safe base64 and may start with "-", which argparse would take for an
    # option; ``--token VALUE`` always means VALUE is the token.
    glued: list[str] = []
    for arg in options:
        if glued[-1:] == ["--token"]:
            glued[-1] = f"--token={arg}"
        else:
            glued.append(arg)
    return glued, command


def _check_url(url: str | None) -> str:
    if not url:
        raise UsageError("no node address: pass --url URL or set OUTPOST_URL")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise UsageError(f"--url: bad port in {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url: expected http(s)://HOST:PORT, got {url!r}")
    return url.rstrip("/")


def _tls_context(cacert: str | None) -> ssl.SSLContext | None:
    """A context trusting only ``cacert`` (a private CA); None: urllib's default (system CAs)."""
    if not cacert:
        return None
    try:
        return ssl.create_default_context(cafile=cacert)
    except (OSError, ssl.SSLError) as err:
        raise UsageError(f"--cacert: cannot load {cacert}: {_reason(err)}") from None


def main(argv: list[str] | None = None) -> int:
    # A shell starts a background job with SIGINT ignored and Python then keeps it ignored:
    # `kill -INT` would not stop `logs -f` or `events`. Ctrl-C means stop, however we started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    options, command = _split_argv(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(options)
    except SystemExit as exc:  # --help (0) or a usage error already printed (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    url = "the node"
    try:
        if command is not None and args.func is not tasks_run:
            raise UsageError("only 'tasks run' takes a command after --")
        args.argv = command or []
        token = args.token if args.token is not None else os.environ.get("OUTPOST_TOKEN")
        url = _check_url(args.url or os.environ.get("OUTPOST_URL"))
        client = Client(url, token or None, args.timeout,
                        _tls_context(args.cacert or os.environ.get("OUTPOST_CACERT")))
        return int(args.func(client, args))
    except CliError as err:
        print(f"outpost: {err}", file=sys.stderr)
        return err.exit_code
    except (KeyError, TypeError, AttributeError) as err:
        # JSON of another shape: --url points at something that is not a compatible node.
        print(f"outpost: unexpected answer from {url} ({type(err).__name__}: {err}); "
              "is it an Outpost node of a compatible version?", file=sys.stderr)
        return EXIT_API
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader (| head) went away: stop quietly, and keep Python's exit-time flush of
        # stdout from complaining about the same closed pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE


if __name__ == "__main__":
    sys.exit(main())
