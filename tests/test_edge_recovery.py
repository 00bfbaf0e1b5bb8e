"""Crash recovery and offline reboot of a real edge agent (SIGKILL, real task processes)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable

from tests.helpers import AgentProcess, kill_group, pid_alive, wait_until


def test_sigkilled_agent_readopts_live_tasks_without_starting_duplicates(
        start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent()
    tasks = [agent.submit(f"svc{i}", ["sleep", "60"], restart={"policy": "always"},
                          kill_timeout=1) for i in range(3)]
    pids = {t["id"]: agent.wait_state(t["id"], "running")["pid"] for t in tasks}
    agent.kill()
    assert all(pid_alive(p) for p in pids.values()), "tasks outlive the agent"
    agent.start()
    for task_id, pid in pids.items():
        now = agent.task(task_id)
        assert now["state"] == "running" and now["pid"] == pid and now["restarts"] == 0
    spawned = agent.api("GET", "/metrics").raw.decode()
    assert "outpost_task_spawns_total 0.0" in spawned, "no task was started again"
    # The re-adopted processes are still supervised: kill works, exit is noticed.
    first = tasks[0]["id"]
    assert agent.api("DELETE", f"/v1/tasks/{first}").status == 202
    agent.wait_state(first, "killed")
    assert not pid_alive(pids[first])


def test_exit_codes_of_tasks_that_ended_while_the_agent_was_down(
        start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent()
    gate = agent.data_dir / "gate"
    ok = agent.submit("ok", ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done; exit 0"])
    bad = agent.submit("bad", ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done; exit 7"])
    retry = agent.submit("retry", ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done; "
                                               "exit 4"],
                         restart={"policy": "on-failure", "max": 1, "backoff": 0.1})
    for t in (ok, bad, retry):
        agent.wait_state(t["id"], "running")
    agent.kill()
    gate.touch()
    time.sleep(0.5)  # all three exit while no agent runs
    agent.start()
    assert agent.wait_state(ok["id"], "finished")["exit_code"] == 0
    bad_now = agent.wait_state(bad["id"], "failed")
    assert bad_now["exit_code"] == 7 and "while the agent was down" in bad_now["reason"]
    # The restart policy resumes: 'retry' runs once more (and fails again, since the gate exists).
    wait_until(lambda: agent.task(retry["id"])["restarts"] == 1 and
               agent.task(retry["id"])["state"] == "failed", timeout=10, what="one restart")
    assert agent.task(retry["id"])["exit_code"] == 4


def test_a_reused_pid_is_never_adopted(start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent()
    task = agent.submit("victim", ["sleep", "60"], restart={"policy": "never"}, kill_timeout=1)
    pid = agent.wait_state(task["id"], "running")["pid"]
    agent.kill()
    kill_group(pid)
    # Some unrelated process now holds the pid the store remembers (as after pid reuse).
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        db = sqlite3.connect(agent.data_dir / "agent.db")
        db.execute("UPDATE tasks SET pid = ? WHERE id = ?", (stranger.pid, task["id"]))
        db.commit()
        db.close()
        agent.start()
        now = agent.wait_state(task["id"], "lost", "failed")
        assert now["pid"] is None
        assert stranger.poll() is None, "the stranger was not adopted, signalled or killed"
    finally:
        stranger.kill()
        stranger.wait()


def test_offline_reboot_brings_services_back(start_agent: Callable[..., AgentProcess]) -> None:
    """Headline: host 'reboot' (agent and every task process gone), agent restarts, no network:
    every service whose policy says so runs again within seconds; one-shot tasks do not."""
    agent = start_agent()
    services = [agent.submit(f"svc{i}", ["sleep", "60"], restart={"policy": "always"},
                             resources={"cpus": 0.05, "mem_mb": 8}, kill_timeout=1)
                for i in range(20)]
    oneshot = agent.submit("job", ["sleep", "60"], restart={"policy": "never"}, kill_timeout=1)
    old = {t["id"]: agent.wait_state(t["id"], "running")["pid"] for t in [*services, oneshot]}
    agent.kill()
    for pid in old.values():
        os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: not any(pid_alive(p) for p in old.values()), what="all tasks dead")
    t0 = time.monotonic()
    agent.start()
    for t in services:
        now = agent.wait_state(t["id"], "running", timeout=10)
        assert now["pid"] != old[t["id"]] and now["restarts"] == 1
    elapsed = time.monotonic() - t0
    assert elapsed < 5.0, f"20 services back in {elapsed:.2f}s"
    gone = agent.task(oneshot["id"])
    assert gone["state"] in ("lost", "failed") and gone["restarts"] == 0


def test_clean_stop_leaves_tasks_running(start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent()
    agent.args.remove("--stop-tasks-on-exit")
    agent.stop()
    agent.start()
    task = agent.submit("keeper", ["sleep", "60"], kill_timeout=1)
    pid = agent.wait_state(task["id"], "running")["pid"]
    assert agent.stop() == 0
    assert pid_alive(pid), "SIGTERM without --stop-tasks-on-exit leaves tasks running"
    agent.start()
    assert agent.task(task["id"])["pid"] == pid
    agent.stop()
    agent.args.append("--stop-tasks-on-exit")
    agent.start()
    assert agent.task(task["id"])["pid"] == pid
    agent.stop()
    assert not pid_alive(pid), "with --stop-tasks-on-exit the agent stops its tasks"
    agent.start()
    assert agent.task(task["id"])["state"] == "killed"
