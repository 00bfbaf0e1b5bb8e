"""Test helpers that start real Outpost processes and talk to them over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
               what: str = "condition") -> Any:
    """Poll ``cond`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


async def wait_until_async(cond: Callable[[], Any], within: float = 10.0,
                           interval: float = 0.05, what: str = "condition") -> Any:
    """``wait_until`` for a coroutine test whose condition is a state of this event loop (a
    client's connection): the loop must run between polls for the state to move."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {within}s waiting for {what} (last: {last!r})")


# Ports a test names itself (a demo, a cluster's routes) come from below Linux's ephemeral range
# (32768-60999), where bind(("", 0)) and every outgoing connection take theirs: a port picked
# with bind(0) and released could be taken by another test process's connection before use.
FIXED_PORTS = (20000, 32000)


_HANDED_OUT: set[int] = set()  # this process never hands the same port out twice


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports, free now, outside the ephemeral range (see FIXED_PORTS)."""
    ports: list[int] = []
    while len(ports) < n:
        port = random.randrange(*FIXED_PORTS)
        if port in _HANDED_OUT:
            continue
        _HANDED_OUT.add(port)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


def free_port() -> int:
    return free_ports(1)[0]


APT_LOCK = Path("/tmp/outpost-tests-apt.lock")


def apt_install(packages: list[str], ready: Callable[[], bool], budget_s: float) -> None:
    """``apt-get install`` ``packages`` unless ``ready()`` (after an ``apt-get update`` if the
    first try fails), within ``budget_s``. One test process at a time (the suite runs in
    several): the others wait on a lock, then find the packages there."""
    if ready() or shutil.which("apt-get") is None:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + budget_s
    with APT_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        for step in (["install", "-y", *packages], ["update"], ["install", "-y", *packages]):
            left = deadline - time.monotonic()
            if left <= 0 or ready():
                return
            try:  # dpkg's own lock too: wait for it rather than fail (another apt, say)
                subprocess.run(["apt-get", "-o", f"DPkg::Lock::Timeout={int(left)}", *step],
                               capture_output=True, timeout=left, env=env, check=False)
            except (subprocess.TimeoutExpired, OSError):
                pass


@dataclass
class Response:
    status: int
    body: Any
    headers: dict[str, str]
    raw: bytes


def http(method: str, url: str, body: Any = None, token: str | None = None,
         raw: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 10.0) -> Response:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = resp.read()
            status, hdrs = resp.status, dict(resp.headers)
    except urllib.error.HTTPError as err:
        payload, status, hdrs = err.read(), err.code, dict(err.headers)
    try:
        parsed = json.loads(payload) if payload else None
    except ValueError:
        parsed = None
    return Response(status, parsed, hdrs, payload)


@dataclass
class AgentProcess:
    """A real ``outpost-agent`` process with its own data dir, on a free loopback port."""

    data_dir: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    token: str = ""
    env: dict[str, str] = field(default_factory=dict)  # OUTPOST_* set for this agent only

    def start(self, timeout: float = 15.0) -> AgentProcess:
        url_file = self.data_dir / "agent.url"
        if url_file.exists():
            url_file.unlink()
        log = open(self.data_dir.parent / f"{self.data_dir.name}.log", "ab")  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
        env.update(self.env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "--data-dir", str(self.data_dir),
             "--listen", "127.0.0.1:0", *self.args],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        log.close()
        wait_until(lambda: url_file.exists() or self.proc.poll() is not None, timeout,
                   what="agent to start")
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}: {self.log()}")
        self.url = url_file.read_text()
        self.token = (self.data_dir / "admin.token").read_text().strip()
        return self

    def log(self) -> str:
        path = self.data_dir.parent / f"{self.data_dir.name}.log"
        return path.read_text() if path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: the agent dies at once; its tasks live on."""
        self.stop(signal.SIGKILL)

    def api(self, method: str, path: str, body: Any = None, **kw: Any) -> Response:
        kw.setdefault("token", self.token)
        return http(method, self.url + path, body, **kw)

    def submit(self, name: str, command: list[str], **spec: Any) -> dict[str, Any]:
        resp = self.api("POST", "/v1/tasks", {"name": name, "command": command, **spec})
        assert resp.status == 201, resp.body
        return resp.body

    def task(self, task_id: str) -> dict[str, Any]:
        resp = self.api("GET", f"/v1/tasks/{task_id}")
        assert resp.status == 200, resp.body
        return resp.body

    def task_if_here(self, task_id: str) -> dict[str, Any] | None:
        """The task, or None while this agent has not got it yet (a launch from the core is
        on its way: asking at once may find nothing)."""
        resp = self.api("GET", f"/v1/tasks/{task_id}")
        if resp.status == 404:
            return None
        assert resp.status == 200, resp.body
        return resp.body

    def wait_state(self, task_id: str, *states: str, timeout: float = 10.0) -> dict[str, Any]:
        return wait_until(lambda: (t := self.task_if_here(task_id)) is not None
                          and t["state"] in states and t,
                          timeout, what=f"task {task_id} in {states}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def read_events(url: str, token: str, after: int = 0,
                timeout: float = 5.0) -> list[tuple[int, str, Any]]:
    """Every event a node has after ``after``, read from ``/v1/events`` (SSE) until the newest.

    The newest id is taken from ``/metrics`` first, so the read ends instead of waiting for more.
    """
    metrics = http("GET", url + "/metrics", token=token).raw.decode()
    newest = int(float(next(line.split()[-1] for line in metrics.splitlines()
                            if line.startswith("outpost_events_last_seq "))))
    out: list[tuple[int, str, Any]] = []
    if newest <= after:
        return out
    req = urllib.request.Request(f"{url}/v1/events?after={after}",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=timeout) as stream:
        ident, kind, data = 0, "", None
        while True:
            line = stream.readline().decode().rstrip("\n")
            if line.startswith("id: "):
                ident = int(line[4:])
            elif line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif line == "" and data is not None:
                out.append((ident, kind, data))
                data = None
                if ident >= newest:
                    return out


@dataclass
class HubProcess:
    """A real ``outpost-hub run`` process using an existing NATS (so tests can break NATS), or
    with ``embedded`` its own NATS (least privilege on; ``nats_url`` is read from the hub)."""

    data_dir: Path
    nats_url: str
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    token: str = ""
    embedded: bool = False

    def start(self, timeout: float = 20.0, *, wait: bool = True) -> HubProcess:
        """Start the process; with ``wait`` (the default) return once it serves. A standby
        replica serves only once it holds the lease: ``wait=False``, then ``serving()``."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        url_file = self.data_dir / "hub.url"
        url_file.unlink(missing_ok=True)
        (self.data_dir / "nats.url").unlink(missing_ok=True)
        log = open(self.data_dir.parent / f"{self.data_dir.name}.log", "ab")  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
        nats_args = (["--embedded-nats", "--nats-port", "0"] if self.embedded
                     else ["--nats", self.nats_url])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "core_hub", "run", "--data-dir", str(self.data_dir),
             *nats_args, "--listen", "127.0.0.1:0", *self.args],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        log.close()
        return self.serving(timeout) if wait else self

    def serving(self, timeout: float = 20.0) -> HubProcess:
        """Wait until the hub serves its API (its url file is written)."""
        assert self.proc is not None
        url_file = self.data_dir / "hub.url"
        wait_until(lambda: url_file.exists() or self.proc.poll() is not None, timeout,
                   what="hub to start")
        if self.proc.poll() is not None:
            raise AssertionError(f"hub exited with {self.proc.returncode}: {self.log()}")
        self.url = url_file.read_text()
        self.token = (self.data_dir / "admin.token").read_text().strip()
        if self.embedded:  # written just after hub.url
            nats_file = self.data_dir / "nats.url"
            wait_until(nats_file.exists, 5, what="the hub's nats.url")
            self.nats_url = nats_file.read_text()
        return self

    def leading(self, timeout: float = 20.0) -> HubProcess:
        """Wait until this replica serves as the leader (a standby serves too: reads from its
        own view, writes forwarded to the leader)."""
        deadline = time.monotonic() + timeout
        self.serving(timeout)
        wait_until(lambda: self.proc is not None and (self.proc.poll() is not None or _replica_mode(
            self) == "leader"), max(1.0, deadline - time.monotonic()), what="hub to lead")
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"hub exited with {self.proc.returncode}: {self.log()}")
        return self

    def log(self) -> str:
        path = self.data_dir.parent / f"{self.data_dir.name}.log"
        return path.read_text() if path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def join_token(self, uses: int = 10) -> str:
        """A join token from ``outpost-hub token create``, run in this process: the same
        code against the hub's data dir, without a second of interpreter start per agent
        (tests/test_cli_hub.py runs the command itself)."""
        from core_hub.__main__ import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["token", "create", "--data-dir", str(self.data_dir), "--ttl", "3600",
                         "--uses", str(uses)])
        assert code == 0, f"token create exited with {code}"
        return out.getvalue().strip()

    def api(self, method: str, path: str, body: Any = None, **kw: Any) -> Response:
        kw.setdefault("token", self.token)
        return http(method, self.url + path, body, **kw)


def task_states(node: Any) -> dict[str, tuple[str, int]]:
    """Every task a node (edge or core) lists, as id -> (state, restarts), following cursors."""
    out: dict[str, tuple[str, int]] = {}
    cursor = None
    while True:
        page = node.api("GET", "/v1/tasks?limit=1000" + (f"&cursor={cursor}" if cursor else ""))
        assert page.status == 200, page.body
        for t in page.body["items"]:
            out[t["id"]] = (t["state"], t["restarts"])
        cursor = page.body["next_cursor"]
        if cursor is None:
            return out


def joined(start_agent: Callable[..., AgentProcess], hub: HubProcess, nats: Any,
           *args: str, name: str = "agent", **kw: Any) -> AgentProcess:
    """An agent started with ``args`` (``kw``: more for ``start_agent``, e.g. ``env``) that
    has enrolled with ``hub`` and shows online there."""
    agent = start_agent("--nats", nats.url, "--join-token", hub.join_token(), "--heartbeat",
                        "0.5", *args, name=name, **kw)
    info = agent.api("GET", "/v1/info").body

    def online() -> bool:
        agents = hub.api("GET", "/v1/agents").body["items"]
        return any(a["id"] == info["agent_id"] and a["status"] == "online" for a in agents)

    wait_until(online, timeout=15, what="agent enrolled and online at the hub")
    return agent


def converged(edge: AgentProcess, core: HubProcess, timeout: float = 30.0) -> None:
    """The core lists exactly the edge's tasks with the same states and restart counts, and the
    edge's outbox is empty."""
    def same() -> bool:
        link = edge.api("GET", "/v1/info").body["link"]
        return link["outbox_depth"] == 0 and task_states(core) == task_states(edge)

    try:
        wait_until(same, timeout, interval=0.2, what="core view == edge view")
    except AssertionError:
        e, c = task_states(edge), task_states(core)
        diff = {k: (e.get(k), c.get(k)) for k in set(e) | set(c) if e.get(k) != c.get(k)}
        raise AssertionError(f"views differ on {len(diff)} tasks, e.g. "
                             f"{list(diff.items())[:5]}") from None


def command_results(hub_dir: Path) -> list[tuple[str, str]]:
    """(command id, status) of every command result the hub has recorded, oldest first."""
    db = sqlite3.connect(f"file:{hub_dir / 'hub.db'}?mode=ro", uri=True)
    try:
        return [(r[0], r[1]) for r in db.execute(
            "SELECT command_id, status FROM results ORDER BY ts")]
    finally:
        db.close()


async def publish_command(url: str, agent_id: str, data: bytes) -> int:
    """Append ``data`` as the agent's next command, as the hub's CommandLog does (a test
    playing the hub, or an attacker with the hub's rights); returns its number."""
    import uuid

    import nats

    from federation.commandlog import CommandLog

    nc = await nats.connect(url)
    try:
        return await CommandLog(nc.jetstream()).append(agent_id, data, uuid.uuid4().hex)
    finally:
        await nc.close()


async def publish_raw(url: str, subject: str, data: bytes) -> None:
    """Publish ``data`` to JetStream as-is (a test playing the hub, or an attacker)."""
    import nats

    nc = await nats.connect(url)
    try:
        await nc.jetstream().publish(subject, data)
    finally:
        await nc.close()


# -- NATS logins (operator mode: core_hub/natsauth.py) ----------------------------------------

def hub_nats_creds(data_dir: Path, *, setup: bool = False) -> Any:
    """The hub's NATS login (its user JWT made from its data dir's keys, as the hub does), or
    the plain nkey one for a hub without NATS auth."""
    from core_hub.natsauth import SETUP_KEY_FILE, NatsOperator
    from federation.natscreds import hub_credentials

    if NatsOperator.exists(data_dir):
        return NatsOperator.load(data_dir).hub_credentials(setup=setup)
    return hub_credentials((Path(data_dir) / (SETUP_KEY_FILE if setup else "hub.key"))
                           .read_bytes())


def agent_nats_creds(agent_data_dir: Path, agent_id: str) -> Any:
    """An enrolled agent's NATS login as an attacker holding its data dir would present it:
    its identity key and the user JWT the hub issued it (kept in its store)."""
    from federation import wire
    from federation.natscreds import agent_credentials

    seed = (Path(agent_data_dir) / "agent.key").read_bytes()
    db = sqlite3.connect(f"file:{Path(agent_data_dir) / 'agent.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?",
                         (f"nats_jwt.{wire.Signer(seed).public.hex()}",)).fetchone()
    finally:
        db.close()
    return agent_credentials(seed, agent_id, row[0] if row else None)


def enroll_nats_creds(hub_data_dir: Path | None = None) -> Any:
    """The public enroll login for the hub in ``hub_data_dir`` (its NATS account), or the one
    for a NATS without auth."""
    from core_hub.enroll import nats_account
    from federation.natscreds import enroll_credentials

    return enroll_credentials(nats_account(hub_data_dir) if hub_data_dir else None)


def issued_agent_creds(hub_data_dir: Path, seed: bytes, agent_id: str) -> Any:
    """An agent's login with a user JWT the hub in ``hub_data_dir`` signs now (for agents a
    test put in the store without an enrollment reply); plain nkey without NATS auth."""
    from core_hub.natsauth import NatsOperator
    from federation import wire
    from federation.natscreds import agent_credentials

    jwt = (NatsOperator.load(hub_data_dir).agent_jwt(agent_id, wire.Signer(seed).public)
           if NatsOperator.exists(hub_data_dir) else None)
    return agent_credentials(seed, agent_id, jwt)


def _replica_mode(hub: HubProcess) -> str | None:
    try:
        return http("GET", hub.url + "/v1/health", timeout=2).body.get("replica")
    except OSError:
        return None
