"""``make demo`` end to end: hub, NATS and two agents start, the fleet shows at the hub,
Ctrl-C stops everything it started."""

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


def _ours(tmp_path: Path) -> list[str]:
    """Processes whose command line names the demo's folder (hub, nats-server, agents)."""
    out = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    return out.stdout.split()


def test_demo_starts_a_fleet_and_stops_cleanly(tmp_path: Path) -> None:
    port = _free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "core_hub", "demo", "--dir", str(tmp_path), "--listen",
         f"127.0.0.1:{port}", "--nats-port", str(_free_port()), "--web-port", str(_free_port())],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = []
        for line in demo.stdout:  # type: ignore[union-attr]
            out.append(line)
            if line.strip() == "ready":
                break
        text = "".join(out)
        url = f"http://127.0.0.1:{port}"
        assert url in text and "OUTPOST_TOKEN=" in text, text
        token = text.split("OUTPOST_TOKEN=")[1].split()[0]
        assert f"dashboard  : {url}/#token={token}" in text, "a link that signs in at once"

        def online() -> list[dict]:
            agents = http("GET", url + "/v1/agents", token=token).body["items"]
            return agents if [a["status"] for a in agents] == ["online", "online"] else []

        agents = wait_until(online, timeout=20, what="both agents online at the hub")
        assert {a["site"] for a in agents} == {"berlin", "oslo"}

        seen: list[tuple[str, str, str]] = []

        def running() -> list[dict]:
            items = http("GET", url + "/v1/tasks?limit=100", token=token).body["items"]
            seen[:] = sorted((t["name"], t["state"], t.get("reason") or "") for t in items)
            up = [t for t in items if t["state"] == "running" and t["name"] != "hello"]
            return up if sorted(t["name"] for t in up) == ["greeter"] * 2 + [
                "ticker"] * 2 + ["web"] * 2 else []

        try:
            tasks = wait_until(running, timeout=60,
                               what="web and ticker at both sites, the greeter service x2")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; tasks at the hub: {seen}") from None
        greeters = {t["agent_id"] for t in tasks if t["name"] == "greeter"}
        assert len(greeters) == 2, "the service spreads over both sites"
        pids = [t["pid"] for t in tasks]
        assert http("GET", url + "/v1/info", token=token).body["role"] == "core"
        demo.send_signal(signal.SIGINT)
        assert demo.wait(40) == 0
        assert not any(pid_alive(p) for p in pids), "Ctrl-C stops the tasks"
        wait_until(lambda: not _ours(tmp_path), timeout=10, what="hub, NATS, agents gone")
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
            demo.wait(40)
        demo.stdout.close()  # type: ignore[union-attr]
