"""Services from the core: instance count kept through an agent's loss, duplicates settled by
the service's rule when it returns (never by killing both), scale, delete."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from federation.natsd import NatsServer
from tests.helpers import AgentProcess, HubProcess, joined, pid_alive, wait_until
from tests.tcp_proxy import TcpProxy


def service(hub: HubProcess, name: str) -> dict[str, Any]:
    resp = hub.api("GET", f"/v1/services/{name}")
    assert resp.status == 200, resp.body
    return resp.body


def editable(view: dict[str, Any]) -> dict[str, Any]:
    """A service as the API shows it, cut back to what a client sends (GET, edit, PUT)."""
    body = {k: v for k, v in view.items() if k not in (
        "running", "tasks", "lost", "migrating", "created_at", "updated_at", "revision",
        "rollout")}
    body["task"] = {k: v for k, v in body["task"].items() if k != "name"}
    return body


def running_where(hub: HubProcess, name: str) -> dict[str, str]:
    """task id -> agent id of the service's running instances, as the core sees them."""
    tasks = hub.api("GET", f"/v1/tasks?name={name}&state=running").body["items"]
    return {t["id"]: t["agent_id"] for t in tasks}


def two_sites(start_agent: Callable[..., AgentProcess], hub: HubProcess, nats: Any,
              b_link: Any = None) -> tuple[AgentProcess, AgentProcess, str, str]:
    """Agents ``a`` (site alpha) and ``b`` (site beta, over ``b_link`` if given), both
    offering at ``hub``; returns them and their ids."""
    a = joined(start_agent, hub, nats, "--site", "alpha", name="a")
    b = joined(start_agent, hub, b_link or nats, "--site", "beta", name="b")
    a_id, b_id = (x.api("GET", "/v1/info").body["agent_id"] for x in (a, b))
    wait_until(lambda: len(hub.api("GET", "/v1/offers").body["items"]) == 2,
               what="offers from both")
    return a, b, a_id, b_id


def test_service_survives_an_agent_loss_and_settles_on_return(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    a, b, a_id, b_id = two_sites(start_agent, hub_proc, nats_proc)
    resp = hub_proc.api("POST", "/v1/services", {
        "name": "web", "instances": 2,
        "task": {"command": ["sleep", "300"], "kill_timeout": 1,
                 "resources": {"cpus": 0.1, "mem_mb": 16}},
        "disconnect": {"lost_after": 1, "replace": True, "keep": "keep_original"}})
    assert resp.status == 201, resp.body
    first = wait_until(lambda: len(w := running_where(hub_proc, "web")) == 2 and w,
                       timeout=20, what="two instances running")
    assert len(set(first.values())) == 2, "spread over both sites"
    original = next(t for t, agent in first.items() if agent == b_id)
    original_pid = b.task(original)["pid"]

    b.kill()  # the agent is gone; its instance keeps running at the edge
    replaced = wait_until(lambda: list((w := running_where(hub_proc, "web")).values())
                          == [a_id, a_id] and service(hub_proc, "web")["running"] == 2 and w,
                          timeout=30, what="a replacement on the remaining agent")
    # The original shows 'unknown' at the core meanwhile: the edge is probably still running it.
    assert hub_proc.api("GET", f"/v1/tasks/{original}").body["state"] == "unknown"
    assert service(hub_proc, "web")["lost"] == [original]
    assert pid_alive(original_pid)

    b.start()  # back: three copies for a while; the newest (the replacement) goes
    wait_until(lambda: set(running_where(hub_proc, "web")) == set(first), timeout=30,
               what="the original kept and the replacement stopped")
    assert b.task(original)["pid"] == original_pid, "the original was never restarted"
    assert pid_alive(original_pid)
    del replaced

    # Scale down, then delete.
    body = {**editable(service(hub_proc, "web")), "instances": 1}
    assert hub_proc.api("PUT", "/v1/services/web", body).status == 200
    wait_until(lambda: len(running_where(hub_proc, "web")) == 1, timeout=20, what="scaled to 1")
    assert hub_proc.api("DELETE", "/v1/services/web").status == 202
    wait_until(lambda: not running_where(hub_proc, "web"), timeout=20, what="all stopped")
    assert hub_proc.api("GET", "/v1/services/web").status == 404
    time.sleep(1.5)
    assert not running_where(hub_proc, "web"), "nothing comes back after delete"
    assert a.api("GET", "/v1/services").body == {"items": [], "next_cursor": None}


def test_service_survives_an_agent_cut_off_from_nats(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    """The agent lives on but its link is cut (its NATS connection relayed through a proxy
    that the test cuts): the core replaces its instance; the edge keeps running the original
    meanwhile; when the link returns, keep_replacement stops the original, only the surplus."""
    proxy = TcpProxy("127.0.0.1", nats_proc.port).start()
    try:
        a, b, a_id, b_id = two_sites(start_agent, hub_proc, nats_proc, b_link=proxy)
        assert hub_proc.api("POST", "/v1/services", {
            "name": "cache", "instances": 2,
            "task": {"command": ["sleep", "300"], "kill_timeout": 1,
                     "resources": {"cpus": 0.1, "mem_mb": 16}},
            "disconnect": {"lost_after": 1, "replace": True, "keep": "keep_replacement"},
        }).status == 201
        first = wait_until(lambda: sorted((w := running_where(hub_proc, "cache")).values())
                           == sorted([a_id, b_id]) and w, timeout=20,
                           what="one instance per agent")
        original = next(t for t, agent in first.items() if agent == b_id)
        original_pid = b.task(original)["pid"]

        proxy.cut()
        wait_until(lambda: not b.api("GET", "/v1/info").body["link"]["connected"], timeout=10,
                   what="the edge sees its link down")
        wait_until(lambda: list(running_where(hub_proc, "cache").values()) == [a_id, a_id]
                   and service(hub_proc, "cache")["running"] == 2, timeout=30,
                   what="a replacement on the agent still connected")
        assert hub_proc.api("GET", f"/v1/tasks/{original}").body["state"] == "unknown"
        # Cut off is not down: the edge still runs the original and still takes work.
        assert b.task(original)["state"] == "running" and pid_alive(original_pid)
        local = b.api("POST", "/v1/tasks", {"name": "offline-job", "command": ["true"]})
        assert local.status == 201, local.body

        proxy.restore()
        wait_until(lambda: b.api("GET", "/v1/info").body["link"]["connected"], timeout=20,
                   what="the edge reconnected")
        wait_until(lambda: b.task(original)["state"] == "killed", timeout=30,
                   what="keep_replacement stops the returned original")
        kept = wait_until(lambda: list((w := running_where(hub_proc, "cache")).values())
                          == [a_id, a_id] and w, timeout=20, what="two instances, both on a")
        a_first = next(t for t, agent in first.items() if agent == a_id)
        assert a_first in kept, "the instance that was never away is not the one stopped"
        assert not pid_alive(original_pid)
        assert service(hub_proc, "cache")["running"] == 2
        # What the edge did alone reached the core.
        wait_until(lambda: hub_proc.api("GET", f"/v1/tasks/{local.body['id']}").body.get(
            "state") == "finished", timeout=20, what="the offline job at the core")
    finally:
        proxy.close()


def test_drain_with_migrate_moves_service_instances(start_agent: Callable[..., AgentProcess],
                                                    hub_proc: HubProcess,
                                                    nats_proc: NatsServer) -> None:
    a, b, a_id, b_id = two_sites(start_agent, hub_proc, nats_proc)
    assert hub_proc.api("POST", "/v1/services", {
        "name": "mover", "instances": 2,
        "task": {"command": ["sleep", "300"], "kill_timeout": 1}}).status == 201
    wait_until(lambda: sorted(running_where(hub_proc, "mover").values()) == sorted([a_id, b_id]),
               timeout=20, what="one instance per agent")
    resp = hub_proc.api("POST", f"/v1/agents/{b_id}/drain?migrate=true")
    assert resp.status == 200 and resp.body["status"] == "draining"
    wait_until(lambda: list(running_where(hub_proc, "mover").values()) == [a_id, a_id],
               timeout=30, what="both instances on the agent that was not drained")
    assert b.api("GET", "/v1/agents").body["items"][0]["status"] == "draining"
    refused = b.api("POST", "/v1/tasks", {"name": "late", "command": ["true"]})
    assert refused.status == 409


def test_rolling_update_and_rollback(start_agent: Callable[..., AgentProcess],
                                     hub_proc: HubProcess, nats_proc: NatsServer) -> None:
    joined(start_agent, hub_proc, nats_proc, "--site", "alpha", name="a")
    joined(start_agent, hub_proc, nats_proc, "--site", "beta", name="b")
    wait_until(lambda: len(hub_proc.api("GET", "/v1/offers").body["items"]) == 2,
               what="offers from both")
    assert hub_proc.api("POST", "/v1/services", {
        "name": "app", "instances": 2, "update": {"batch": 1, "min_ready": 0.5, "timeout": 60},
        "task": {"command": ["sleep", "300"], "kill_timeout": 1}}).status == 201

    def commands() -> list[list[str]]:
        tasks = hub_proc.api("GET", "/v1/tasks?name=app&state=running").body["items"]
        return sorted(t["command"] for t in tasks)

    wait_until(lambda: commands() == [["sleep", "300"]] * 2, timeout=20, what="revision 1")
    body = editable(service(hub_proc, "app"))
    body["task"]["command"] = ["sleep", "301"]
    resp = hub_proc.api("PUT", "/v1/services/app", body)
    assert resp.status == 200 and resp.body["revision"] == 2
    low = 2
    deadline = time.monotonic() + 40
    while commands() != [["sleep", "301"]] * 2:
        low = min(low, len(commands()))
        assert time.monotonic() < deadline, "revision 2 did not roll out"
        time.sleep(0.1)
    assert low >= 1, "the service never went dark during the rollout"
    wait_until(lambda: service(hub_proc, "app")["rollout"]["status"] == "done", timeout=10,
               what="rollout done")

    # A broken revision fails, and the service rolls back to the working one.
    body = editable(service(hub_proc, "app"))
    body["task"]["command"] = ["sh", "-c", "exit 3"]
    assert hub_proc.api("PUT", "/v1/services/app", body).status == 200
    view = wait_until(lambda: (v := service(hub_proc, "app"))["rollout"]["status"]
                      == "rolled_back" and v, timeout=40, what="rollback")
    assert "revision 3" in view["rollout"]["reason"] and view["revision"] == 2
    assert view["task"]["command"] == ["sleep", "301"]
    wait_until(lambda: commands() == [["sleep", "301"]] * 2, timeout=20, what="two good copies")


def test_a_new_service_is_placed_once_even_while_the_loop_runs(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    """Creating a service places its instances while the services loop runs passes of its
    own. With NATS hung, each launch waits seconds to be sent, so the loop surely runs during
    the create; it must not count the instances still being placed as missing (that made
    extra copies, then killed the surplus, breaking the spread)."""
    joined(start_agent, hub_proc, nats_proc, "--cpus", "4", name="a")
    wait_until(lambda: hub_proc.api("GET", "/v1/offers").body["items"], what="an offer")
    nats_proc.pause()
    try:
        resp = hub_proc.api("POST", "/v1/services", {
            "name": "slow", "instances": 2,
            "task": {"command": ["sleep", "300"], "kill_timeout": 1,
                     "resources": {"cpus": 0.1, "mem_mb": 8}}}, timeout=60)
    finally:
        nats_proc.resume()
    assert resp.status == 201, resp.body
    wait_until(lambda: service(hub_proc, "slow")["running"] == 2, timeout=30,
               what="both instances running")
    time.sleep(1.5)  # a few more passes
    made = hub_proc.api("GET", "/v1/tasks?name=slow&limit=1000").body["items"]
    assert len(made) == 2, [(t["id"], t["state"]) for t in made]
    assert "over, stopping" not in hub_proc.log()
    assert hub_proc.api("DELETE", "/v1/services/slow").status == 202
