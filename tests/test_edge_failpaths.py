"""Issue 11, the edge: failure paths around the exactly-once path, each against real processes
(two processes on one data dir, SIGKILL between spawn and commit, loops that meet an error,
cgroups left behind, a full disk, a link that stalls while connected)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

from federation.natsd import NatsServer
from tests.helpers import ROOT, AgentProcess, HubProcess, pid_alive


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}


def test_a_second_agent_on_the_same_data_dir_exits_naming_the_holder(
        start_agent: Callable[..., AgentProcess]) -> None:
    first = start_agent()
    task = first.submit("keep", ["sleep", "60"])
    pid = first.wait_state(task["id"], "running")["pid"]
    second = subprocess.run(
        [sys.executable, "-m", "edge_agent", "--data-dir", str(first.data_dir),
         "--listen", "127.0.0.1:0", "--stop-tasks-on-exit"],
        capture_output=True, text=True, cwd=ROOT, env=_clean_env(), timeout=30)
    assert second.returncode != 0
    assert f"in use by another agent (pid {first.proc.pid})" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    # The first agent and its task are untouched.
    assert pid_alive(pid) and first.task(task["id"])["state"] == "running"
    assert (first.data_dir / "lock").read_text().strip() == str(first.proc.pid)


def test_a_second_hub_on_the_same_data_dir_exits_naming_the_holder(
        hub_proc: HubProcess, nats_proc: NatsServer) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "core_hub", "run", "--data-dir", str(hub_proc.data_dir),
         "--nats", nats_proc.url, "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, cwd=ROOT, env=_clean_env(), timeout=30)
    assert second.returncode != 0
    assert f"in use by another hub (pid {hub_proc.proc.pid})" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    assert hub_proc.api("GET", "/v1/health").status == 200
