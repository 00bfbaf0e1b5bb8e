"""TLS for the API and for NATS with a private CA, and secrets at rest: real processes, real
handshakes with a throwaway CA (tests/certs.py); keys, tokens and stores are private files."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from tests.certs import ThrowawayCA, make_ca
from tests.helpers import ROOT, AgentProcess, wait_until


@pytest.fixture
def ca(tmp_path: Path) -> ThrowawayCA:
    return make_ca(tmp_path / "pki")


def _get(url: str, token: str, context: ssl.SSLContext | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10, context=context) as resp:
        return resp.status, json.loads(resp.read())


def _post(url: str, token: str, body: Any, context: ssl.SSLContext) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10, context=context) as resp:
        return resp.status, json.loads(resp.read())


def test_https_api_at_an_edge_trusts_only_the_ca(
        start_agent: Callable[..., AgentProcess], ca: ThrowawayCA) -> None:
    agent = start_agent("--tls-cert", str(ca.cert), "--tls-key", str(ca.key))
    assert agent.url.startswith("https://127.0.0.1:")
    status, info = _get(agent.url + "/v1/info", agent.token, ca.client_context())
    assert status == 200 and info["role"] == "edge"
    with pytest.raises(urllib.error.URLError) as refused:  # the system CAs do not know ours
        _get(agent.url + "/v1/info", agent.token)
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
    plain = agent.url.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plain HTTP on that port
        _get(plain + "/v1/info", agent.token)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
    return subprocess.run([sys.executable, "-m", "federation.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, env={**base, **(env or {})}, timeout=60)


def test_cli_trusts_a_private_ca_with_cacert(start_agent: Callable[..., AgentProcess],
                                             ca: ThrowawayCA) -> None:
    agent = start_agent("--tls-cert", str(ca.cert), "--tls-key", str(ca.key))
    common = ["--url", agent.url, "--token", agent.token]
    ok = _cli(*common, "--cacert", str(ca.ca), "--json", "info")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["role"] == "edge"
    by_env = _cli(*common, "tasks", "ls", env={"OUTPOST_CACERT": str(ca.ca)})
    assert by_env.returncode == 0, by_env.stderr
    untrusted = _cli(*common, "info")
    assert untrusted.returncode == 3
    assert "TLS certificate is not trusted" in untrusted.stderr and "--cacert" in untrusted.stderr
    missing = _cli(*common, "--cacert", str(ca.ca.with_name("nope.pem")), "info")
    assert missing.returncode == 2 and "--cacert" in missing.stderr


def test_bad_tls_settings_stop_the_agent_with_a_clear_message(tmp_path: Path,
                                                              ca: ThrowawayCA) -> None:
    base = [sys.executable, "-m", "edge_agent", "--data-dir", str(tmp_path / "a"),
            "--listen", "127.0.0.1:0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
    half = subprocess.run([*base, "--tls-cert", str(ca.cert)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60)
    assert half.returncode == 2 and "give both or neither" in half.stderr
    swapped = subprocess.run([*base, "--tls-cert", str(ca.ca), "--tls-key", str(ca.key)],
                             capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert swapped.returncode == 2 and "cannot load" in swapped.stderr


class EmbeddedHub:
    """``outpost-hub run --embedded-nats`` with TLS on its API and its nats-server."""

    def __init__(self, data_dir: Path, ca: ThrowawayCA) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir.parent / "hub.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "core_hub", "run", "--data-dir", str(data_dir),
                 "--listen", "127.0.0.1:0", "--embedded-nats", "--nats-port", "0",
                 "--nats-tls-cert", str(ca.cert), "--nats-tls-key", str(ca.key),
                 "--nats-ca", str(ca.ca), "--tls-cert", str(ca.cert), "--tls-key", str(ca.key),
                 "--disconnected-after", "2.5", "--unreachable-after", "4"],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        wait_until(lambda: (data_dir / "hub.url").exists() or self.proc.poll() is not None,
                   30, what="hub to start")
        assert self.proc.poll() is None, self.log()
        self.url = (data_dir / "hub.url").read_text()
        self.nats_url = (data_dir / "nats.url").read_text()
        self.token = (data_dir / "admin.token").read_text().strip()

    def log(self) -> str:
        return self.log_path.read_text()

    def join_token(self) -> str:
        return subprocess.run(
            [sys.executable, "-m", "core_hub", "token", "create", "--data-dir",
             str(self.data_dir), "--uses", "5"], capture_output=True, text=True, cwd=ROOT,
            check=True).stdout.strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def tls_hub(tmp_path: Path, ca: ThrowawayCA) -> Iterator[EmbeddedHub]:
    hub = EmbeddedHub(tmp_path / "hub", ca)
    try:
        yield hub
    finally:
        hub.stop()


async def _plain_connect(url: str, **options: Any) -> None:
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False,
                            max_reconnect_attempts=0, **options)
    await nc.close()


def test_agent_over_tls_nats_enrolls_and_its_events_reach_the_hub(
        start_agent: Callable[..., AgentProcess], tls_hub: EmbeddedHub,
        ca: ThrowawayCA) -> None:
    assert tls_hub.url.startswith("https://") and tls_hub.nats_url.startswith("tls://")
    ctx = ca.client_context()
    # The server speaks only TLS, with a certificate the system CAs do not trust.
    plain = tls_hub.nats_url.replace("tls://", "nats://")
    with pytest.raises(Exception):  # noqa: B017 (nats.py raises several kinds here)
        asyncio.run(_plain_connect(plain))
    with pytest.raises(Exception):  # noqa: B017
        asyncio.run(_plain_connect(tls_hub.nats_url))

    agent = start_agent("--nats", tls_hub.nats_url, "--nats-ca", str(ca.ca),
                        "--join-token", tls_hub.join_token(), "--heartbeat", "0.5")
    agent_id = agent.api("GET", "/v1/info").body["agent_id"]

    def online() -> bool:
        _, page = _get(tls_hub.url + "/v1/agents", tls_hub.token, ctx)
        return any(a["id"] == agent_id and a["status"] == "online" for a in page["items"])

    wait_until(online, 20, what="the agent enrolled over TLS and online at the hub")
    task = agent.submit("over-tls", ["true"])
    agent.wait_state(task["id"], "finished")

    def at_hub() -> bool:
        _, page = _get(tls_hub.url + "/v1/tasks", tls_hub.token, ctx)
        return any(t["id"] == task["id"] and t["state"] == "finished" for t in page["items"])

    wait_until(at_hub, 20, what="the edge's task events at the hub")
    # And the other way: a task submitted at the hub is placed on the agent over TLS.
    status, placed = _post(tls_hub.url + "/v1/tasks", tls_hub.token,
                           {"name": "from-core", "command": ["true"]}, ctx)
    assert status == 201
    agent_sees = lambda: any(t["id"] == placed["id"] and t["state"] == "finished"  # noqa: E731
                             for t in agent.api("GET", "/v1/tasks").body["items"])
    wait_until(agent_sees, 30, what="the core's task launched at the edge over TLS")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_tokens_and_stores_are_private_and_logs_hold_no_secret(
        start_agent: Callable[..., AgentProcess], tls_hub: EmbeddedHub,
        ca: ThrowawayCA) -> None:
    join = tls_hub.join_token()
    agent = start_agent("--nats", tls_hub.nats_url, "--nats-ca", str(ca.ca),
                        "--join-token", join, "--heartbeat", "0.5")
    task = agent.submit("wal", ["true"])  # a write, so the WAL files exist
    agent.wait_state(task["id"], "finished")
    for data, files in ((agent.data_dir, ("agent.key", "admin.token", "agent.db")),
                        (tls_hub.data_dir, ("hub.key", "admin.token", "hub.db"))):
        assert _mode(data) == 0o700, data
        for name in files:
            assert _mode(data / name) == 0o600, name
        for side in ("-wal", "-shm"):
            db = next(data.glob(f"*.db{side}"))
            assert _mode(db) == 0o600, db
    agent.stop()
    tls_hub.stop()
    logs = agent.log() + tls_hub.log()
    for secret in (agent.token, tls_hub.token, join, ca.key.read_text().splitlines()[1]):
        assert secret not in logs


def test_nats_urls_are_logged_without_their_secrets() -> None:
    from federation.log import redact_url

    assert redact_url("nats://hub:s3cret@10.0.0.1:4222") == "nats://hub:***@10.0.0.1:4222"
    assert redact_url("tls://t0ken@hub.example.com:4222") == "tls://***@hub.example.com:4222"
    assert redact_url("tls://127.0.0.1:4222") == "tls://127.0.0.1:4222"
