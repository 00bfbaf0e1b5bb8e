"""Edge agent benchmark: what one agent costs on this box, next to what the box can do raw.

The figures the edge has promises about (submit latency, idle memory, supervising cost,
launch rate, offline-reboot recovery) are measured on a real ``python -m edge_agent`` process
over its real API, each beside a raw limit measured here in the same run, so a number from a
Raspberry Pi and one from a laptop can be read the same way: as a ratio.

"Running" is checked, not taken from the API: in the latency run every task's command writes
one byte into a FIFO the bench listens on, so the figure is the time until the command really
executes. The API's own answer (the POST already says ``running``) is reported beside it.

Memory is RSS where a goal is stated in RSS, and PSS (``/proc/<pid>/smaps_rollup``) beside a
raw process's PSS otherwise, with every helper process of ours counted: the agent's task
wrappers (``wrapper.sh``, one per running task); the tasks' own commands are the user's and
count on neither side. The reboot figure is also given less the restart backoff, which is
policy (``restart.backoff``), not overhead.

Agents get ``--cpus 4 --mem-mb 4096``: capacity is bookkeeping, and the bench wants the
agent's own costs rather than admission queues.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

from bench.common import (
    AgentProc,
    Api,
    Row,
    format_table,
    interpreter_start_s,
    kill_group,
    percentile,
    pid_alive,
    progress,
    pss_mb,
    raw_spawn_latencies,
    raw_spawn_rate,
    rss_mb,
    wrapper_pids,
)

CAPACITY = ["--cpus", "4", "--mem-mb", "4096"]
SMALL = {"cpus": 0.1, "mem_mb": 16}
TINY = {"cpus": 0.01, "mem_mb": 16}  # mem_mb 16, not 1: under rlimit isolation 1 MB cannot exec
SETTLE = 3.0
LATENCY_N = 200
QUOTA_N = 40
IDLE_TASKS = 100
CPU_WINDOW = 10.0
LAUNCH_N = 300
CLIENTS = 8
SERVICES = 20

EdgeRow = functools.partial(Row, area="edge")

# Run step by step in a fresh interpreter, printing VmRSS after each: where the memory goes.
# (label, code, when the agent does this if not at start). The agent's own lazy paths are
# called rather than named, so the steps follow whatever library they use today.
IMPORT_STEPS: tuple[tuple[str, str, str], ...] = (
    ("python interpreter", "", ""),
    ("asyncio", "import asyncio", ""),
    ("sqlite3", "import sqlite3", ""),
    ("aiohttp.web", "import aiohttp.web", ""),
    ("federation.app", "import federation.app", ""),
    ("edge_agent.agent", "import edge_agent.agent", ""),
    ("edge_agent.__main__, federation.log", "import edge_agent.__main__, federation.log", ""),
    ("node key (federation.identity)",
     "import tempfile, pathlib, shutil, federation.identity as i; d = tempfile.mkdtemp(); "
     "i.load_or_create_key(pathlib.Path(d) / 'k'); shutil.rmtree(d)",
     "first start only"),
    ("task spec validation (federation.schemas)",
     "import federation.schemas as s; s.validate_task_spec({'name': 'x', 'command': ['true']})",
     "on the first POST"),
    ("msgpack", "import msgpack", ""),
)
FIRST_START_STEPS = 8  # IMPORT_STEPS[:8] have run in a freshly started idle agent
LAZY_STEPS = 9  # and IMPORT_STEPS[8] once it has taken a task

_IMPORT_CHILD = """
import json, sys
def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
out = []
for label, code, _ in json.loads(sys.argv[1]):
    before = len(sys.modules)
    exec(code)
    out.append([label, rss_kb(), bool(code) and len(sys.modules) == before])
print(json.dumps(out))
"""

# The raw floor for supervising: a bare asyncio loop watching N sleeping children by pidfd,
# as the agent does, with nothing else. It kills its children when its stdin closes.
_SUPERVISOR_CHILD = """
import asyncio, os, signal, sys
async def main(n):
    loop = asyncio.get_running_loop()
    pids = []
    for _ in range(n):
        pid = os.posix_spawnp("sleep", ["sleep", "3600"], dict(os.environ), setsid=True)
        fd = os.pidfd_open(pid)
        loop.add_reader(fd, loop.remove_reader, fd)
        pids.append(pid)
    eof = loop.create_future()
    loop.add_reader(0, lambda: os.read(0, 1) or eof.done() or eof.set_result(None))
    print("ready", flush=True)
    try:
        await eof
    finally:
        for pid in pids:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
asyncio.run(main(int(sys.argv[1])))
"""


def _spec(name: str, command: list[str], resources: dict[str, Any], **extra: Any
          ) -> dict[str, Any]:
    return {"name": name, "command": command, "resources": resources, "kill_timeout": 1,
            **extra}


async def _concurrently(n: int, clients: int, job: Callable[[int], Awaitable[None]]) -> None:
    """Run ``job(0..n-1)`` with at most ``clients`` in flight."""
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await job(i)

    await asyncio.gather(*(worker() for _ in range(clients)))


def _ms(seconds: list[float], q: float) -> float:
    return percentile(seconds, q) * 1000


# ---------------------------------------------------------------- 2. idle memory


async def _import_steps() -> list[tuple[str, int, bool]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _IMPORT_CHILD, json.dumps(IMPORT_STEPS),
        stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
    out, _ = await proc.communicate()
    return [(label, kb, loaded) for label, kb, loaded in json.loads(out)]


async def bench_memory(agent: AgentProc) -> list[Row]:
    """Idle RSS of a fresh agent and of a restarted one, a bare interpreter, and the steps."""
    progress(f"idle memory ({2 * SETTLE:.0f} s settle)")
    bare = await asyncio.create_subprocess_exec(sys.executable, "-c",
                                                "import time; time.sleep(5)")
    steps_job = asyncio.create_task(_import_steps())
    await asyncio.sleep(SETTLE)
    fresh, bare_rss = rss_mb(agent.pid), rss_mb(bare.pid)
    fresh_pss, bare_pss = _family_pss(agent.pid), pss_mb(bare.pid)
    helpers = len(psutil.Process(agent.pid).children(recursive=True))
    bare.kill()
    await bare.wait()
    steps = await steps_job

    agent.stop()  # a second start finds its key and skips creating it: the steady state
    await agent.start()
    proc = psutil.Process(agent.pid)
    proc.cpu_percent(None)
    await asyncio.sleep(SETTLE)
    idle_cpu = proc.cpu_percent(None)
    restarted = rss_mb(agent.pid)
    restarted_pss = _family_pss(agent.pid)

    bare_what = "python -c 'import time; time.sleep(5)'"
    rows = [
        EdgeRow("idle RSS, first start (creates its key)", fresh, "MB", bare_rss,
                bare_what + ", RSS", "<= 40 MB", fresh <= 40, 1),
        EdgeRow("idle RSS, restart (key exists)", restarted, "MB", bare_rss, bare_what + ", RSS",
                "<= 40 MB", restarted <= 40, 1),
        EdgeRow(f"idle PSS, first start (agent + its {helpers} helper processes)", fresh_pss,
                "MB", bare_pss, bare_what + ", PSS", digits=1),
        EdgeRow("idle PSS, restart", restarted_pss, "MB", bare_pss, bare_what + ", PSS",
                digits=1),
        EdgeRow(f"idle CPU, % of one core (no tasks, {SETTLE:.0f} s)", idle_cpu, "%"),
    ]
    prev = 0
    for i, (label, kb, loaded) in enumerate(steps):
        if i == FIRST_START_STEPS:  # the rest of a fresh agent, before what it loads later
            rows.append(EdgeRow("  + runtime: store, app, socket, heap", fresh - prev / 1024,
                                "MB", None, f"first-start RSS minus the {i} steps above",
                                digits=1))
        when = IMPORT_STEPS[i][2]
        if i >= LAZY_STEPS and not when and not loaded:
            when = "not loaded by the agent at start or by a POST"
        note = f"{kb / 1024:.1f} MB cumulative" + (" (already loaded)" if loaded else "")
        if when:
            note += f"; {when}"
        rows.append(EdgeRow(f"  + {label}", (kb - prev) / 1024, "MB", None, note, digits=1))
        prev = kb
    return rows


# ---------------------------------------------------------------- 1. submit latency


class _Fifo:
    """A FIFO the bench reads: each task's command writes one byte when it truly runs."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self.rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.wfd = os.open(path, os.O_WRONLY)  # held so the reader never sees EOF between tasks
        self.waiter: asyncio.Future[float] | None = None
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.rfd, self._readable)

    def _readable(self) -> None:
        now = time.perf_counter()
        os.read(self.rfd, 4096)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(now)

    def arm(self) -> asyncio.Future[float]:
        self.waiter = self.loop.create_future()
        return self.waiter

    def command(self) -> list[str]:
        return ["dd", "if=/dev/zero", f"of={self.path}", "bs=1", "count=1", "status=none"]

    def close(self) -> None:
        self.loop.remove_reader(self.rfd)
        os.close(self.rfd)
        os.close(self.wfd)


async def _submit_one_at_a_time(api: Api, fifo: _Fifo, n: int, resources: dict[str, Any]
                                ) -> tuple[list[float], list[float], int, int, int]:
    """(seen latencies, POST latencies, POSTs saying running, commands seen, finished)."""
    seen: list[float] = []
    answered: list[float] = []
    said_running = finished = 0
    for _ in range(n):
        byte = fifo.arm()
        t0 = time.perf_counter()
        task = await api.submit(_spec("lat", fifo.command(), resources))
        answered.append(time.perf_counter() - t0)
        said_running += task["state"] == "running"
        try:
            seen.append(await asyncio.wait_for(byte, 5.0) - t0)
        except TimeoutError:
            pass
        end = await api.wait_state(task["id"], ("finished", "failed", "lost", "killed"))
        finished += end["state"] == "finished"
    return seen, answered, said_running, len(seen), finished


async def bench_latency(api: Api, base: Path) -> list[Row]:
    progress(f"submit-to-running latency ({LATENCY_N} tasks, one at a time)")
    raw = await raw_spawn_latencies(LATENCY_N)
    health = []
    for _ in range(LATENCY_N):
        t0 = time.perf_counter()
        await api.call("GET", "/v1/health")
        health.append(time.perf_counter() - t0)
    fifo = _Fifo(base / "ready.fifo")
    try:
        await _submit_one_at_a_time(api, fifo, 5, SMALL)  # warm-up: validators, caches
        seen, answered, said, ran, done = await _submit_one_at_a_time(
            api, fifo, LATENCY_N, SMALL)
        q_seen, *_ = await _submit_one_at_a_time(api, fifo, QUOTA_N, TINY)
        raw_same: list[float] = []
        for _ in range(LATENCY_N):
            byte = fifo.arm()
            t0 = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(*fifo.command())
            raw_same.append(await asyncio.wait_for(byte, 5.0) - t0)
            await proc.wait()
    finally:
        fifo.close()
    raw50, raw99 = _ms(raw, 50), _ms(raw, 99)
    same50, same99 = _ms(raw_same, 50), _ms(raw_same, 99)
    spawn = "asyncio spawn of true, until it returns"
    same = "asyncio spawn of the same dd, until its byte"
    p50 = _ms(seen, 50) if seen else float("nan")
    return [
        EdgeRow("submit->running p50 (command seen running)", p50, "ms", same50, same + " p50",
                "<= 3x raw", p50 <= 3 * same50),
        EdgeRow("submit->running p99 (command seen running)", _ms(seen, 99), "ms", same99,
                same + " p99"),
        EdgeRow("POST answered 'running' p50", _ms(answered, 50), "ms", raw50, spawn + " p50"),
        EdgeRow("POST answered 'running' p99", _ms(answered, 99), "ms", raw99, spawn + " p99"),
        EdgeRow(f"submit->running p50 at cpus={TINY['cpus']} (CFS quota)", _ms(q_seen, 50),
                "ms", same50, same + " p50"),
        EdgeRow("API round trip p50 (GET /v1/health)", _ms(health, 50), "ms", None,
                "HTTP floor inside the figures above"),
        EdgeRow("  checks", f"said running {said}/{LATENCY_N}, ran {ran}/{LATENCY_N}, "
                          f"finished {done}/{LATENCY_N}"),
    ]


# ---------------------------------------------------------------- 3. supervising idle tasks


def _family_pss(pid: int) -> float:
    """PSS of a process and every process under it (none for an idle agent: counted anyway)."""
    children = [c.pid for c in psutil.Process(pid).children(recursive=True)]
    return pss_mb(pid, *children)


async def bench_idle_tasks(api: Api, agent: AgentProc) -> list[Row]:
    progress(f"supervising {IDLE_TASKS} idle tasks ({CPU_WINDOW:.0f} s CPU window)")
    # One task first, so the per-task figure leaves out what any first POST loads.
    warm = await api.submit(_spec("warm", ["true"], SMALL))
    await api.wait_state(warm["id"], ("finished", "failed"))
    ids: list[str] = []

    async def submit(i: int) -> None:
        task = await api.submit(_spec(f"idle{i}", ["sleep", "3600"], TINY))
        ids.append(task["id"])

    await _concurrently(IDLE_TASKS, CLIENTS, submit)
    wanted = set(ids)
    running: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        running = [t for t in await api.tasks("state=running") if t["id"] in wanted]
        if len(running) == IDLE_TASKS:
            break
        await asyncio.sleep(0.1)
    alive = sum(pid_alive(t["pid"]) for t in running)

    helper = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SUPERVISOR_CHILD, str(IDLE_TASKS),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        assert helper.stdout is not None and helper.stdin is not None
        await asyncio.wait_for(helper.stdout.readline(), 30)
        await asyncio.sleep(1.0)
        procs = psutil.Process(agent.pid), psutil.Process(helper.pid)
        for p in procs:
            p.cpu_percent(None)
        await asyncio.sleep(CPU_WINDOW)
        cpu, raw_cpu = (p.cpu_percent(None) for p in procs)
        wrappers = wrapper_pids(agent.data_dir)
        agent_pss, wrappers_pss = pss_mb(agent.pid), pss_mb(*wrappers)
        raw_pss = pss_mb(helper.pid)
    finally:
        if helper.stdin is not None:
            helper.stdin.close()
        await helper.wait()

    progress(f"killing the {IDLE_TASKS} idle tasks")

    async def kill(i: int) -> None:
        await api.call("DELETE", f"/v1/tasks/{ids[i]}")

    await _concurrently(len(ids), CLIENTS, kill)
    for task_id in ids:
        await api.wait_state(task_id, ("killed", "finished", "failed", "lost"), within=15)

    floor = f"bare asyncio loop watching {IDLE_TASKS} pidfds"
    total = agent_pss + wrappers_pss
    return [
        EdgeRow(f"PSS supervising {IDLE_TASKS} idle tasks: agent + {len(wrappers)} wrappers",
                total, "MB", raw_pss, f"{floor}, PSS (tasks' own commands in neither)",
                digits=1),
        EdgeRow(f"  of which the {len(wrappers)} wrapper.sh processes", wrappers_pss, "MB",
                None, f"{wrappers_pss * 1024 / max(1, len(wrappers)):.0f} KB PSS each",
                digits=1),
        EdgeRow(f"CPU supervising {IDLE_TASKS} idle tasks, % of one core", cpu, "%",
                raw_cpu, f"{floor}, same {CPU_WINDOW:.0f} s", "< 2%", cpu < 2.0),
        EdgeRow("  checks", f"API running {len(running)}/{IDLE_TASKS}, "
                          f"alive {alive}/{IDLE_TASKS}"),
    ]


# ---------------------------------------------------------------- 4. launch rate


async def bench_launches(api: Api) -> list[Row]:
    progress(f"sustained launches ({LAUNCH_N} x true, {CLIENTS} clients)")
    ids: set[str] = set()
    ended: dict[str, str] = {}
    all_done = asyncio.Event()
    subscribed = asyncio.Event()

    async def watch() -> None:
        async for _, kind, data in api.events(subscribed):
            if kind == "task" and data.get("name") == "burst" and data["state"] in (
                    "finished", "failed", "lost", "killed"):
                ended[data["id"]] = data["state"]
                if len(ended) >= LAUNCH_N:
                    all_done.set()

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(subscribed.wait(), 10)

        async def submit(i: int) -> None:
            task = await api.submit(_spec("burst", ["true"], SMALL))
            ids.add(task["id"])

        t0 = time.perf_counter()
        await _concurrently(LAUNCH_N, CLIENTS, submit)
        t_posted = time.perf_counter() - t0
        try:
            await asyncio.wait_for(all_done.wait(), 120)
        except TimeoutError:
            pass
        elapsed = time.perf_counter() - t0
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    raw = await raw_spawn_rate(LAUNCH_N, CLIENTS)
    ok = sum(1 for tid, st in ended.items() if tid in ids and st == "finished")
    rate = len(ended) / elapsed
    return [
        EdgeRow(f"sustained launches ({LAUNCH_N} x true, until all exited)", rate, "/s", raw,
                f"asyncio spawn+wait of true, {CLIENTS} at a time", digits=0),
        EdgeRow("  submissions accepted", LAUNCH_N / t_posted, "/s", None,
                "POST rate while the tasks ran", digits=0),
        EdgeRow("  checks", f"ended {len(ended)}/{LAUNCH_N}, exit 0 {ok}/{LAUNCH_N}"),
    ]


# ---------------------------------------------------------------- 5. offline reboot


async def bench_reboot(base: Path) -> list[Row]:
    progress(f"offline reboot with {SERVICES} 'always' services")
    agent = AgentProc(base / "reboot", list(CAPACITY))
    await agent.start()
    try:
        async with Api(agent.url, agent.token) as api:
            services = [await api.submit(_spec(f"svc{i}", ["sleep", "3600"], TINY,
                                               restart={"policy": "always"}))
                        for i in range(SERVICES)]
            old = {t["id"]: (await api.wait_state(t["id"], ("running",)))["pid"]
                   for t in services}
        backoff = float(services[0]["restart"]["backoff"])
        agent.kill()
        for pid in old.values():
            kill_group(pid)
        for _ in range(1000):  # at most 10 s
            if not any(pid_alive(p) for p in old.values()):
                break
            await asyncio.sleep(0.01)

        await agent.start()
        up = time.perf_counter() - agent.started_at
        back: list[dict[str, Any]] = []
        async with Api(agent.url, agent.token) as api:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                back = [t for t in await api.tasks("state=running")
                        if t["id"] in old and t["pid"] != old[t["id"]]]
                if len(back) == SERVICES:
                    break
                await asyncio.sleep(0.01)
        recovered = time.perf_counter() - agent.started_at
        fresh = sum(1 for t in back if pid_alive(t["pid"]) and t["restarts"] == 1)
    finally:
        agent.stop()
    py = await interpreter_start_s()
    spawns = sum(await raw_spawn_latencies(SERVICES))
    return [
        EdgeRow("reboot: agent serving (URL written)", up, "s", py, "python -c pass"),
        EdgeRow(f"reboot: all {SERVICES} services running again", recovered, "s", None,
                f"includes the {backoff:.0f} s restart.backoff (policy)", "< 5 s",
                recovered < 5.0),
        EdgeRow(f"  the same less the {backoff:.0f} s backoff (our overhead)",
                recovered - backoff, "s", py + spawns, f"python -c pass + {SERVICES} spawns"),
        EdgeRow("  checks", f"running {len(back)}/{SERVICES}, new pid & restarts=1 "
                          f"{fresh}/{SERVICES}"),
    ]


# ---------------------------------------------------------------- all


async def _guarded(name: str, job: Awaitable[list[Row]]) -> list[Row]:
    """A failing figure becomes a row saying so; the other figures still run."""
    try:
        return await job
    except Exception as exc:  # a bench reports, it does not stop
        progress(f"{name} failed: {exc!r}")
        return [EdgeRow(f"{name}: FAILED", f"{type(exc).__name__}: {exc}"[:100])]


async def run_async() -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="outpost-bench-") as tmp:
        base = Path(tmp)
        agent = AgentProc(base / "edge", list(CAPACITY))
        progress("starting an edge agent")
        await agent.start()
        try:
            rows += await _guarded("idle memory", bench_memory(agent))
            async with Api(agent.url, agent.token, limit=CLIENTS) as api:
                rows += await _guarded("idle tasks", bench_idle_tasks(api, agent))
                rows += await _guarded("latency", bench_latency(api, base))
                rows += await _guarded("launches", bench_launches(api))
        finally:
            agent.stop()
        rows += await _guarded("reboot", bench_reboot(base))
    return rows


def run() -> list[Row]:
    """Every edge figure, each beside this machine's raw limit (about a minute)."""
    return asyncio.run(run_async())


if __name__ == "__main__":
    print(format_table(run()))
