"""Container benchmark: what the OCI driver adds on top of runc and umoci, in the same run.

- Submit -> running of an ``oci`` task whose image is cached, through a real agent's API,
  against ``runc run`` of the very bundle the agent wrote (copied, its own sandbox), started
  directly. "Running" is checked the same way on both sides: the container's command writes
  ``/sandbox/up`` and the bench polls for that file, so both figures end when the command in
  the container really runs (goal: at most 1.5x the direct run).
- Image unpack: the agent's image cache (oci-archive in, layers checked, ``umoci unpack``,
  entry made) against ``umoci unpack`` of the same image's layout alone.
- Memory with 20 containers running: PSS of the agent with every helper process of ours
  (the task wrappers and the foreground ``runc run`` under each), beside 20 ``runc run``
  started directly (their PSS), the floor any runc-based driver pays. The containers' own
  commands are the user's and count on neither side.

Skipped with a row saying so when runc, umoci or skopeo is missing.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import AgentProc, Api, Row, percentile, progress, pss_mb, wrapper_pids

OciRow = functools.partial(Row, area="oci")
LATENCY_N = 15
UNPACK_N = 5
MEMORY_N = 20
POLL = 0.001
UP = ["/bin/sh", "-c", "echo up > /sandbox/up; exec sleep 600"]
TOOLS = ("runc", "umoci", "skopeo", "busybox")


def run() -> list[Row]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        progress(f"oci: skipped, missing {missing}")
        return [OciRow("containers", f"skipped: {', '.join(missing)} not installed")]
    from tests.oci_images import build_busybox

    base = Path(tempfile.mkdtemp(prefix="outpost-bench-oci-"))
    try:
        layout = build_busybox(base / "img")
        _add_bulk_layer(layout, base / "bulk")
        archive = base / "image.tar"
        subprocess.run(["tar", "-cf", str(archive), "-C", str(layout), "."], check=True)
        rows = _unpack_rows(layout, archive, base / "unpack")
        return rows + asyncio.run(_agent_rows(archive, base))
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def _agent_rows(archive: Path, base: Path) -> list[Row]:
    agent = await AgentProc(base / "agent", ["--cpus", "8", "--mem-mb", "8192"]).start()
    try:
        async with Api(agent.url, agent.token) as api:
            return (await _latency_rows(api, agent, archive, base)
                    + await _memory_rows(api, agent, archive, base))
    finally:
        agent.stop()
        _delete_all(agent.data_dir / "runc")


def _add_bulk_layer(layout: Path, work: Path) -> None:
    """A second layer of 24 MB in 192 files, so unpacking has something to do."""
    bundle = work / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)], check=True,
                   capture_output=True)
    data = bundle / "rootfs" / "data"
    data.mkdir()
    for n in range(192):
        (data / f"f{n:03d}").write_bytes(os.urandom(128 * 1024))
    subprocess.run(["umoci", "repack", "--image", f"{layout}:v1", str(bundle)], check=True,
                   capture_output=True)
    shutil.rmtree(work)


# ---------------------------------------------------------------- unpack


def _unpack_rows(layout: Path, archive: Path, work: Path) -> list[Row]:
    from edge_agent.oci_image import ImageCache

    progress("oci: image unpack")
    ours, raw = [], []
    for n in range(UNPACK_N):
        cache = ImageCache(work / f"cache{n}", set)
        t0 = time.perf_counter()
        cache.unpack(str(archive))
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:v1", str(work / f"raw{n}")],
                       check=True, capture_output=True)
        raw.append(time.perf_counter() - t0)
    shutil.rmtree(work, ignore_errors=True)
    med, raw_med = percentile(ours, 50) * 1000, percentile(raw, 50) * 1000
    return [OciRow("image unpack, oci-archive 24 MB (median)", med, "ms", raw_med,
                   "umoci unpack of the layout alone", digits=0)]


# ---------------------------------------------------------------- latency


async def _wait_file(path: Path, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared")
        await asyncio.sleep(POLL)


def _spec(name: str, archive: Path, command: list[str]) -> dict[str, Any]:
    return {"name": name, "command": command, "driver": "oci", "image": str(archive),
            "resources": {"cpus": 0.1, "mem_mb": 32}, "kill_timeout": 0}


async def _latency_rows(api: Api, agent: AgentProc, archive: Path, base: Path) -> list[Row]:
    progress("oci: submit -> running, cached image, vs runc run")
    warm = await api.submit(_spec("warm", archive, UP))  # unpacks the image once
    await _wait_file(agent.data_dir / "tasks" / warm["id"] / "sandbox" / "up", 60)
    bundle_config = json.loads(
        (agent.data_dir / "tasks" / warm["id"] / "bundle" / "config.json").read_text())
    await _stop(api, warm["id"])
    ours, raw = [], []
    runc_root = base / "raw-runc"
    for n in range(LATENCY_N):
        t0 = time.perf_counter()
        task = await api.submit(_spec(f"lat{n}", archive, UP))
        await _wait_file(agent.data_dir / "tasks" / task["id"] / "sandbox" / "up")
        ours.append(time.perf_counter() - t0)
        await _stop(api, task["id"])
        bundle = _raw_bundle(bundle_config, base / f"raw{n}", f"outpost-bench-raw/{n}")
        t0 = time.perf_counter()
        proc = await _runc_run(runc_root, bundle, f"raw{n}")
        await _wait_file(bundle / "sandbox" / "up")
        raw.append(time.perf_counter() - t0)
        _runc(runc_root, "kill", f"raw{n}", "KILL")
        await proc.wait()
        _runc(runc_root, "delete", "--force", f"raw{n}")
    med, raw_med = percentile(ours, 50) * 1000, percentile(raw, 50) * 1000
    p90 = percentile(ours, 90) * 1000
    return [
        OciRow("submit -> running, oci, image cached (median)", med, "ms", raw_med,
               "runc run of the same bundle", goal="<= 1.5x runc run",
               met=med <= 1.5 * raw_med, digits=1),
        OciRow("submit -> running, oci, image cached (p90)", p90, "ms",
               percentile(raw, 90) * 1000, "runc run, p90", digits=1),
    ]


def _raw_bundle(config: dict[str, Any], where: Path, cgroup: str) -> Path:
    """The agent's bundle again, with a sandbox and a cgroup of its own."""
    sandbox = where / "sandbox"
    sandbox.mkdir(parents=True)
    cfg = json.loads(json.dumps(config))
    for mount in cfg["mounts"]:
        if mount["destination"] == "/sandbox":
            mount["source"] = str(sandbox)
    cfg["linux"]["cgroupsPath"] = cgroup
    (where / "config.json").write_text(json.dumps(cfg))
    return where


async def _stop(api: Api, task_id: str) -> None:
    await api.call("DELETE", f"/v1/tasks/{task_id}")
    await api.wait_state(task_id, ("killed", "finished", "failed"), within=20)


async def _runc_run(root: Path, bundle: Path, name: str) -> asyncio.subprocess.Process:
    """``runc run`` in the foreground, as the agent's wrapper runs it."""
    return await asyncio.create_subprocess_exec(
        "runc", "--root", str(root), "run", "--keep", "--no-new-keyring", "-b", str(bundle),
        name, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _runc(root: Path, *args: str) -> None:
    subprocess.run(["runc", "--root", str(root), *args], capture_output=True, check=False)


def _delete_all(root: Path) -> None:
    if root.is_dir():
        for entry in root.iterdir():
            _runc(root, "delete", "--force", entry.name)


# ---------------------------------------------------------------- memory


def _helpers(data_dir: Path) -> list[int]:
    """The wrappers and, under each, its foreground runc (not the container's processes)."""
    pids = []
    for wrapper in wrapper_pids(data_dir):
        pids.append(wrapper)
        for child in psutil.Process(wrapper).children():
            if child.name() == "runc":
                pids.append(child.pid)
    return pids


async def _memory_rows(api: Api, agent: AgentProc, archive: Path, base: Path) -> list[Row]:
    progress(f"oci: memory with {MEMORY_N} containers")
    tasks = [await api.submit(_spec(f"mem{n}", archive, UP)) for n in range(MEMORY_N)]
    for task in tasks:
        await _wait_file(agent.data_dir / "tasks" / task["id"] / "sandbox" / "up")
    await asyncio.sleep(1.0)  # let the agent settle after the burst
    helpers = _helpers(agent.data_dir)
    ours = pss_mb(agent.pid, *helpers)
    alone = pss_mb(agent.pid)
    runcs = len(helpers) - len(wrapper_pids(agent.data_dir))
    for task in tasks:
        await api.call("DELETE", f"/v1/tasks/{task['id']}")
    # The floor: 20 foreground runc run, started directly.
    config = json.loads(
        (agent.data_dir / "tasks" / tasks[0]["id"] / "bundle" / "config.json").read_text())
    root = base / "mem-runc"
    procs = []
    try:
        for n in range(MEMORY_N):
            bundle = _raw_bundle(config, base / f"mem{n}", f"outpost-bench-mem/{n}")
            procs.append(await _runc_run(root, bundle, f"mem{n}"))
        for n in range(MEMORY_N):
            await _wait_file(base / f"mem{n}" / "sandbox" / "up")
        await asyncio.sleep(1.0)
        raw = pss_mb(*(p.pid for p in procs))
    finally:
        for n in range(MEMORY_N):
            _runc(root, "kill", f"mem{n}", "KILL")
        for p in procs:
            await p.wait()
        _delete_all(root)
    for task in tasks:
        await api.wait_state(task["id"], ("killed", "finished", "failed"), within=30)
    return [
        OciRow(f"PSS, agent + {len(helpers)} helpers ({runcs} runc), {MEMORY_N} containers",
               ours, "MB", raw, f"{MEMORY_N} runc run alone", digits=1),
        OciRow(f"PSS, agent process alone, {MEMORY_N} containers", alone, "MB", digits=1),
    ]


if __name__ == "__main__":
    from bench.common import format_table

    print(format_table(run()))
