"""Federation through real failures: real nats-server, hub and agent processes, killed for real.

Each test ends by checking that the core's view (through the core's API) equals the edge's
(through the edge's API), task for task, state and restart count alike: nothing lost, nothing
applied twice.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

from core_hub.enroll import load_hub_signer
from federation import wire
from federation.natsd import NatsServer
from tests.helpers import (
    AgentProcess,
    HubProcess,
    command_results,
    converged,
    joined,
    pid_alive,
    publish_command,
    wait_until,
)
from tests.tcp_proxy import TcpProxy


def churn(agent: AgentProcess, n: int) -> list[str]:
    """``n`` tasks that restart fast: a few hundred events a second."""
    return [agent.submit(f"churn{i}", ["true"], resources={"cpus": 0.01, "mem_mb": 1},
                         restart={"policy": "always", "backoff": 0.01, "max_backoff": 0.01})["id"]
            for i in range(n)]


def stop_all(agent: AgentProcess, ids: list[str]) -> None:
    for task_id in ids:
        agent.api("DELETE", f"/v1/tasks/{task_id}")
    for task_id in ids:
        agent.wait_state(task_id, "killed")


def test_nats_down_then_back_views_equal(start_agent: Callable[..., AgentProcess],
                                         hub_proc: HubProcess, nats_proc: NatsServer) -> None:
    agent = joined(start_agent, hub_proc, nats_proc)
    agent.submit("early", ["true"])
    converged(agent, hub_proc)
    nats_proc.kill()
    # Autonomy: the edge accepts, runs, restarts and kills tasks with the link down.
    during = [agent.submit(f"offline{i}", ["sh", "-c", f"exit {i % 2}"]) for i in range(5)]
    for t in during:
        agent.wait_state(t["id"], "finished", "failed")
    assert agent.api("GET", "/v1/info").body["link"]["outbox_depth"] > 0
    asyncio.run(nats_proc.start())
    converged(agent, hub_proc)


def test_agent_sigkilled_while_draining_a_backlog(start_agent: Callable[..., AgentProcess],
                                                  hub_proc: HubProcess,
                                                  nats_proc: NatsServer) -> None:
    agent = joined(start_agent, hub_proc, nats_proc)
    nats_proc.kill()
    ids = churn(agent, 6)
    wait_until(lambda: agent.api("GET", "/v1/info").body["link"]["outbox_depth"] > 2000,
               timeout=30, what="a backlog of thousands of events")
    stop_all(agent, ids)
    depth = agent.api("GET", "/v1/info").body["link"]["outbox_depth"]
    asyncio.run(nats_proc.start())
    wait_until(lambda: agent.api("GET", "/v1/info").body["link"]["outbox_depth"] < depth,
               timeout=20, interval=0.01, what="draining under way")
    agent.kill()  # SIGKILL mid-drain
    agent.start()
    converged(agent, hub_proc)


def test_hub_sigkilled_mid_ingest_and_view_rebuilt(start_agent: Callable[..., AgentProcess],
                                                   hub_proc: HubProcess,
                                                   nats_proc: NatsServer) -> None:
    agent = joined(start_agent, hub_proc, nats_proc)
    ids = churn(agent, 3)
    time.sleep(1.0)
    hub_proc.stop(signal.SIGKILL)  # mid-ingest: events keep flowing into the stream
    time.sleep(1.0)
    stop_all(agent, ids)
    hub_proc.start()
    converged(agent, hub_proc)
    # The view file is a cache: delete it and the hub rebuilds the same view from JetStream.
    hub_proc.stop()
    for name in ("hub.db", "hub.db-wal", "hub.db-shm"):
        (hub_proc.data_dir / name).unlink(missing_ok=True)
    hub_proc.start()
    converged(agent, hub_proc)


def test_kill_command_waits_for_a_disconnected_edge(start_agent: Callable[..., AgentProcess],
                                                    hub_proc: HubProcess,
                                                    nats_proc: NatsServer) -> None:
    agent = joined(start_agent, hub_proc, nats_proc)
    task = agent.submit("victim", ["sleep", "60"], kill_timeout=1)
    pid = agent.wait_state(task["id"], "running")["pid"]
    converged(agent, hub_proc)
    agent.kill()  # the edge is away; its task keeps running
    resp = hub_proc.api("DELETE", f"/v1/tasks/{task['id']}")
    assert resp.status == 202 and resp.body["command_id"]
    time.sleep(1.0)
    assert pid_alive(pid), "nothing happens until the edge is back"
    agent.start()
    agent.wait_state(task["id"], "killed", timeout=15)
    assert not pid_alive(pid)
    converged(agent, hub_proc)
    results = command_results(hub_proc.data_dir)
    assert [(r[0], r[1]) for r in results] == [(resp.body["command_id"], "applied")]
    # Applied once: a restart of the agent does not apply it again.
    agent.kill()
    agent.start()
    time.sleep(1.0)
    assert command_results(hub_proc.data_dir) == results


def test_a_command_sent_while_the_link_was_cut_is_applied_as_it_returns(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    """With 40 s heartbeats the command reader's safety tick is 80 s: the command whose
    wake-up was lost while the link was cut is read at the reconnect, not at the tick."""
    proxy = TcpProxy("127.0.0.1", nats_proc.port).start()
    try:
        agent = joined(start_agent, hub_proc, proxy, "--heartbeat", "40")
        task = agent.submit("victim", ["sleep", "300"], kill_timeout=1)
        pid = agent.wait_state(task["id"], "running")["pid"]
        converged(agent, hub_proc)
        proxy.cut()
        wait_until(lambda: not agent.api("GET", "/v1/info").body["link"]["connected"],
                   timeout=10, what="the agent sees its link down")
        resp = hub_proc.api("DELETE", f"/v1/tasks/{task['id']}")
        assert resp.status == 202, resp.body
        time.sleep(1.0)  # stored in the stream; the wake-up went nowhere
        assert pid_alive(pid)
        proxy.restore()
        agent.wait_state(task["id"], "killed", timeout=30)
        assert not pid_alive(pid)
        converged(agent, hub_proc)
    finally:
        proxy.close()


def test_an_expired_command_is_reported_not_applied(start_agent: Callable[..., AgentProcess],
                                                    hub_proc: HubProcess,
                                                    nats_proc: NatsServer) -> None:
    agent = joined(start_agent, hub_proc, nats_proc)
    agent_id = agent.api("GET", "/v1/info").body["agent_id"]
    task = agent.submit("survivor", ["sleep", "60"], kill_timeout=1)
    agent.wait_state(task["id"], "running")
    agent.kill()
    signer = load_hub_signer(hub_proc.data_dir)
    data = wire.sign_envelope("kill", agent_id, 10_000, {
        "id": "expiredcmd1", "task_id": task["id"], "expires_at": time.time() + 0.5}, signer)
    asyncio.run(publish_command(nats_proc.url, agent_id, data))
    time.sleep(1.0)  # it expires while the edge is away
    agent.start()
    wait_until(lambda: command_results(hub_proc.data_dir), timeout=15,
               what="the result at the core")
    assert command_results(hub_proc.data_dir) == [("expiredcmd1", "expired")]
    assert agent.task(task["id"])["state"] == "running"


def test_hung_nats_sigstop_then_sigcont(start_agent: Callable[..., AgentProcess],
                                        hub_proc: HubProcess, nats_proc: NatsServer) -> None:
    agent = joined(start_agent, hub_proc, nats_proc)
    agent.submit("before", ["true"])
    converged(agent, hub_proc)
    nats_proc.pause()
    during = [agent.submit(f"hung{i}", ["true"])["id"] for i in range(5)]
    for task_id in during:
        agent.wait_state(task_id, "finished")
    time.sleep(3.0)  # long enough for pings to go unanswered
    nats_proc.resume()
    converged(agent, hub_proc, timeout=45)


def test_tasks_running_through_an_outage_are_left_alone(start_agent: Callable[..., AgentProcess],
                                                        hub_proc: HubProcess,
                                                        nats_proc: NatsServer) -> None:
    agent = joined(start_agent, hub_proc, nats_proc)
    tasks = [agent.submit(f"svc{i}", ["sleep", "60"], restart={"policy": "always"},
                          kill_timeout=1) for i in range(3)]
    pids = {t["id"]: agent.wait_state(t["id"], "running")["pid"] for t in tasks}
    converged(agent, hub_proc)
    nats_proc.kill()
    time.sleep(4.0)  # the hub marks the agent unreachable meanwhile
    wait_until(lambda: hub_proc.api("GET", "/v1/tasks").body["items"][0]["state"] == "unknown",
               timeout=10, what="tasks shown unknown at the core while the edge is away")
    asyncio.run(nats_proc.start())
    converged(agent, hub_proc)
    for task_id, pid in pids.items():
        now = agent.task(task_id)
        assert now["pid"] == pid and now["restarts"] == 0 and now["state"] == "running"


def test_hub_stops_promptly_when_its_nats_is_gone(hub_proc: HubProcess,
                                                  nats_proc: NatsServer) -> None:
    nats_proc.kill()
    time.sleep(1.0)
    t0 = time.monotonic()
    hub_proc.stop()
    assert hub_proc.proc is not None and hub_proc.proc.returncode == 0
    assert time.monotonic() - t0 < 10


def test_outbox_stays_bounded_offline_and_keeps_every_final_state(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    agent = start_agent("--nats", nats_proc.url, "--join-token", hub_proc.join_token(),
                        "--outbox-max", "1000")
    wait_until(lambda: agent.api("GET", "/v1/info").body["link"]["enrolled"], what="enrolled")
    nats_proc.kill()
    ids = churn(agent, 4)
    wait_until(lambda: agent.api("GET", "/v1/info").body["link"]["coalesced_events"] > 500,
               timeout=30, what="coalescing of superseded events")
    link = agent.api("GET", "/v1/info").body["link"]
    assert link["outbox_depth"] < 2000, link
    done = [agent.submit(f"final{i}", ["sh", "-c", f"exit {i}"])["id"] for i in range(3)]
    stop_all(agent, ids)
    for task_id in done:
        agent.wait_state(task_id, "finished", "failed")
    asyncio.run(nats_proc.start())
    # Every task's final state arrives and nothing stale wins (slow on a loaded CI box: the
    # churn leaves thousands of events to ship).
    converged(agent, hub_proc, timeout=90)
