"""The ``outpost`` client against a real hub with two real agents on two sites (alpha, beta):
task id prefixes at the core, placement flags on ``tasks run``, the SITE and AGENT columns of
``tasks ls``, the ``services`` commands end to end, and readable offer/result events."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

from tests.helpers import ROOT, AgentProcess, HubProcess, wait_until
from tests.nats_fixtures import NatsServer
from tests.test_cli import CLI, _env, table
from tests.test_services import two_sites


def hub_cli(hub: HubProcess, *args: str, timeout: float = 20.0
            ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*CLI, "--url", hub.url, "--token", hub.token, *args],
                            capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                            env=_env())
    assert "Traceback" not in result.stderr, result.stderr
    return result


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_tasks_at_the_hub_placement_prefixes_and_columns(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    a, b, a_id, b_id = two_sites(start_agent, hub_proc, nats_proc)
    on_beta = ok(hub_cli(hub_proc, "tasks", "run", "web", "--site", "beta", "--cpus", "0.1",
                         "--mem-mb", "16", "--", "sleep", "60")).strip()
    labelled = ok(hub_cli(hub_proc, "tasks", "run", "web", "--label-constraint", "zone=a",
                          "--binpack", "--", "true")).strip()
    task = hub_proc.api("GET", f"/v1/tasks/{labelled}").body
    assert task["constraints"]["labels"] == [{"key": "zone", "op": "eq", "values": ["a"]}]
    assert task["constraints"]["strategy"] == "binpack"
    assert task["state"] == "pending", "no agent has the label zone=a"
    wait_until(lambda: hub_proc.api("GET", f"/v1/tasks/{on_beta}").body["state"] == "running",
               timeout=20, what="the beta task running")
    assert hub_proc.api("GET", f"/v1/tasks/{on_beta}").body["agent_id"] == b_id

    # A prefix works at the core as it does at the edge: 8 chars, and the 12 `ls` prints.
    for ref in (on_beta[:8], on_beta[:12]):
        shown = hub_proc.api("GET", f"/v1/tasks/{ref}")
        assert shown.status == 200 and shown.body["id"] == on_beta, shown.body
        fields = {r[0]: r[1:] for r in table(ok(hub_cli(hub_proc, "tasks", "get", ref)))}
        assert fields["ID"] == [on_beta] and fields["SITE"] == ["beta"]
    assert hub_proc.api("GET", f"/v1/tasks/{on_beta[:8]}/history").body["task_id"] == on_beta
    assert hub_proc.api("GET", "/v1/tasks/zzzzzzzz").status == 404

    rows = table(ok(hub_cli(hub_proc, "tasks", "ls")))
    assert rows[0] == ["ID", "NAME", "STATE", "EXIT", "RESTARTS", "AGE", "SITE", "AGENT",
                       "REASON"]
    by_id = {r[0]: r for r in rows[1:]}
    assert by_id[on_beta[:12]][6:8] == ["beta", "b"]
    assert by_id[labelled[:12]][6:8] == ["-", "-"]

    killed = ok(hub_cli(hub_proc, "tasks", "kill", on_beta[:10]))
    assert killed.startswith(on_beta)
    wait_until(lambda: b.task(on_beta)["state"] == "killed", timeout=20, what="killed at b")
    del a, a_id


def test_services_commands_end_to_end(start_agent: Callable[..., AgentProcess],
                                      hub_proc: HubProcess, nats_proc: NatsServer) -> None:
    two_sites(start_agent, hub_proc, nats_proc)
    created = json.loads(ok(hub_cli(
        hub_proc, "services", "run", "web", "--instances", "2", "--cpus", "0.1", "--mem-mb",
        "16", "--kill-timeout", "1", "--env", "V=1", "--spread", "--unique", "site", "--json",
        "--", "sleep", "300")))
    assert created["instances"] == 2 and created["constraints"]["unique"] == "site"
    assert created["task"]["env"] == {"V": "1"} and created["task"]["command"][0] == "sleep"

    def running() -> int:
        return int(hub_proc.api("GET", "/v1/services/web").body["running"])

    wait_until(lambda: running() == 2, timeout=30, what="two instances")
    rows = table(ok(hub_cli(hub_proc, "services", "ls")))
    assert rows[0] == ["NAME", "RUNNING", "INSTANCES", "REVISION", "ROLLOUT", "COMMAND"]
    assert rows[1][:5] == ["web", "2", "2", "1", "-"]
    fields = {r[0]: r[1:] for r in table(ok(hub_cli(hub_proc, "services", "get", "web")))}
    assert fields["INSTANCES"] == ["2"] and fields["UNIQUE"] == ["site"]

    assert "1" in ok(hub_cli(hub_proc, "services", "scale", "web", "1"))
    wait_until(lambda: running() == 1, timeout=30, what="scaled to one")

    ok(hub_cli(hub_proc, "services", "update", "web", "--env", "V=2"))
    svc = hub_proc.api("GET", "/v1/services/web").body
    assert svc["revision"] == 2 and svc["task"]["env"] == {"V": "2"}
    assert svc["instances"] == 1, "an update keeps the instance count"
    wait_until(lambda: hub_proc.api("GET", "/v1/services/web").body["rollout"]["status"]
               == "done", timeout=40, what="rollout done")
    status = {r[0]: r[1:] for r in table(ok(hub_cli(hub_proc, "services", "rollout", "status",
                                                    "web")))}
    assert status["STATUS"] == ["done"] and status["REVISION"] == ["2"]

    unchanged = hub_cli(hub_proc, "services", "update", "web")
    assert unchanged.returncode == 2 and "nothing to change" in unchanged.stderr
    missing = hub_cli(hub_proc, "services", "get", "nope")
    assert missing.returncode == 1 and "not found" in missing.stderr
    ok(hub_cli(hub_proc, "services", "rm", "web"))
    assert hub_proc.api("GET", "/v1/services/web").status == 404


def test_events_print_offers_and_results_readably(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    a, _, _, _ = two_sites(start_agent, hub_proc, nats_proc)
    task_id = ok(hub_cli(hub_proc, "tasks", "run", "nap", "--site", "alpha", "--", "sleep",
                         "60")).strip()
    a.wait_state(task_id, "running", timeout=20)
    ok(hub_cli(hub_proc, "tasks", "kill", task_id))
    a.wait_state(task_id, "killed", timeout=20)
    proc = subprocess.Popen([*CLI, "--url", hub_proc.url, "--token", hub_proc.token,
                             "events", "--after", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        while not (any(" result " in s and " kill " in s for s in lines)
                   and any(" offer " in s for s in lines)):
            line = proc.stdout.readline()
            assert line, lines
            lines.append(line)
    finally:
        proc.kill()
        proc.communicate()
    offer = next(s for s in lines if " offer " in s)
    result = next(s for s in lines if " result " in s and " kill " in s)
    assert "{" not in offer and "{" not in result, (offer, result)
    assert "cpus" in offer and "mem" in offer, offer
    assert "kill" in result and task_id[:12] in result, result
