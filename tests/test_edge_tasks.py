"""Task lifecycle on a real edge agent: states, exit codes, restarts, health, capacity, kill."""

from __future__ import annotations

import time

from tests.helpers import AgentProcess, pid_alive, read_events, wait_until


def events_for(agent: AgentProcess, task_id: str) -> list[str]:
    """States a task went through, read from the agent's event feed (SSE) from the start."""
    states: list[str] = []
    for _, kind, body in read_events(agent.url, agent.token, after=0):
        if kind == "task" and body["id"] == task_id and (not states or states[-1] != body["state"]):
            states.append(body["state"])
    return states


def test_task_runs_to_finished_with_exit_code_and_state_history(agent: AgentProcess) -> None:
    task = agent.submit("ok", ["sh", "-c", "echo out; echo err >&2; exit 0"])
    done = agent.wait_state(task["id"], "finished")
    assert done["exit_code"] == 0
    assert done["pid"] is None and done["finished_at"] >= done["started_at"]
    assert events_for(agent, task["id"]) == ["pending", "staging", "running", "finished"]
    out = agent.api("GET", f"/v1/tasks/{task['id']}/logs").raw
    err = agent.api("GET", f"/v1/tasks/{task['id']}/logs?stream=stderr").raw
    assert out == b"out\n" and err == b"err\n"


def test_failed_task_keeps_its_exit_code(agent: AgentProcess) -> None:
    task = agent.submit("bad", ["sh", "-c", "exit 3"])
    done = agent.wait_state(task["id"], "failed")
    assert done["exit_code"] == 3 and "exit 3" in done["reason"]


def test_command_not_found_fails_with_a_reason(agent: AgentProcess) -> None:
    task = agent.submit("nope", ["no-such-binary-outpost"])
    done = agent.wait_state(task["id"], "failed")
    assert "command not found" in done["reason"]


def test_env_and_task_identity_reach_the_process(agent: AgentProcess) -> None:
    task = agent.submit("env", ["sh", "-c", 'echo "$GREETING $OUTPOST_TASK_NAME"'],
                        env={"GREETING": "hello"})
    agent.wait_state(task["id"], "finished")
    assert agent.api("GET", f"/v1/tasks/{task['id']}/logs").raw == b"hello env\n"


def test_on_failure_restarts_with_backoff_up_to_max(agent: AgentProcess) -> None:
    task = agent.submit("flaky", ["sh", "-c", "exit 1"],
                        restart={"policy": "on-failure", "max": 2, "backoff": 0.2,
                                 "max_backoff": 1})
    t0 = time.monotonic()
    done = wait_until(lambda: (t := agent.task(task["id"]))["restarts"] == 2
                      and t["state"] == "failed" and t, timeout=10, what="two restarts")
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.2 + 0.4 - 0.05, "backoff doubles: 0.2s then 0.4s"
    assert "gave up after 2 restarts" in done["reason"]
    time.sleep(0.6)
    assert agent.task(task["id"])["restarts"] == 2, "no restart past max"


def test_on_failure_does_not_restart_a_success(agent: AgentProcess) -> None:
    task = agent.submit("once", ["true"], restart={"policy": "on-failure", "backoff": 0.1})
    agent.wait_state(task["id"], "finished")
    time.sleep(0.4)
    assert agent.task(task["id"])["restarts"] == 0


def test_always_restarts_even_after_success(agent: AgentProcess) -> None:
    task = agent.submit("loop", ["true"], restart={"policy": "always", "backoff": 0.1,
                                                    "max_backoff": 0.1})
    wait_until(lambda: agent.task(task["id"])["restarts"] >= 3, timeout=10, what="3 restarts")


def test_health_check_gates_running_and_restarts_unhealthy(agent: AgentProcess) -> None:
    # Healthy while the marker file exists; the task removes it after a while.
    script = "touch ok; sleep 0.8; rm ok; sleep 30"
    task = agent.submit(
        "probed", ["sh", "-c", script],
        health={"command": ["test", "-e", "ok"], "interval": 0.2, "timeout": 0.2, "retries": 2},
        restart={"policy": "on-failure", "max": 1, "backoff": 0.1}, kill_timeout=1)
    first = agent.task(task["id"])
    assert first["state"] in ("starting", "running")
    running = agent.wait_state(task["id"], "running")
    assert running["healthy"] is True
    wait_until(lambda: agent.task(task["id"])["restarts"] == 1, timeout=10,
               what="restart after the health check failed")
    history = agent.api("GET", "/v1/tasks/" + task["id"]).body
    assert history["restarts"] == 1
    states = events_for(agent, task["id"])
    assert "failed" in states and states[:4] == ["pending", "staging", "starting", "running"]


def test_tasks_wait_for_capacity_in_submission_order(agent: AgentProcess) -> None:
    # The agent has 2 cpus: two 1-cpu sleepers fill it.
    big = [agent.submit(f"big{i}", ["sleep", "30"], resources={"cpus": 1, "mem_mb": 16},
                        kill_timeout=1) for i in range(2)]
    waiting = [agent.submit(f"wait{i}", ["sleep", "30"], resources={"cpus": 1, "mem_mb": 16},
                            kill_timeout=1) for i in range(2)]
    for t in big:
        agent.wait_state(t["id"], "running")
    for t in waiting:
        cur = agent.task(t["id"])
        assert cur["state"] == "pending" and "waiting for capacity" in cur["reason"]
        assert "cpus" in cur["reason"]
    agent.api("DELETE", f"/v1/tasks/{big[0]['id']}")
    agent.wait_state(waiting[0]["id"], "running")
    assert agent.task(waiting[1]["id"])["state"] == "pending", "second waits for the next slot"
    agent.api("DELETE", f"/v1/tasks/{big[1]['id']}")
    agent.wait_state(waiting[1]["id"], "running")


def test_task_larger_than_the_agent_is_rejected(agent: AgentProcess) -> None:
    resp = agent.api("POST", "/v1/tasks", {"name": "huge", "command": ["true"],
                                           "resources": {"cpus": 64}})
    assert resp.status == 422 and resp.body["error"]["details"]["field"] == "resources"


def test_kill_escalates_to_sigkill_after_timeout(agent: AgentProcess) -> None:
    task = agent.submit("stubborn", ["sh", "-c", "trap '' TERM; sleep 30"], kill_timeout=0.5)
    pid = agent.wait_state(task["id"], "running")["pid"]
    time.sleep(0.2)  # let the shell install its trap
    t0 = time.monotonic()
    resp = agent.api("DELETE", f"/v1/tasks/{task['id']}")
    assert resp.status == 202
    done = agent.wait_state(task["id"], "killed", timeout=5)
    assert 0.4 <= time.monotonic() - t0 < 4
    assert done["exit_code"] == 137
    assert not pid_alive(pid)


def test_kill_stops_the_whole_process_group(agent: AgentProcess) -> None:
    task = agent.submit("tree", ["sh", "-c", "sleep 30 & sleep 30 & wait"], kill_timeout=2)
    agent.wait_state(task["id"], "running")
    time.sleep(0.2)
    pids_file = agent.data_dir / "tasks" / task["id"] / "run.pid"
    leader = int(pids_file.read_text())
    import subprocess

    members = [int(p) for p in subprocess.run(["pgrep", "-g", str(leader)], capture_output=True,
                                              text=True).stdout.split()]
    assert len(members) >= 3
    agent.api("DELETE", f"/v1/tasks/{task['id']}")
    agent.wait_state(task["id"], "killed")
    wait_until(lambda: not any(pid_alive(p) for p in members), timeout=3, what="group gone")


def test_kill_of_pending_and_finished_tasks(agent: AgentProcess) -> None:
    done = agent.submit("quick", ["true"])
    agent.wait_state(done["id"], "finished")
    resp = agent.api("DELETE", f"/v1/tasks/{done['id']}")
    assert resp.status == 200 and resp.body["state"] == "finished"
    blocker = agent.submit("blocker", ["sleep", "30"], resources={"cpus": 2}, kill_timeout=1)
    agent.wait_state(blocker["id"], "running")
    queued = agent.submit("queued", ["true"], resources={"cpus": 1})
    resp = agent.api("DELETE", f"/v1/tasks/{queued['id']}")
    assert resp.status == 200 and resp.body["state"] == "killed"


def test_memory_limit_is_enforced(agent: AgentProcess) -> None:
    info = agent.api("GET", "/v1/info").body
    if info["isolation"] == "rlimit":
        import pytest

        pytest.skip("no writable cgroup hierarchy on this host; rlimit mode tested elsewhere")
    hog = ["python3", "-c", "b = bytearray(200 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096])"]
    task = agent.submit("hog", hog, resources={"cpus": 0.5, "mem_mb": 48})
    done = agent.wait_state(task["id"], "failed", timeout=15)
    assert done["exit_code"] == 137, done


def test_logs_follow_streams_until_the_task_ends(agent: AgentProcess) -> None:
    task = agent.submit("ticker", ["sh", "-c", "for i in 1 2 3; do echo tick$i; sleep 0.2; done"])
    import urllib.request

    req = urllib.request.Request(f"{agent.url}/v1/tasks/{task['id']}/logs?follow=true&tail=10",
                                 headers={"Authorization": f"Bearer {agent.token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = resp.read()
    assert body == b"tick1\ntick2\ntick3\n"


def test_list_filters_and_pagination(agent: AgentProcess) -> None:
    ids = [agent.submit(f"p{i}", ["true"], labels={"tier": "a" if i % 2 else "b"})["id"]
           for i in range(7)]
    for tid in ids:
        agent.wait_state(tid, "finished")
    seen, cursor = [], None
    while True:
        q = "/v1/tasks?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = agent.api("GET", q).body
        seen += [t["id"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids, "stable submission order across pages"
    tier_a = agent.api("GET", "/v1/tasks?label=tier=a").body["items"]
    assert [t["id"] for t in tier_a] == ids[1::2]
    assert [t["id"] for t in agent.api("GET", "/v1/tasks?name=p3").body["items"]] == [ids[3]]
    assert len(agent.api("GET", "/v1/tasks?state=finished,failed").body["items"]) == 7
    assert agent.api("GET", "/v1/tasks?state=running").body["items"] == []
    short = agent.api("GET", f"/v1/tasks/{ids[0][:10]}").body
    assert short["id"] == ids[0]
