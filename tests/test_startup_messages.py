"""What a newcomer sees when they start ``outpost-agent`` or ``outpost-hub`` wrongly: the real
commands, each mistake one line naming the setting and what it takes, exit 2, no traceback.

Both configs share one validated base (``federation.config.NodeConfig``), so a shared setting
such as ``log_level`` is checked the same way at the edge and the hub."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, AgentProcess, HubProcess, wait_until
from tests.nats_fixtures import NatsServer

AGENT = [sys.executable, "-m", "edge_agent"]
HUB = [sys.executable, "-m", "core_hub", "run"]


def start(cmd: list[str], *args: str, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30,
                            cwd=ROOT, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr)
    return lines[0]


def test_a_hub_config_given_to_the_agent_says_so(tmp_path: Path) -> None:
    conf = tmp_path / "hub.toml"
    conf.write_text(f'[hub]\ndata_dir = "{tmp_path}"\nembedded_nats = true\n')
    line = one_line(start(AGENT, "--config", str(conf)))
    assert "[hub]" in line and "[agent]" in line and "data_dir: required" not in line
    agent_conf = tmp_path / "edge.toml"
    agent_conf.write_text(f'[agent]\ndata_dir = "{tmp_path}"\n')
    line = one_line(start(HUB, "--config", str(agent_conf)))
    assert "[agent]" in line and "[hub]" in line


def test_a_bad_number_names_the_setting_and_what_it_takes(tmp_path: Path) -> None:
    conf = tmp_path / "edge.toml"
    conf.write_text(f'[agent]\ndata_dir = "{tmp_path}"\ncpus = "two"\n')
    line = one_line(start(AGENT, "--config", str(conf)))
    assert line == f"outpost-agent: cpus (from {conf}): expected a number, got 'two'"
    line = one_line(start(AGENT, "--data-dir", str(tmp_path), "--max-tasks", "many"))
    assert line == "outpost-agent: max_tasks (from flag): expected an integer, got 'many'"


def test_the_hub_without_nats_says_which_options_to_give(tmp_path: Path) -> None:
    line = one_line(start(HUB, "--data-dir", str(tmp_path)))
    assert "None" not in line and "--nats URL" in line and "--embedded-nats" in line


@pytest.mark.parametrize("cmd", [AGENT, HUB], ids=["agent", "hub"])
def test_a_bad_log_level_is_one_line_at_edge_and_hub(cmd: list[str], tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "OUTPOST_LOG_LEVEL": "verbose"}
    result = start(cmd, "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0",
                   *(["--embedded-nats", "--nats-port", "0"] if cmd is HUB else []), env=env)
    assert one_line(result).endswith(
        "log_level: 'verbose' is not valid; expected debug | info | warning | error")


def test_a_join_token_needs_a_nats_url(tmp_path: Path) -> None:
    line = one_line(start(AGENT, "--data-dir", str(tmp_path), "--join-token", "abc"))
    assert "join_token" in line and "--nats" in line


@pytest.mark.parametrize("cmd,flag", [(AGENT, "--cpu"), (HUB, "--embedded")],
                         ids=["agent", "hub"])
def test_abbreviated_flags_are_refused(cmd: list[str], flag: str, tmp_path: Path) -> None:
    result = start(cmd, "--data-dir", str(tmp_path), flag, "1")
    assert result.returncode == 2 and f"unrecognized arguments: {flag}" in result.stderr


def test_unreachable_nats_is_logged_while_the_agent_retries(
        start_agent: Callable[..., AgentProcess]) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"nats://127.0.0.1:{sock.getsockname()[1]}"
    agent = start_agent("--nats", url, "--join-token", "unused-token-xx")
    wait_until(lambda: "cannot reach NATS" in agent.log(), timeout=10,
               what="a log line about the unreachable NATS")
    line = next(s for s in agent.log().splitlines() if "cannot reach NATS" in s)
    assert url in line and "retrying" in line, line
    link = agent.api("GET", "/v1/info").body["link"]
    assert "cannot reach NATS" in link["last_error"]["reason"], link


def test_a_refused_join_token_is_one_error_then_a_backoff_shown_in_info(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    agent = start_agent("--nats", nats_proc.url, "--join-token", "not-a-real-join-token")

    def refused() -> dict[str, Any] | None:
        err: dict[str, Any] | None = agent.api("GET", "/v1/info").body["link"].get("last_error")
        return err if err and "refused" in err["reason"] else None

    err = wait_until(refused, timeout=15, what="the refusal in /v1/info")
    assert err["retry_at"] - err["at"] >= 30, "backs off, not a retry every 3 s"
    log = agent.log()
    assert log.count("enrollment refused") == 1 and "link to core down" not in log, log
    assert "outpost-hub token create" in log
