"""Issue 11, the edge: failure paths around the exactly-once path, each against real processes
(two processes on one data dir, SIGKILL between spawn and commit, loops that meet an error,
cgroups left behind, a full disk, a link that stalls while connected)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from federation.natsd import NatsServer
from tests.helpers import (
    ROOT,
    AgentProcess,
    HubProcess,
    converged,
    joined,
    kill_group,
    pid_alive,
    wait_until,
)
from tests.tcp_proxy import TcpProxy


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


def _wrappers(data_dir: Path) -> dict[int, str]:
    """Live task wrappers (session leaders running wrapper.sh) of ``data_dir``: pid -> task dir."""
    found: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if (len(argv) > 2 and argv[1].endswith(b"wrapper.sh") and stat[0] not in "ZX"
                and int(stat[3]) == int(proc.name)
                and argv[2].startswith(str(data_dir / "tasks").encode())):
            found[int(proc.name)] = Path(argv[2].decode()).name
    return found


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def _post_ignoring_errors(agent: AgentProcess, name: str) -> None:
    """The POST whose agent is SIGKILLed mid-request: no answer comes, that is the point."""
    with contextlib.suppress(OSError):
        agent.api("POST", "/v1/tasks", {"name": name, "command": ["sleep", "300"]}, timeout=30)


def test_an_agent_killed_between_spawn_and_commit_leaves_no_orphan(tmp_path: Path) -> None:
    """10 of 10: SIGKILL right after a spawn (the agent SIGSTOPs itself there); after the
    restart every live wrapper of the data dir is a task the agent knows and supervises."""
    data = tmp_path / "edge"
    data.mkdir()
    agent = AgentProcess(data, ["--name", "edge"], env={"OUTPOST_FAULT_STOP_AFTER_SPAWN": "1"})
    try:
        agent.start()
        for round_ in range(10):
            post = threading.Thread(target=_post_ignoring_errors,
                                    args=(agent, f"t{round_}"), daemon=True)
            post.start()
            wait_until(lambda: _stopped(agent.proc.pid), 10, what="the agent stopped at spawn")
            wait_until(lambda n=round_: len(_wrappers(data)) == n + 1, 10,
                       what="the new wrapper running")
            agent.kill()
            post.join(30)
            agent.start()
            live = _wrappers(data)
            known = {t["id"]: t for t in agent.api("GET", "/v1/tasks?limit=100").body["items"]}
            for pid, task_id in live.items():
                assert task_id in known, f"round {round_}: orphan wrapper {pid} of {task_id}"
                assert known[task_id]["pid"] == pid and known[task_id]["state"] == "running"
        assert len(_wrappers(data)) == 10
        # Supervised for real: a kill through the API ends one.
        some = next(iter(known))
        assert agent.api("DELETE", f"/v1/tasks/{some}").status == 202
        agent.wait_state(some, "killed")
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.send_signal(signal.SIGCONT)
            agent.kill()
        for pid in _wrappers(data):
            kill_group(pid)


def test_a_process_whose_task_never_committed_is_stopped_at_start(
        start_agent: Callable[..., AgentProcess]) -> None:
    """What an older agent left (spawn before commit): a live wrapper in a task dir the store
    does not know. The next start stops it and removes the dir; known tasks are re-adopted."""
    agent = start_agent()
    kept = agent.submit("kept", ["sleep", "300"])
    kept_pid = agent.wait_state(kept["id"], "running")["pid"]
    agent.kill()
    ghost = agent.data_dir / "tasks" / ("f" * 32)
    (ghost / "sandbox").mkdir(parents=True)
    wrapper = str(ROOT / "edge_agent" / "wrapper.sh")
    proc = subprocess.Popen(["sh", wrapper, str(ghost), "1024", "0", "--", "sleep", "300"],
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: proc.pid in _wrappers(agent.data_dir), 5, what="the ghost wrapper")
        agent.start()
        wait_until(lambda: proc.poll() is not None, 5, what="the ghost stopped")
        assert not ghost.exists()
        assert pid_alive(kept_pid) and agent.task(kept["id"])["pid"] == kept_pid
        assert "its task was never recorded" in agent.log()
    finally:
        kill_group(proc.pid)
        proc.wait()


def _loop_errors(agent: AgentProcess) -> dict[str, float]:
    text = agent.api("GET", "/metrics").raw.decode()
    return {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
            if line.startswith("outpost_loop_errors_total{")}


def test_loops_go_on_after_a_failed_pass(start_agent: Callable[..., AgentProcess],
                                         hub_proc: HubProcess, nats_proc: NatsServer) -> None:
    """The first two passes of the supervisor tick, the outbox bound loop and the heartbeat
    loop raise: each is logged with its traceback, counted, and the loop keeps doing its job
    (logs rotate, heartbeats keep the agent online, its events reach the hub)."""
    faults = "supervisor-tick:2,sync-outbox-bound:2,sync-heartbeat:2"
    agent = joined(start_agent, hub_proc, nats_proc, env={
        "OUTPOST_FAULT_LOOP_ERRORS": faults, "OUTPOST_LOG_MAX_BYTES": "1024"})
    wait_until(lambda: _loop_errors(agent) == {"supervisor-tick": 2, "sync-outbox-bound": 2,
                                               "sync-heartbeat": 2},
               10, what="two counted errors per loop")
    assert "loop supervisor-tick: a pass failed" in agent.log()
    assert "InjectedFault: fault injected into loop sync-heartbeat" in agent.log()
    chatty = agent.submit("chatty", ["sh", "-c", "while :; do echo 0123456789abcdef; "
                                                 "sleep 0.01; done"])
    rotated = agent.data_dir / "tasks" / chatty["id"] / "stdout.log.1"
    wait_until(rotated.exists, 15, what="the tick still rotating logs")
    converged(agent, hub_proc)  # the events were published and applied at the hub
    info = agent.api("GET", "/v1/info").body
    hub_agents = hub_proc.api("GET", "/v1/agents").body["items"]
    assert [a["status"] for a in hub_agents if a["id"] == info["agent_id"]] == ["online"]


def _cgroup_roots(pid: int, agent_id: str) -> list[Path]:
    """The agent's own ``outpost-<id>`` dirs, one per hierarchy it uses (v1: memory, cpu)."""
    roots = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for ctrl in ("memory", "cpu"):
            if ctrl in ctrls.split(","):
                roots.append(Path("/sys/fs/cgroup", ctrl, path.lstrip("/"),
                                  f"outpost-{agent_id[:12]}"))
    return roots


def test_cgroups_are_removed_when_nothing_uses_them(
        start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent()
    info = agent.api("GET", "/v1/info").body
    if info["isolation"] != "cgroup-v1":
        pytest.skip(f"needs writable cgroup v1 hierarchies (this agent has {info['isolation']})")
    roots = _cgroup_roots(agent.proc.pid, info["agent_id"])
    # What an earlier crash left beside this agent's dirs: an empty agent dir and, in this
    # agent's own dir, the cgroup of a task that is gone.
    leftovers = [root.parent / "outpost-0leftover0" for root in roots]
    for left in leftovers:
        left.mkdir(exist_ok=True)
    done = agent.submit("done", ["true"])
    agent.wait_state(done["id"], "finished")
    killed = agent.submit("killed", ["sleep", "300"], kill_timeout=1)
    agent.wait_state(killed["id"], "running")
    assert all((root / killed["id"]).is_dir() for root in roots)
    kept = agent.submit("kept", ["sleep", "300"])
    agent.wait_state(kept["id"], "running")
    agent.kill()  # the crash: 'killed' then dies with no agent to remove its cgroup
    kill_group(int((agent.data_dir / "tasks" / killed["id"] / "run.pid").read_text()))
    wait_until(lambda: not any((r / killed["id"] / "cgroup.procs").read_text().strip()
                               for r in roots), 5, what="the task's processes gone")
    agent.start()
    assert not any(left.exists() for left in leftovers), "empty outpost-* dirs removed"
    assert not any((root / killed["id"]).exists() for root in roots)
    assert not any((root / done["id"]).exists() for root in roots)
    assert all((root / kept["id"]).is_dir() for root in roots), "a live task keeps its own"
    agent.stop()  # --stop-tasks-on-exit: the tasks end, then the agent's own dirs go
    assert not any(root.exists() for root in roots), [p for p in roots if p.exists()]


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_full_disk_answers_507_kills_and_keeps_exit_statuses(tmp_path: Path) -> None:
    """An 8 MB tmpfs data dir filled by a task: writes that cannot be stored are 507 JSON and
    start nothing, a kill works, exits that happen while full keep their code and are recorded
    once space returns (never 'lost'), log rotation goes on, the reserve comes back."""
    data = tmp_path / "edge"
    data.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(data)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mount.stderr.strip()}")
    gate = tmp_path / "gate"
    agent = AgentProcess(data, ["--stop-tasks-on-exit", "--name", "edge"],
                         env={"OUTPOST_LOG_MAX_BYTES": "262144"})
    try:
        agent.start()
        assert (data / "reserve").stat().st_size == 2 * 1024 * 1024
        waiters = [agent.submit(f"w{i}", ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05;"
                                                      " done; exit 3"]) for i in range(3)]
        # Its own output fills the disk; each time rotation truncates it, it fills it again.
        filler = agent.submit("filler", ["sh", "-c", "while :; do cat /dev/zero; sleep 0.2; done"],
                              kill_timeout=1)
        filler_pid = agent.wait_state(filler["id"], "running")["pid"]
        wait_until(lambda: _free_bytes(data) < 64 * 1024, 10, what="the disk full")

        answers: list[int] = []

        def refused() -> bool:
            resp = agent.api("POST", "/v1/tasks", {"name": "late", "command": ["sleep", "300"]})
            answers.append(resp.status)
            if resp.status == 507:
                assert resp.body["error"]["code"] == "insufficient_storage", resp.body
            return resp.status == 507

        wait_until(refused, 10, what="a 507 for a task that cannot be stored")
        assert set(answers) <= {201, 507}, answers  # stored (and then failed to spawn) or 507
        known = {t["id"] for t in agent.api("GET", "/v1/tasks?limit=100").body["items"]}
        assert set(_wrappers(data).values()) <= known, "no process for a task never stored"

        gate.touch()  # the three waiters exit with 3 while the disk is full
        wait_until(lambda: all(not pid_alive(agent.task(w["id"])["pid"] or 0) for w in waiters)
                   or all(agent.task(w["id"])["state"] == "failed" for w in waiters), 10,
                   what="the waiters gone")
        wait_until(lambda: agent.log().count("truncated without keeping a copy") >= 2, 20,
                   what="log rotation going on through ENOSPC")
        assert _free_bytes(data) < 64 * 1024 or agent.task(filler["id"])["state"] == "running"
        kill = agent.api("DELETE", f"/v1/tasks/{filler['id']}")
        assert kill.status in (200, 202), kill.body
        wait_until(lambda: not pid_alive(filler_pid), 10, what="the filler killed while full")

        (data / "tasks" / filler["id"] / "stdout.log").unlink()  # the operator makes room
        for w in waiters:
            done = agent.wait_state(w["id"], "failed", "lost")
            assert done["state"] == "failed" and done["exit_code"] == 3, done
        assert agent.wait_state(filler["id"], "killed")["state"] == "killed"
        wait_until(lambda: (data / "reserve").exists(), 15, what="the reserve made again")
        late = agent.api("POST", "/v1/tasks", {"name": "later", "command": ["true"]})
        assert late.status == 201, late.body
        assert agent.wait_state(late.body["id"], "finished")["exit_code"] == 0
        assert "Traceback" not in agent.log()
    finally:
        agent.stop()
        for pid in _wrappers(data):
            kill_group(pid)
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_a_stalled_link_is_rebuilt_and_events_arrive_once(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    """The TCP path to NATS stops forwarding without closing: NATS still looks connected to
    the agent. Its watchdog sees heartbeats make no progress, rebuilds the link, and the events
    recorded meanwhile reach the hub exactly once."""
    proxy = TcpProxy("127.0.0.1", nats_proc.port).start()
    try:
        agent = joined(start_agent, hub_proc, proxy)
        first = agent.submit("before", ["true"])
        converged(agent, hub_proc)
        proxy.freeze()
        # Large (valid) specs: their events fill the stalled socket and nats.py's 2 MB pending
        # buffer, where a forced flush (publishes, pings) waits with no timeout.
        big = {f"V{n}": "x" * 30000 for n in range(8)}
        during = [agent.submit(f"during{i}", ["true"], env=big) for i in range(10)]
        wait_until(lambda: agent.api("GET", "/v1/info").body["link"]["link_rebuilds"] >= 1,
                   30, what="the link rebuilt")
        converged(agent, hub_proc)
        for task in (first, *during):
            edge = agent.api("GET", f"/v1/tasks/{task['id']}/history").body["items"]
            core = hub_proc.api("GET", f"/v1/tasks/{task['id']}/history").body["items"]
            assert core == edge, (task["name"], edge, core)
        assert "link stalled" in agent.log()
    finally:
        proxy.close()


def test_nats_frozen_past_a_heartbeat_round_trip_needs_no_link_rebuild(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    """NATS frozen for longer than the heartbeat's round trip waits (2 s), then back: the
    late PONG must not end nats-py's read loop (federation/natsclient.py), so the link just
    goes on. Before the fix it went deaf while "connected": the next publish timed out (5 s)
    and the agent had to reconnect (or, with nothing to publish, wait for the watchdog)."""
    agent = joined(start_agent, hub_proc, nats_proc)
    converged(agent, hub_proc)
    nats_proc.pause()
    try:
        time.sleep(4.0)  # a heartbeat's flush times out meanwhile
    finally:
        nats_proc.resume()
    after = agent.submit("after", ["true"])
    agent.wait_state(after["id"], "finished")

    def drained() -> bool:
        link = agent.api("GET", "/v1/info").body["link"]
        return bool(link["connected"]) and link["outbox_depth"] == 0
    wait_until(drained, 40, what="the events recorded after the freeze acknowledged")
    converged(agent, hub_proc)
    link = agent.api("GET", "/v1/info").body["link"]
    assert (link["publish_errors"], link["reconnects"], link["link_rebuilds"]) == (0, 0, 0), link
    assert "link stalled" not in agent.log() and "encountered error" not in agent.log()


def test_an_event_after_a_quiet_spell_is_not_taken_for_a_stalled_link(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    """An idle agent publishes only its offer refresh (every 15 s). The watchdog measured "no
    publish answered" from the last answer instead of from the oldest publish still waiting
    for one, so an event recorded about 15 s after the last answer counted as stalled while
    its PubAck was on its way (a slow uplink; under the reconnect storm bench, thousands of
    rebuilds). Here NATS freezes 5.5 s, from 11.5 s after an answered publish: the publish in
    flight is 5.5 s old, not 17 s, and the link is not rebuilt."""
    agent = joined(start_agent, hub_proc, nats_proc)
    converged(agent, hub_proc)

    def link() -> dict[str, Any]:
        return dict(agent.api("GET", "/v1/info").body["link"])

    before = link()["published_batches"]
    wait_until(lambda: link()["published_batches"] > before, 20, interval=0.02,
               what="the next offer refresh answered")
    answered = link()["published_batches"]
    time.sleep(11.5)
    assert link()["published_batches"] == answered, "the agent was not idle"
    nats_proc.pause()
    try:
        quiet = agent.submit("after-a-quiet-spell", ["true"])
        time.sleep(5.5)
    finally:
        nats_proc.resume()
    agent.wait_state(quiet["id"], "finished")
    wait_until(lambda: link()["outbox_depth"] == 0, 40, what="the task's events acknowledged")
    converged(agent, hub_proc)
    assert (link()["link_rebuilds"], link()["reconnects"]) == (0, 0), link()
    assert "link stalled" not in agent.log()
