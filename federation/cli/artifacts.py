"""``outpost artifacts``: push, list, fetch and remove artifacts, at an edge or at the core.

A push streams the file (never whole in memory) with a progress bar on stderr for files of
a megabyte or more; ``get`` streams the content to a file (or stdout).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode

from federation.cli import output as out
from federation.cli.api import Client, CliError, Unreachable, UsageError, reason

BAR_FROM_BYTES = 1 << 20
PIECE = 1 << 20


class _Progress:
    """A file reader that draws ``[#####     ]  42%  12.0 of 28.5 MB`` on stderr."""

    def __init__(self, fh: IO[bytes], size: int, label: str, show: bool) -> None:
        self.fh, self.size, self.label, self.show = fh, size, label, show
        self.sent, self.drawn = 0, 0.0

    def read(self, n: int = -1) -> bytes:
        piece = self.fh.read(PIECE if n is None or n < 0 else max(n, PIECE))
        self.sent += len(piece)
        now = time.monotonic()
        if self.show and (now - self.drawn > 0.2 or not piece):
            self.drawn = now
            frac = self.sent / self.size if self.size else 1.0
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac:4.0%}  "
                             f"{self.sent / 1e6:.1f} of {self.size / 1e6:.1f} MB")
            if not piece:
                sys.stderr.write("\n")
            sys.stderr.flush()
        return piece


def _digest(text: str) -> str:
    hexpart = text.removeprefix("sha256:")
    if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise UsageError(f"not a digest: {text!r} (expected sha256:<64 hex digits>)")
    return f"sha256:{hexpart}"


def _request(client: Client, method: str, path: str, data: Any = None,
             headers: dict[str, str] | None = None,
             timeout: float | None = None) -> http.client.HTTPResponse:
    req = urllib.request.Request(client.url + path, data=data, method=method,
                                 headers=headers or {})
    if client.token:
        req.add_header("Authorization", f"Bearer {client.token}")
    try:
        resp: http.client.HTTPResponse = urllib.request.urlopen(
            req, timeout=timeout or client.timeout, context=client.context)
        return resp
    except urllib.error.HTTPError as err:
        raise client._api_error(err) from None
    except urllib.error.URLError as err:
        raise Unreachable(f"cannot reach {client.url}: {reason(err.reason)}") from None
    except (OSError, http.client.HTTPException) as err:
        raise Unreachable(f"cannot reach {client.url}: {reason(err)}") from None


def artifacts_push(client: Client, args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        size = path.stat().st_size
        fh = path.open("rb")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    query = [("name", args.name), ("version", args.version),
             *(("label", f"{k}={v}") for k, v in (args.label or []))]
    show = size >= BAR_FROM_BYTES and not args.json
    with fh:
        body = _Progress(fh, size, path.name, show)
        # A big file takes longer than one answer's timeout: allow about 1 MB/s at worst.
        with _request(client, "POST", f"/v1/artifacts?{urlencode(query)}", data=body,
                      headers={"Content-Type": "application/octet-stream",
                               "Content-Length": str(size)},
                      timeout=max(client.timeout, size / 1e6)) as resp:
            art = json.loads(resp.read())
    if args.json:
        out.print_json(art)
    else:
        print(art["digest"])
    return 0


def artifacts_ls(client: Client, args: argparse.Namespace) -> int:
    query: dict[str, Any] = {"limit": 1000}
    if args.name:
        query["name"] = args.name
    page = client.get("/v1/artifacts", query)
    if args.json:
        out.print_json(page)
        return 0
    out.table(["DIGEST", "NAME", "VERSION", "SIZE", "ORIGIN"],
              [[a["digest"][:19], a["name"], a["version"], str(a["size"]),
                str(a.get("origin", "-"))] for a in page["items"]])
    return 0


def artifacts_get(client: Client, args: argparse.Namespace) -> int:
    digest = _digest(args.digest)
    if not args.output:
        meta = client.get(f"/v1/artifacts/{digest}")
        out.print_json(meta)
        return 0
    target = Path(args.output)
    tmp = target.with_name(target.name + ".part")
    with _request(client, "GET", f"/v1/artifacts/{digest}/content",
                  timeout=max(client.timeout, 300.0)) as resp:
        if str(target) == "-":
            while piece := resp.read(PIECE):
                sys.stdout.buffer.write(piece)
            return 0
        with tmp.open("wb") as fh:
            while piece := resp.read(PIECE):
                fh.write(piece)
    os.replace(tmp, target)
    print(f"{digest} -> {target}")
    return 0


def artifacts_rm(client: Client, args: argparse.Namespace) -> int:
    digest = _digest(args.digest)
    _, body = client.call("DELETE", f"/v1/artifacts/{digest}")
    if args.json:
        out.print_json(body)
    else:
        print(f"removed {digest}")
    return 0


def artifacts_stage(client: Client, args: argparse.Namespace) -> int:
    digest = _digest(args.digest)
    selector: dict[str, Any] = {}
    if args.site:
        selector["site"] = args.site
    if args.label:
        selector["labels"] = dict(args.label)
    _, body = client.call("POST", f"/v1/artifacts/{digest}/stage", body=selector)
    if args.json:
        out.print_json(body)
    else:
        agents = body.get("agents")
        print(f"staging {digest}" + (f" on {len(agents)} agents" if agents is not None else ""))
    return 0
