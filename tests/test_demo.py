"""``make demo`` end to end: hub, NATS and two agents start, the fleet shows at the hub,
Ctrl-C stops everything it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT, free_port, http, pid_alive, wait_until


def _ours(tmp_path: Path) -> list[str]:
    """Processes whose command line names the demo's folder (hub, nats-server, agents)."""
    out = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    return out.stdout.split()


def _agent_pid(tmp_path: Path, edge: str) -> int | None:
    out = subprocess.run(["pgrep", "-f", f"edge_agent --data-dir {tmp_path / edge} "],
                         capture_output=True, text=True).stdout.split()
    return int(out[0]) if len(out) == 1 else None


def _hub_pid(tmp_path: Path) -> int | None:
    out = subprocess.run(["pgrep", "-f", f"core_hub run --data-dir {tmp_path / 'hub'} "],
                         capture_output=True, text=True).stdout.split()
    return int(out[0]) if len(out) == 1 else None


def _two_free_ports() -> int:
    """A port P with P + 1 free too (the demo's two edges)."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def test_demo_starts_a_fleet_and_stops_cleanly(tmp_path: Path) -> None:
    port, edge_port = free_port(), _two_free_ports()
    demo = subprocess.Popen(
        [sys.executable, "-m", "core_hub", "demo", "--dir", str(tmp_path), "--listen",
         f"127.0.0.1:{port}", "--nats-port", str(free_port()), "--web-port", str(free_port()),
         "--edge-port", str(edge_port)],
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
        # Edge URLs are fixed (--edge-port), so they are the same from run to run.
        lines = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip()
                 for ln in text.splitlines() if ln.startswith("  edge ")}
        assert lines == {"edge edge-berlin": f"http://127.0.0.1:{edge_port}",
                         "edge edge-oslo": f"http://127.0.0.1:{edge_port + 1}"}, lines

        # kill -9 one agent: the demo says which and why, keeps the rest, restarts it, and the
        # restarted agent re-adopts the tasks it left running.
        hub_pid, berlin_pid = _hub_pid(tmp_path), _agent_pid(tmp_path, "edge-berlin")
        oslo_pid = _agent_pid(tmp_path, "edge-oslo")
        assert hub_pid and berlin_pid and oslo_pid
        os.kill(oslo_pid, signal.SIGKILL)
        said: list[str] = []
        for line in demo.stdout:  # type: ignore[union-attr]
            said.append(line)
            if "is back" in line:
                break
        assert any("edge-oslo killed by SIGKILL" in s for s in said), said
        assert demo.poll() is None and _hub_pid(tmp_path) == hub_pid
        assert _agent_pid(tmp_path, "edge-berlin") == berlin_pid
        new_oslo = _agent_pid(tmp_path, "edge-oslo")
        assert new_oslo and new_oslo != oslo_pid
        oslo = tmp_path / "edge-oslo"
        assert (oslo / "agent.url").read_text() == f"http://127.0.0.1:{edge_port + 1}"
        oslo_token = (oslo / "admin.token").read_text().strip()
        edge_tasks = http("GET", f"http://127.0.0.1:{edge_port + 1}/v1/tasks",
                          token=oslo_token).body["items"]
        adopted = [t["pid"] for t in edge_tasks if t["state"] == "running"]
        assert adopted and set(adopted) <= set(pids), "the same processes, re-adopted"
        demo.send_signal(signal.SIGINT)
        assert demo.wait(40) == 0
        assert not any(pid_alive(p) for p in pids), "Ctrl-C stops the tasks"
        wait_until(lambda: not _ours(tmp_path), timeout=10, what="hub, NATS, agents gone")
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
            demo.wait(40)
        demo.stdout.close()  # type: ignore[union-attr]
