"""``make demo`` / ``outpost-hub demo``: a small fleet on this machine.

Starts, as child processes, a hub with an embedded NATS (JetStream) and two edge agents in two
sites that enroll with it; submits sample tasks at the edges and a two-instance service at
the core; prints the hub's URL, the tokens
and ready ``outpost`` commands. Ctrl-C stops what it started, and nothing else. Data lives in
``.demo/`` so a second run finds the same fleet.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SITES = (("edge-berlin", "berlin", "zone=store"), ("edge-oslo", "oslo", "zone=tower"))


def samples(web_port: int) -> list[dict[str, Any]]:
    """A health-checked web service, a chatty service and a one-shot job."""
    probe = f"import urllib.request as u; u.urlopen('http://127.0.0.1:{web_port}/')"
    return [
        {"name": "web", "command": [sys.executable, "-m", "http.server", str(web_port),
                                    "--bind", "127.0.0.1"],
         "restart": {"policy": "always", "backoff": 1},
         "resources": {"cpus": 0.2, "mem_mb": 64},
         "health": {"command": [sys.executable, "-c", probe], "interval": 5, "timeout": 2,
                    "retries": 3, "grace": 1},
         "labels": {"tier": "web"}, "kill_timeout": 3},
        {"name": "ticker", "command": ["sh", "-c", "while true; do date; sleep 2; done"],
         "restart": {"policy": "always"}, "resources": {"cpus": 0.05, "mem_mb": 8},
         "labels": {"tier": "batch"}, "kill_timeout": 2},
        {"name": "hello", "command": ["sh", "-c", "echo hello from the edge; exit 0"],
         "resources": {"cpus": 0.05, "mem_mb": 8}},
    ]


def _call(url: str, token: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(url + path, method="POST" if body is not None else "GET",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _wait_for_offers(url: str, token: str, count: int, timeout_s: float = 30.0) -> None:
    """Until ``count`` agents have an offer at the hub (or ``timeout_s``: place anyway)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(_call(url, token, "/v1/offers")["items"]) >= count:
            return
        time.sleep(0.2)


@dataclass
class Child:
    """One demo process: how to start it again, and its restarts so far."""

    name: str
    args: list[str]
    ready_file: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)


def _why(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class Demo:
    """Owns the child processes: restarts one that dies (saying which and why), and ends them
    in reverse order on ``stop()``."""

    MAX_RESTARTS = 5  # within RESTART_WINDOW_S; then it stays down and the demo says so
    RESTART_WINDOW_S = 60.0

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.children: list[Child] = []

    def spawn(self, name: str, args: list[str], ready_file: Path) -> None:
        child = Child(name, args, ready_file)
        self.children.append(child)
        self._start(child)

    def _start(self, child: Child) -> None:
        child.ready_file.unlink(missing_ok=True)
        log = open(self.root / f"{child.name}.log", "ab")  # noqa: SIM115
        child.proc = subprocess.Popen([sys.executable, *child.args], stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while not child.ready_file.exists():
            if child.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{child.name} did not start; see "
                                   f"{self.root / child.name}.log")
            time.sleep(0.1)

    def watch(self) -> None:
        """One look at every child: one that died is reported and started again."""
        for child in self.children:
            if child.proc is None or child.proc.poll() is None:
                continue
            code, child.proc = child.proc.returncode, None
            now = time.monotonic()
            child.restarts = [t for t in child.restarts if now - t < self.RESTART_WINDOW_S]
            log = self.root / f"{child.name}.log"
            if len(child.restarts) >= self.MAX_RESTARTS:
                print(f"outpost demo: {child.name} {_why(code)} again; it died "
                      f"{self.MAX_RESTARTS} times in a minute, so it stays down (see {log}). "
                      f"Start it by hand: {shlex.join([sys.executable, *child.args])}",
                      flush=True)
                continue
            child.restarts.append(now)
            print(f"outpost demo: {child.name} {_why(code)}; the rest keeps running. "
                  f"Restarting it (an agent re-adopts its tasks); its log: {log}", flush=True)
            try:
                self._start(child)
            except RuntimeError as exc:
                print(f"outpost demo: {exc}", flush=True)
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.kill()
                    child.proc.wait()
                child.proc = None
                continue
            print(f"outpost demo: {child.name} is back", flush=True)

    def stop(self) -> None:
        procs = [c.proc for c in reversed(self.children) if c.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="outpost-hub demo", allow_abbrev=False)
    p.add_argument("--dir", type=Path, default=Path(".demo"))
    p.add_argument("--listen", default="127.0.0.1:7000", help="the hub's API")
    p.add_argument("--nats-port", type=int, default=4222)
    p.add_argument("--web-port", type=int, default=7080, help="port of the sample web task")
    p.add_argument("--edge-port", type=int, default=7071,
                   help="API port of the first edge (the next one: +1); the same every run")
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    demo = Demo(args.dir)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        hub_dir = demo.root / "hub"
        demo.spawn("hub", ["-m", "core_hub", "run", "--data-dir", str(hub_dir), "--listen",
                           args.listen, "--embedded-nats", "--nats-port", str(args.nats_port)],
                   hub_dir / "hub.url")
        hub_url = (hub_dir / "hub.url").read_text()
        nats_url = (hub_dir / "nats.url").read_text()
        hub_token = (hub_dir / "admin.token").read_text().strip()
        join = subprocess.run([sys.executable, "-m", "core_hub", "token", "create",
                               "--data-dir", str(hub_dir), "--uses", "2"],
                              capture_output=True, text=True, check=True).stdout.strip()
        edges = []
        for i, (name, site, label) in enumerate(SITES):
            data = demo.root / name
            listen = f"127.0.0.1:{args.edge_port + i}"  # fixed: the same URL every run
            demo.spawn(name, ["-m", "edge_agent", "--data-dir", str(data), "--listen", listen,
                              "--name", name, "--site", site, "--label", label,
                              "--stop-tasks-on-exit", "--nats", nats_url, "--join-token", join],
                       data / "agent.url")
            url, token = (data / "agent.url").read_text(), (data / "admin.token").read_text()
            running = {t["name"] for t in _call(url, token.strip(), "/v1/tasks")["items"]
                       if t["state"] not in ("finished", "failed", "killed", "lost")}
            for spec in samples(args.web_port + i):
                if spec["name"] not in running:
                    _call(url, token.strip(), "/v1/tasks", spec)
            edges.append((name, url))
        # A service kept by the core: two instances, spread over the two sites, so once both
        # agents have enrolled and offered (each enrollment reloads NATS: a moment).
        _wait_for_offers(hub_url, hub_token, len(SITES))
        try:
            _call(hub_url, hub_token, "/v1/services", {
                "name": "greeter", "instances": 2,
                "task": {"command": ["sh", "-c", "while true; do echo hello from $OUTPOST_TASK_ID;"
                                                 " sleep 5; done"],
                         "resources": {"cpus": 0.05, "mem_mb": 8}, "kill_timeout": 2},
                "disconnect": {"lost_after": 30, "replace": True, "keep": "keep_original"}})
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # 409: it exists from an earlier run
                raise
        edge_lines = "\n".join(f"  edge {name:12}: {url}" for name, url in edges)
        print(f"""
Outpost demo: a hub (with embedded NATS JetStream) and two edge agents in sites berlin and oslo.

  dashboard  : {hub_url}/#token={hub_token}
  hub API    : {hub_url}
  hub token  : {hub_token}
  NATS       : {nats_url}
{edge_lines}

Try (in another shell):
  export OUTPOST_URL={hub_url} OUTPOST_TOKEN={hub_token}
  .venv/bin/outpost agents ls          # both sites, online
  .venv/bin/outpost tasks ls           # every task of the fleet, as the edges report them
  curl -H "Authorization: Bearer $OUTPOST_TOKEN" $OUTPOST_URL/v1/services   # 'greeter' x2
  .venv/bin/outpost events             # the fleet's live event feed
  .venv/bin/outpost tasks kill <id>    # a kill command, delivered even to an edge that is away

Each edge serves the same API (its token is in .demo/<edge>/admin.token).
A child that dies (try kill -9 on an agent) is reported and started again; an agent
re-adopts the tasks it left running. Ctrl-C stops the hub, the agents and their tasks.
ready""", flush=True)
        while not stop:
            demo.watch()
            time.sleep(0.2)
        return 0
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"outpost demo: {exc}", file=sys.stderr)
        return 1
    finally:
        demo.stop()
        print("outpost demo stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
