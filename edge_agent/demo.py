"""``make demo``: one edge agent with sample tasks, and the commands to try against it.

Starts the agent as a child process (data in ``.demo/``), submits a small web service and a
ticker, prints the URL, the token and ready ``outpost`` commands, and on Ctrl-C stops the agent
and its tasks, and nothing else.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any


def samples(web_port: int) -> list[dict[str, Any]]:
    """A health-checked web service, a chatty service and a one-shot job."""
    return [
        {
            "name": "web",
            "command": [sys.executable, "-m", "http.server", str(web_port), "--bind", "127.0.0.1"],
            "restart": {"policy": "always", "backoff": 1},
            "resources": {"cpus": 0.2, "mem_mb": 64},
            "health": {
                "command": [
                    sys.executable,
                    "-c",
                    f"import urllib.request as u; u.urlopen('http://127.0.0.1:{web_port}/')",
                ],
                "interval": 5,
                "timeout": 2,
                "retries": 3,
                "grace": 1,
            },
            "labels": {"tier": "web"},
            "kill_timeout": 3,
        },
        {
            "name": "ticker",
            "command": ["sh", "-c", "while true; do date; sleep 2; done"],
            "restart": {"policy": "always"},
            "resources": {"cpus": 0.05, "mem_mb": 8},
            "labels": {"tier": "batch"},
            "kill_timeout": 2,
        },
        {
            "name": "hello",
            "command": ["sh", "-c", "echo hello from the edge; exit 0"],
            "resources": {"cpus": 0.05, "mem_mb": 8},
        },
    ]


def _post(url: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url + "/v1/tasks",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="outpost-demo")
    p.add_argument("--dir", type=Path, default=Path(".demo"))
    p.add_argument("--listen", default="127.0.0.1:7070")
    p.add_argument("--web-port", type=int, default=7080, help="port of the sample web task")
    args = p.parse_args(argv)
    data = (args.dir / "edge-1").resolve()
    data.mkdir(parents=True, exist_ok=True)
    (data / "agent.url").unlink(missing_ok=True)
    log = open(args.dir / "edge-1.log", "ab")  # noqa: SIM115
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "--data-dir",
            str(data),
            "--listen",
            args.listen,
            "--name",
            "edge-1",
            "--site",
            "demo",
            "--label",
            "zone=lab",
            "--stop-tasks-on-exit",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        deadline = time.monotonic() + 20
        while not (data / "agent.url").exists():
            if agent.poll() is not None or time.monotonic() > deadline or stop:
                print(
                    f"outpost demo: the agent did not start; see {args.dir}/edge-1.log",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.1)
        url = (data / "agent.url").read_text()
        token = (data / "admin.token").read_text().strip()
        existing = _list_names(url, token)
        for spec in samples(args.web_port):
            if spec["name"] not in existing:
                _post(url, token, spec)
        print(
            f"""
Outpost demo is running: one edge agent (site 'demo') with sample tasks.

  API + status page : {url}/#token={token}
  token             : {token}

Try (in another shell):
  export OUTPOST_URL={url} OUTPOST_TOKEN={token}
  .venv/bin/outpost tasks ls
  .venv/bin/outpost tasks logs -f $(.venv/bin/outpost tasks ls --name ticker --json \\
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["id"])')
  .venv/bin/outpost tasks run sleeper --restart on-failure -- sleep 30
  .venv/bin/outpost events

Ctrl-C stops the agent and its tasks.
ready""",
            flush=True,
        )
        while not stop and agent.poll() is None:
            time.sleep(0.2)
        return 0 if stop else 1
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        print("outpost demo stopped.", flush=True)


def _list_names(url: str, token: str) -> set[str]:
    req = urllib.request.Request(
        url + "/v1/tasks?limit=1000", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return {
            t["name"]
            for t in json.loads(resp.read())["items"]
            if t["state"] not in ("finished", "failed", "killed", "lost")
        }


if __name__ == "__main__":
    sys.exit(main())
