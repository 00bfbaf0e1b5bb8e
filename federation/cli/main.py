"""``outpost``'s arguments and entry point: parse, build the client, run one command, map
every failure to one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import sys
from collections.abc import Callable
from typing import Any, NoReturn
from urllib.parse import urlsplit

from federation.cli import api, artifacts, fleet, services, tasks
from federation.cli.api import (
    EXIT_API,
    EXIT_INTERRUPTED,
    EXIT_PIPE,
    EXIT_USAGE,
    Client,
    CliError,
    UsageError,
)
from federation.config import ArgParser


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


def _selector(text: str) -> dict[str, Any]:
    """``K=V`` (equals), ``K=V1,V2`` (one of), ``K!=V`` (none of), ``K`` (has the label)."""
    key, sep, value = text.partition("=")
    negated = key.endswith("!")
    key = key.rstrip("!")
    if not key or (sep and not value):
        raise argparse.ArgumentTypeError(f"expected K=V, K=V1,V2, K!=V or K, got {text!r}")
    if not sep:
        return {"key": key, "op": "exists", "values": []}
    values = [v for v in value.split(",") if v]
    op = "not_in" if negated else "eq" if len(values) == 1 else "in"
    return {"key": key, "op": op, "values": values}


def _mount(text: str) -> dict[str, Any]:
    """``SRC:DST[:ro]``: SRC inside the task's sandbox, DST inside the container."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1] or (
            len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise argparse.ArgumentTypeError(f"{text!r}: expected SRC:DST or SRC:DST:ro")
    return {"source": parts[0], "destination": parts[1],
            "read_only": len(parts) == 3 and parts[2] == "ro"}


def _task_options(p: argparse.ArgumentParser) -> None:
    """What an instance runs with: ``tasks run``, ``services run`` and ``services update``."""
    p.add_argument("--cpus", type=_number(float, 0, strict=True))
    p.add_argument("--mem-mb", type=_number(int, 1))
    p.add_argument("--disk-mb", type=_number(int, 0))
    p.add_argument("--restart", choices=["never", "on-failure", "always"])
    p.add_argument("--max-restarts", type=_number(int, 0), help="no cap if not given")
    p.add_argument("--env", type=_key_value, action="append", default=[], metavar="K=V")
    p.add_argument("--label", type=_key_value, action="append", default=[], metavar="K=V")
    p.add_argument("--kill-timeout", type=_number(float, 0), metavar="S",
                   help="seconds between SIGTERM and SIGKILL")
    box = p.add_argument_group("containers (driver oci)")
    box.add_argument("--image", metavar="IMAGE",
                     help="run in a container of this OCI image: an artifact as NAME:VERSION "
                     "or sha256:DIGEST, or a path on the agent (oci-archive or docker-save "
                     "tarball, or a layout)")
    box.add_argument("--network", choices=["none", "host"],
                     help="the container's network (default none: loopback only)")
    box.add_argument("--user", metavar="UID[:GID]", help="who runs inside the container")
    box.add_argument("--writable-root", action="store_true", default=None,
                     help="a writable copy of the image's root (default read-only)")
    box.add_argument("--mount", type=_mount, action="append", default=[],
                     metavar="SRC:DST[:ro]", help="a sandbox directory into the container")


def _placement_options(p: argparse.ArgumentParser, *, service: bool = False) -> None:
    """Where the core places it (an edge runs it where it is)."""
    p.add_argument("--site", help="only on agents of this site")
    p.add_argument("--label-constraint", type=_selector, action="append", default=[],
                   metavar="K=V", help="only on agents labelled so (K=V, K=V1,V2, K!=V, K); "
                   "repeatable, all must hold")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--spread", dest="strategy", action="store_const", const="spread",
                     help="the least loaded agent first (the default)")
    how.add_argument("--binpack", dest="strategy", action="store_const", const="binpack",
                     help="the fullest agent that fits first")
    if service:
        p.add_argument("--unique", choices=["agent", "site"],
                       help="at most one instance per agent or per site")


def _services_parser(nouns: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    svc = nouns.add_parser("services", help="keep N instances of a task running (core)")
    verbs = svc.add_subparsers(dest="verb", required=True,
                               metavar="{ls,get,run,scale,update,rm,rollout}")
    leaf(verbs, "ls", services.services_ls, "list services")
    leaf(verbs, "get", services.services_get, "show one service").add_argument("name")
    run = leaf(verbs, "run", services.services_run, "create a service",
               usage="%(prog)s NAME --instances N [options] -- CMD [ARGS...]")
    run.add_argument("name", help="service name: a-z 0-9 _ . -")
    run.add_argument("--instances", type=_number(int, 0), required=True)
    run.set_defaults(takes_command=True)
    _task_options(run)
    _placement_options(run, service=True)
    scale = leaf(verbs, "scale", services.services_scale, "change how many instances run")
    scale.add_argument("name")
    scale.add_argument("instances", type=_number(int, 0))
    update = leaf(verbs, "update", services.services_update,
                  "change the task (rolls out) or its placement; the rest stays",
                  usage="%(prog)s NAME [options] [-- CMD [ARGS...]]")
    update.add_argument("name")
    update.set_defaults(takes_command=True)
    _task_options(update)
    _placement_options(update, service=True)
    leaf(verbs, "rm", services.services_rm, "stop every instance and forget the service"
         ).add_argument("name")
    rollout = verbs.add_parser("rollout", help="a service's rollout").add_subparsers(
        dest="what", required=True, metavar="{status}")
    leaf(rollout, "status", services.rollout_status,
         "revision, rollout state and why it stopped").add_argument("name")


def _artifacts_parser(nouns: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    art = nouns.add_parser("artifacts", help="push, list, fetch and remove artifacts")
    verbs = art.add_subparsers(dest="verb", required=True, metavar="{push,ls,get,rm,stage}")
    push = leaf(verbs, "push", artifacts.artifacts_push, "upload a file; prints its digest")
    push.add_argument("file")
    push.add_argument("--name", required=True)
    push.add_argument("--version", required=True)
    push.add_argument("--label", action="append", type=_key_value, metavar="K=V")
    leaf(verbs, "ls", artifacts.artifacts_ls, "list artifacts").add_argument("--name")
    get = leaf(verbs, "get", artifacts.artifacts_get,
               "show an artifact, or with -o save its content ('-o -': stdout)")
    get.add_argument("digest", help="sha256:<hex>")
    get.add_argument("-o", "--output", metavar="FILE")
    leaf(verbs, "rm", artifacts.artifacts_rm, "remove an artifact (409 while a task uses it)"
         ).add_argument("digest", help="sha256:<hex>")
    stage = leaf(verbs, "stage", artifacts.artifacts_stage,
                 "fetch an artifact ahead of use on the agents a selector picks")
    stage.add_argument("digest", help="sha256:<hex>")
    stage.add_argument("--site")
    stage.add_argument("--label", action="append", type=_key_value, metavar="K=V")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="outpost", description="Talk to an Outpost node (edge or core).",
                epilog="Exit status: 0 ok, 1 API error, 2 usage error, 3 node unreachable.")
    _common(p, top=True)
    nouns = p.add_subparsers(
        dest="noun", metavar="{tasks,services,artifacts,agents,offers,events,info}",
        required=True)

    def leaf(parent: Any, name: str, func: Callable[..., int], text: str,
             **kw: Any) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=text, description=text, **kw)
        _common(sub, top=False)
        sub.set_defaults(func=func)
        return sub

    tasks_p = nouns.add_parser("tasks", help="run, list, inspect, kill tasks and read their logs")
    verbs = tasks_p.add_subparsers(dest="verb", metavar="{run,ls,get,history,kill,logs}",
                                   required=True)
    run = leaf(verbs, "run", tasks.tasks_run, "submit a task; prints its id",
               usage="%(prog)s [options] NAME -- CMD [ARGS...]")
    run.add_argument("name", help="task name: a-z 0-9 _ . -")
    run.set_defaults(takes_command=True)
    _task_options(run)
    _placement_options(run)
    ls = leaf(verbs, "ls", tasks.tasks_ls, "list tasks (at the core with SITE and AGENT)")
    ls.add_argument("--state", action="append", help="e.g. running or running,pending")
    ls.add_argument("--label", type=_key_value, metavar="K=V")
    ls.add_argument("--name")
    ls.add_argument("--limit", type=_number(int, 1), help="page size (the node's default: 100)")
    ls.add_argument("--all", action="store_true", help="follow next_cursor through every page")
    for verb, func, text in (("get", tasks.tasks_get, "show one task"),
                             ("history", tasks.tasks_history,
                              "a task's state changes, oldest first"),
                             ("kill", tasks.tasks_kill, "kill a task")):
        leaf(verbs, verb, func, text).add_argument("id", help="task id or a unique prefix (6+)")
    logs = leaf(verbs, "logs", tasks.tasks_logs, "print a task's output")
    logs.add_argument("id", help="task id or a unique prefix (6+)")
    logs.add_argument("-f", "--follow", action="store_true", help="stream until the task ends")
    logs.add_argument("--tail", type=_number(int, 0), metavar="N", help="last N lines (100)")
    logs.add_argument("--stderr", action="store_true", help="stderr instead of stdout")
    _services_parser(nouns, leaf)
    _artifacts_parser(nouns, leaf)

    for noun, func, text in (("agents", fleet.agents_ls, "list agents"),
                             ("offers", fleet.offers_ls, "list free resources offered by agents")):
        verbs = nouns.add_parser(noun, help=text).add_subparsers(
            dest="verb", metavar="{ls,revoke}" if noun == "agents" else "{ls}", required=True)
        leaf(verbs, "ls", func, text)
        if noun == "agents":
            leaf(verbs, "revoke", fleet.agents_revoke, "revoke an agent for good: the core rejects "
                 "its events and places nothing on it (admin token)").add_argument(
                "id", help="the agent's id")
    ev = leaf(nouns, "events", fleet.events, "print events as they happen, until Ctrl-C "
              "(with --json: one JSON object per line)")
    ev.add_argument("--after", type=_number(int, 0), metavar="N",
                    help="replay from after event N (default: only new events)")
    leaf(nouns, "info", fleet.info, "role, version and identity of the node")
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
        raise UsageError(f"--cacert: cannot load {cacert}: {api.reason(err)}") from None


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
        if command is not None and not getattr(args, "takes_command", False):
            raise UsageError("only 'tasks run', 'services run' and 'services update' take a "
                             "command after --")
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
