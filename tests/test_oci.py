"""The OCI driver against real runc, umoci and skopeo: containers from a tiny busybox image
(tests/oci_images.py) on real agents and a real hub, with real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from federation.natsd import NatsServer
from tests.helpers import AgentProcess, HubProcess, joined, pid_alive, wait_until
from tests.oci_images import Images, oci_images  # noqa: F401  (the fixture)


def run_oci(agent: AgentProcess, name: str, image: Path, command: list[str],
            **spec: Any) -> dict[str, Any]:
    return agent.submit(name, command, driver="oci", image=str(image), **spec)


def logs(agent: AgentProcess, task_id: str, stream: str = "stdout") -> str:
    return agent.api("GET", f"/v1/tasks/{task_id}/logs?stream={stream}").raw.decode()


def runc_state(agent: AgentProcess, task_id: str) -> dict[str, Any] | None:
    done = subprocess.run(["runc", "--root", str(agent.data_dir / "runc"), "state",
                           f"outpost-{task_id}"], capture_output=True, text=True, check=False)
    return json.loads(done.stdout) if done.returncode == 0 else None


def running_where(hub: HubProcess, name: str) -> dict[str, str]:
    tasks = hub.api("GET", f"/v1/tasks?name={name}&state=running").body["items"]
    return {t["id"]: t["agent_id"] for t in tasks}


def container(agent: AgentProcess, task_id: str) -> dict[str, Any]:
    """The task's container once runc runs it (a task is running from its wrapper's start)."""
    return wait_until(lambda: (s := runc_state(agent, task_id)) is not None
                      and s["status"] == "running" and s, what="the container running")


def test_a_container_runs_from_each_image_format_with_logs_env_and_a_read_only_root(
        agent: AgentProcess, oci_images: Images) -> None:  # noqa: F811
    script = ("echo cwd=$(pwd) var=$IMAGE_VAR mine=$MINE; cat /etc/motd; "
              "touch /etc/x 2>/dev/null || echo root-read-only; echo out > /sandbox/result; "
              "echo to-stderr >&2; exit 3")
    tasks = [run_oci(agent, f"fmt{n}", image, ["/bin/sh", "-c", script], env={"MINE": "yes"})
             for n, image in enumerate([oci_images.layout, oci_images.archive,
                                        oci_images.docker])]
    for task in tasks:
        done = agent.wait_state(task["id"], "failed", timeout=30)
        assert done["exit_code"] == 3, done
        assert logs(agent, task["id"]) == ("cwd=/www var=from-image mine=yes\n"
                                           "hello from the image\nroot-read-only\n")
        assert logs(agent, task["id"], "stderr") == "to-stderr\n"
        sandbox = agent.data_dir / "tasks" / task["id"] / "sandbox"
        assert (sandbox / "result").read_text() == "out\n", "the sandbox is mounted"
        assert runc_state(agent, task["id"]) is None, "the ended container was deleted"
    info = agent.api("GET", "/v1/info").body
    oci = [d for d in info["drivers"] if d["name"] == "oci"]
    assert oci and oci[0]["runtime"] == "runc" and oci[0]["version"]
    # Layout, oci-archive and docker-save of the same image: all three are one cached rootfs
    # or (docker-save, re-encoded by skopeo) another digest; never one per task.
    assert len([p for p in (agent.data_dir / "images").iterdir() if p.is_dir()
                and not p.name.startswith(".")]) <= 2


def test_a_container_sees_none_of_the_hosts_processes_nor_its_network(
        agent: AgentProcess, oci_images: Images) -> None:  # noqa: F811
    task = run_oci(agent, "ps", oci_images.layout,
                   ["/bin/sh", "-c", "ps -o pid,args; echo; ls /sys/class/net; id -u; "
                                     "grep Cap /proc/self/status"],
                   oci={"user": "1000:1000"})
    agent.wait_state(task["id"], "finished", timeout=20)
    out = logs(agent, task["id"])
    table, nets, rest = out.split("\n\n")[0], out.split("\n\n")[1].split("\n"), out
    pids = [line.split()[0] for line in table.splitlines()[1:]]
    assert pids and pids[0] == "1" and len(pids) <= 3, table  # sh and ps, nothing of the host
    assert "python" not in table and "outpost" not in table
    assert nets[0] == "lo" and "eth0" not in nets, nets  # network none: loopback only
    assert "\n1000\n" in rest
    assert "CapEff:\t0000000000000000" in rest and "CapBnd:\t0000000000000000" in rest


def test_a_container_past_mem_mb_is_killed_with_that_reason(
        agent: AgentProcess, oci_images: Images) -> None:  # noqa: F811
    task = run_oci(agent, "hog", oci_images.layout,
                   ["/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=4"],
                   resources={"cpus": 0.5, "mem_mb": 16})
    done = agent.wait_state(task["id"], "failed", timeout=20)
    assert "out of memory" in done["reason"] and "mem_mb" in done["reason"], done
    assert done["exit_code"] == 137


def test_a_layer_writing_outside_the_rootfs_is_refused(
        agent: AgentProcess, oci_images: Images) -> None:  # noqa: F811
    task = run_oci(agent, "evil", oci_images.escaping, ["/bin/true"])
    done = agent.wait_state(task["id"], "failed", timeout=20)
    assert "writes outside the root filesystem" in done["reason"], done
    assert not oci_images.outside.exists()
    assert not list((agent.data_dir / "images").glob("sha256-*")), "nothing was unpacked"


@pytest.mark.parametrize("bad, field", [
    ({"driver": "oci"}, "image"),
    ({"image": "/x.tar"}, "image"),
    ({"driver": "oci", "image": "/x.tar", "oci": {"network": "bridge"}}, "oci.network"),
    ({"driver": "oci", "image": "/x.tar", "oci": {"user": "root"}}, "oci.user"),
    ({"driver": "oci", "image": "/x.tar", "oci": {"read_only_root": "no"}},
     "oci.read_only_root"),
    ({"driver": "oci", "image": "/x.tar", "oci": {"mounts": [
        {"source": "../../etc", "destination": "/etc2"}]}}, "oci.mounts.0.source"),
    ({"driver": "oci", "image": "/x.tar", "oci": {"mounts": [
        {"source": "data", "destination": "/proc/sys"}]}}, "oci.mounts.0.destination"),
    ({"driver": "oci", "image": "/x.tar", "oci": {"privileged": True}}, "oci"),
    ({"driver": "docker", "image": "/x.tar"}, "driver"),
    ({"driver": "oci", "image": "relative/x.tar"}, "image"),
    ({"driver": "oci", "image": "sha256:beef"}, "image"),
    ({"driver": "oci", "image": "busybox"}, "image"),
])
def test_bad_oci_options_are_a_clear_422(agent: AgentProcess, bad: dict[str, Any],
                                         field: str) -> None:
    resp = agent.api("POST", "/v1/tasks", {"name": "bad", "command": ["/bin/true"], **bad})
    assert resp.status == 422, resp.body
    assert resp.body["error"]["details"]["field"] == field, resp.body
    assert resp.body["error"]["message"]


def test_a_sigkilled_agent_readopts_its_container_and_still_supervises_it(
        start_agent: Callable[..., AgentProcess], oci_images: Images) -> None:  # noqa: F811
    agent = start_agent()
    task = run_oci(agent, "web", oci_images.archive,
                   ["/bin/httpd", "-f", "-p", "8080"], restart={"policy": "always"},
                   kill_timeout=1, health={"command": ["/bin/wget", "-q", "-O", "-",
                                                       "http://127.0.0.1:8080/"],
                                           "interval": 0.5})
    running = agent.wait_state(task["id"], "running", timeout=30)
    assert running["healthy"] is True, "the health check ran inside the container"
    init = container(agent, task["id"])
    agent.kill()
    assert pid_alive(running["pid"]) and pid_alive(init["pid"]), "the container outlives it"
    agent.start()
    now = agent.wait_state(task["id"], "running")
    assert now["pid"] == running["pid"] and now["restarts"] == 0
    assert runc_state(agent, task["id"])["pid"] == init["pid"], "the same container"
    metrics = agent.api("GET", "/metrics").raw.decode()
    assert "outpost_task_spawns_total 0.0" in metrics, "nothing was started again"
    assert agent.api("DELETE", f"/v1/tasks/{task['id']}").status == 202
    agent.wait_state(task["id"], "killed", timeout=15)
    assert not pid_alive(init["pid"]) and runc_state(agent, task["id"]) is None


def test_an_offline_reboot_brings_the_container_back_from_the_cached_rootfs(
        start_agent: Callable[..., AgentProcess], oci_images: Images,  # noqa: F811
        tmp_path: Path) -> None:
    image = tmp_path / "copy.tar"
    image.write_bytes(oci_images.archive.read_bytes())
    agent = start_agent()
    task = run_oci(agent, "svc", image, ["/bin/sleep", "600"], restart={"policy": "always"},
                   kill_timeout=1)
    first = agent.wait_state(task["id"], "running", timeout=30)
    init = container(agent, task["id"])
    # The 'reboot': the agent, the wrapper, runc and the container all die at once; the image
    # source is gone too (only the cached rootfs is left), and there is no core to ask.
    agent.kill()
    os.killpg(first["pid"], signal.SIGKILL)
    os.kill(init["pid"], signal.SIGKILL)
    wait_until(lambda: not pid_alive(init["pid"]) and not pid_alive(first["pid"]),
               what="everything dead")
    image.unlink()
    agent.start()
    again = agent.wait_state(task["id"], "running", timeout=20)
    assert again["pid"] != first["pid"] and again["restarts"] == 1
    assert container(agent, task["id"])["pid"] != init["pid"], "a new container, same id"


def path_without_runc(where: Path) -> str:
    """A PATH holding what the task wrapper needs, and no runc."""
    where.mkdir()
    for tool in ("mv", "cat", "sleep", "true", "rm"):
        found = shutil.which(tool)
        assert found is not None
        (where / tool).symlink_to(found)
    return str(where)


def test_a_container_service_spreads_over_two_sites_and_skips_an_agent_without_runc(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer, oci_images: Images, tmp_path: Path) -> None:  # noqa: F811
    no_runc = path_without_runc(tmp_path / "bin")
    assert shutil.which("runc", path=no_runc) is None
    a = joined(start_agent, hub_proc, nats_proc, "--site", "alpha", "--cpus", "1", name="a")
    b = joined(start_agent, hub_proc, nats_proc, "--site", "beta", "--cpus", "1", name="b")
    # The biggest agent, in both sites' way, but without runc: it must get no oci task.
    bare = joined(start_agent, hub_proc, nats_proc, "--site", "alpha", "--cpus", "8",
                  name="bare", env={"PATH": no_runc})
    ids = {n: x.api("GET", "/v1/info").body["agent_id"] for n, x in
           (("a", a), ("b", b), ("bare", bare))}
    wait_until(lambda: len(hub_proc.api("GET", "/v1/offers").body["items"]) == 3,
               what="offers from all three")
    agents = {x["id"]: x for x in hub_proc.api("GET", "/v1/agents").body["items"]}
    assert [d["name"] for d in agents[ids["bare"]]["drivers"]] == ["process"]
    assert "oci" in [d["name"] for d in agents[ids["a"]]["drivers"]]
    resp = hub_proc.api("POST", "/v1/services", {
        "name": "web", "instances": 2, "constraints": {"unique": "site"},
        "task": {"command": ["/bin/httpd", "-f", "-p", "8080"], "driver": "oci",
                 "image": str(oci_images.archive), "kill_timeout": 1,
                 "resources": {"cpus": 0.1, "mem_mb": 16}}})
    assert resp.status == 201, resp.body
    where = wait_until(lambda: len(w := running_where(hub_proc, "web")) == 2 and w,
                       timeout=30, what="two container instances running")
    assert set(where.values()) == {ids["a"], ids["b"]}, "one per site, none on the bare agent"
    for task_id, agent_id in where.items():
        edge = a if agent_id == ids["a"] else b
        assert container(edge, task_id)["status"] == "running"
    # Pinned to the agent without runc, a container task waits and says why.
    task = hub_proc.api("POST", "/v1/tasks", {
        "name": "pinned", "command": ["/bin/true"], "driver": "oci",
        "image": str(oci_images.archive), "constraints": {"agent": ids["bare"]}}).body
    pending = wait_until(lambda: (t := hub_proc.api("GET", f"/v1/tasks/{task['id']}").body)
                         ["reason"] and "oci driver" in t["reason"] and t,
                         what="a reason naming the driver")
    assert pending["state"] == "pending", pending
    assert not bare.api("GET", "/v1/tasks").body["items"], "nothing reached the bare agent"
    # Bad container options are a 422 at the core too.
    bad = hub_proc.api("POST", "/v1/tasks", {"name": "bad", "command": ["/bin/true"],
                                             "driver": "oci", "image": "/x",
                                             "oci": {"network": "bridge"}})
    assert bad.status == 422 and bad.body["error"]["details"]["field"] == "oci.network"


def test_the_cli_runs_a_container_at_the_edge(agent: AgentProcess,
                                              oci_images: Images) -> None:  # noqa: F811
    cli = [sys.executable, "-m", "federation.cli", "--url", agent.url, "--token", agent.token]
    done = subprocess.run([*cli, "tasks", "run", "web", "--image", str(oci_images.archive),
                           "--mount", "data:/data", "--", "/bin/httpd", "-f", "-p", "8080"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.strip().split()[-1]
    task = agent.wait_state(task_id, "running", timeout=30)
    assert task["driver"] == "oci" and task["image"] == str(oci_images.archive)
    assert task["oci"]["mounts"] == [{"source": "data", "destination": "/data",
                                      "read_only": False}]
    assert container(agent, task_id)["status"] == "running"
    shown = subprocess.run([*cli, "tasks", "get", task_id], capture_output=True, text=True,
                           timeout=30, check=False).stdout
    assert "oci" in shown and str(oci_images.archive) in shown
    wrong = subprocess.run([*cli, "tasks", "run", "x", "--network", "host", "--", "/bin/true"],
                           capture_output=True, text=True, timeout=30, check=False)
    assert wrong.returncode != 0 and "--image" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_an_exit_code_while_the_agent_was_down_is_kept(
        start_agent: Callable[..., AgentProcess], oci_images: Images) -> None:  # noqa: F811
    agent = start_agent()
    gate = agent.data_dir / "tasks"
    task = run_oci(agent, "job", oci_images.layout,
                   ["/bin/sh", "-c", "while [ ! -e /sandbox/go ]; do sleep 0.05; done; exit 7"])
    agent.wait_state(task["id"], "running", timeout=20)
    container(agent, task["id"])
    agent.kill()
    (gate / task["id"] / "sandbox" / "go").touch()
    wait_until(lambda: runc_state(agent, task["id"]) is None
               or runc_state(agent, task["id"])["status"] == "stopped",
               what="the container to end while no agent runs")
    agent.start()
    done = agent.wait_state(task["id"], "failed", timeout=20)
    assert done["exit_code"] == 7 and "while the agent was down" in done["reason"], done
    assert runc_state(agent, task["id"]) is None, "the stopped container was deleted"


def test_the_rootfs_cache_is_bounded_and_keeps_what_tasks_use(
        tmp_path: Path, oci_images: Images) -> None:  # noqa: F811
    from edge_agent.oci_image import ImageCache

    refs = []
    for n in range(3):  # three images, three manifest digests
        layout = tmp_path / f"img{n}"
        shutil.copytree(oci_images.layout, layout)
        subprocess.run(["umoci", "config", "--image", f"{layout}:v1", "--config.env",
                        f"N={n}"], check=True, capture_output=True)
        refs.append(str(layout))
    in_use: set[str] = set()
    cache = ImageCache(tmp_path / "cache", lambda: in_use, max_entries=2)
    first = cache.unpack(refs[0])
    in_use.add(first.digest)  # a task runs the first image
    os.utime(cache.entry(first.digest), (1, 1))  # and it is the least recently used
    second = cache.unpack(refs[1])
    third = cache.unpack(refs[2])
    assert cache.evict() == [second.digest], "the oldest unused entry leaves, not the used one"
    assert first.rootfs.is_dir() and third.rootfs.is_dir() and not second.rootfs.exists()
    assert cache.cached(refs[1]) is None and cache.cached(refs[0]) == first
    assert (first.rootfs / "bin" / "busybox").is_file() and cache.unpacks == 3


def test_a_writable_root_is_the_tasks_own_copy(agent: AgentProcess,
                                               oci_images: Images) -> None:  # noqa: F811
    task = run_oci(agent, "rw", oci_images.layout,
                   ["/bin/sh", "-c", "echo changed > /etc/motd && cat /etc/motd"],
                   oci={"read_only_root": False})
    agent.wait_state(task["id"], "finished", timeout=20)
    assert logs(agent, task["id"]) == "changed\n"
    shared = next((agent.data_dir / "images").glob("sha256-*")) / "rootfs" / "etc" / "motd"
    assert shared.read_text() == "hello from the image\n", "the cached rootfs is untouched"
    ro = run_oci(agent, "ro", oci_images.layout, ["/bin/cat", "/etc/motd"])
    agent.wait_state(ro["id"], "finished", timeout=20)
    assert logs(agent, ro["id"]) == "hello from the image\n"


def _push_image(node: HubProcess | AgentProcess, path: Path, name: str, version: str
                ) -> dict[str, Any]:
    resp = node.api("POST", f"/v1/artifacts?name={name}&version={version}",
                    raw=path.read_bytes(), headers={"Content-Type": "application/octet-stream"},
                    timeout=60)
    assert resp.status == 201, resp.body
    return resp.body


def test_an_image_pushed_at_the_core_runs_as_a_service_on_two_sites(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer, oci_images: Images) -> None:  # noqa: F811
    """Images are artifacts: pushed once at the core, fetched and verified by each edge,
    unpacked from the artifact cache; deleting it while a container uses it is refused."""
    art = _push_image(hub_proc, oci_images.archive, "busybox", "1.36")
    a = joined(start_agent, hub_proc, nats_proc, "--site", "alpha", name="a")
    b = joined(start_agent, hub_proc, nats_proc, "--site", "beta", name="b")
    wait_until(lambda: len(hub_proc.api("GET", "/v1/offers").body["items"]) == 2,
               what="offers from both")
    resp = hub_proc.api("POST", "/v1/services", {
        "name": "web", "instances": 2, "constraints": {"unique": "site"},
        "task": {"command": ["/bin/httpd", "-f", "-p", "8080"], "driver": "oci",
                 "image": "busybox:1.36", "kill_timeout": 1,
                 "resources": {"cpus": 0.1, "mem_mb": 16}}})
    assert resp.status == 201, resp.body
    where = wait_until(lambda: len(w := running_where(hub_proc, "web")) == 2 and w,
                       timeout=40, what="two container instances from the artifact image")
    ids = {x.api("GET", "/v1/info").body["agent_id"]: x for x in (a, b)}
    assert set(where.values()) == set(ids)
    for task_id, agent_id in where.items():
        edge = ids[agent_id]
        assert container(edge, task_id)["status"] == "running"
        held = edge.api("GET", f"/v1/artifacts/{art['digest']}").body
        assert task_id in held["in_use_by"], held
    # In use by live containers: neither the core nor an edge deletes it.
    gone = hub_proc.api("DELETE", f"/v1/artifacts/{art['digest']}")
    assert gone.status == 409, gone.body
    assert a.api("DELETE", f"/v1/artifacts/{art['digest']}").status == 409
    # By digest too, on one edge alone: the cache serves it (no second fetch).
    task = a.submit("again", ["/bin/true"], driver="oci", image=art["digest"])
    done = a.wait_state(task["id"], "finished", "failed", timeout=30)
    assert done["state"] == "finished" and done["exit_code"] == 0, done


def test_an_artifact_image_that_is_not_there_keeps_the_task_staging_with_a_reason(
        agent: AgentProcess) -> None:
    task = agent.submit("later", ["/bin/true"], driver="oci", image="nothing:1.0")
    staged = wait_until(lambda: (t := agent.api("GET", f"/v1/tasks/{task['id']}").body)
                        ["reason"] and "waiting for the image artifact" in t["reason"] and t,
                        timeout=20, what="a staging reason")
    assert staged["state"] == "staging", staged
