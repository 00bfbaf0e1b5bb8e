"""The OCI driver against real runc, umoci and skopeo: containers from a tiny busybox image
(tests/oci_images.py) on real agents and a real hub, with real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import AgentProcess, pid_alive, wait_until
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
