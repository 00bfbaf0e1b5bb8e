"""``make demo`` end to end: it starts, the sample tasks run, Ctrl-C stops everything."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT, http, pid_alive, wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_starts_an_agent_with_samples_and_stops_cleanly(tmp_path: Path) -> None:
    port = _free_port()
    demo = subprocess.Popen([sys.executable, "-m", "edge_agent.demo", "--dir", str(tmp_path),
                             "--listen", f"127.0.0.1:{port}", "--web-port", str(_free_port())],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = []
        for line in demo.stdout:  # type: ignore[union-attr]
            out.append(line)
            if line.strip() == "ready":
                break
        text = "".join(out)
        assert f"http://127.0.0.1:{port}" in text and "OUTPOST_TOKEN=" in text, text
        token = text.split("OUTPOST_TOKEN=")[1].split()[0]
        url = f"http://127.0.0.1:{port}"

        def running() -> list[dict]:
            items = http("GET", url + "/v1/tasks", token=token).body["items"]
            up = [t for t in items if t["state"] == "running" and t["name"] != "hello"]
            return up if {t["name"] for t in up} == {"web", "ticker"} else []

        tasks = wait_until(running, timeout=15, what="web (health-checked) and ticker running")
        pids = [t["pid"] for t in tasks]
        page = http("GET", url + "/")
        assert page.status == 200 and b"Outpost edge agent" in page.raw
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0
        assert not any(pid_alive(p) for p in pids), "Ctrl-C stops the tasks it started"
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
            demo.wait(30)
        demo.stdout.close()  # type: ignore[union-attr]
