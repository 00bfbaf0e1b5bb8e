"""The ``outpost`` client end to end: a real CLI subprocess against a real edge agent.

Each test checks what an operator sees (tables, one-line errors, exit codes) and what a script
sees (``--json``), and that no user mistake ever ends in a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.helpers import ROOT, AgentProcess, wait_until

CLI = [sys.executable, "-m", "federation.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
    return {**env, **extra}


def outpost(*args: str, agent: AgentProcess | None = None, env: dict[str, str] | None = None,
            timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    """Run the CLI; with ``agent``, pointed at it through --url/--token."""
    target = ["--url", agent.url, "--token", agent.token] if agent else []
    result = subprocess.run([*CLI, *target, *args], capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT, env=env or _env())
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _as_background_job() -> None:
    """What a shell does to a job started with ``&``: SIGINT ignored, inherited over exec."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def running(*args: str, agent: AgentProcess,
            background: bool = False) -> Iterator[subprocess.Popen[str]]:
    """The CLI as a background process (for streams); killed, reaped and closed at the end.
    ``background``: started as a shell's background job would be (SIGINT ignored)."""
    proc = subprocess.Popen([*CLI, "--url", agent.url, "--token", agent.token, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=_env(),
                            preexec_fn=_as_background_job if background else None)
    with proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("outpost"), result.stderr
    return lines[0]


def table(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines()]


def run_task(agent: AgentProcess, *args: str) -> str:
    result = outpost("tasks", "run", *args, agent=agent)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_run_then_ls_as_table_and_json(agent: AgentProcess) -> None:
    task_id = run_task(agent, "greet", "--env", "GREETING=hello", "--label", "team=edge",
                       "--cpus", "0.2", "--mem-mb", "16", "--",
                       "sh", "-c", 'echo "$GREETING"; exit 3')
    agent.wait_state(task_id, "failed")

    result = outpost("tasks", "ls", agent=agent)
    assert result.returncode == 0, result.stderr
    rows = table(result.stdout)
    assert rows[0] == ["ID", "NAME", "STATE", "EXIT", "RESTARTS", "AGE", "REASON"]
    assert rows[1][:5] == [task_id[:12], "greet", "failed", "3", "0"]

    page = json.loads(outpost("tasks", "ls", "--json", agent=agent).stdout)
    assert page["next_cursor"] is None
    [task] = page["items"]
    assert task["id"] == task_id and task["command"] == ["sh", "-c", 'echo "$GREETING"; exit 3']
    assert task["env"] == {"GREETING": "hello"} and task["labels"] == {"team": "edge"}
    assert task["resources"]["cpus"] == 0.2 and task["resources"]["mem_mb"] == 16

    filtered = outpost("tasks", "ls", "--state", "failed", "--label", "team=edge", agent=agent)
    assert [r[0] for r in table(filtered.stdout)[1:]] == [task_id[:12]]
    none = outpost("tasks", "ls", "--state", "running", "--name", "greet", agent=agent)
    assert table(none.stdout)[1:] == []


def test_ls_pages_and_all_follows_every_cursor(agent: AgentProcess) -> None:
    ids = {agent.submit(f"t{i}", ["true"])["id"] for i in range(3)}

    first = outpost("tasks", "ls", "--limit", "1", agent=agent)
    assert len(table(first.stdout)) == 2
    assert "--all" in one_line_error(first) and first.returncode == 0

    every = outpost("tasks", "ls", "--all", "--limit", "1", agent=agent)
    assert {r[0] for r in table(every.stdout)[1:]} == {i[:12] for i in ids}
    assert every.stderr == ""
    page = json.loads(outpost("tasks", "ls", "--all", "--limit", "1", "--json", agent=agent).stdout)
    assert {t["id"] for t in page["items"]} == ids and page["next_cursor"] is None


def test_get_by_prefix_and_run_json(agent: AgentProcess) -> None:
    result = outpost("tasks", "run", "--json", "quick", "--restart", "on-failure",
                     "--max-restarts", "2", "--kill-timeout", "1", "--", "true", agent=agent)
    created = json.loads(result.stdout)
    assert created["restart"]["policy"] == "on-failure" and created["restart"]["max"] == 2
    assert created["kill_timeout"] == 1
    agent.wait_state(created["id"], "finished")

    shown = outpost("tasks", "get", created["id"][:8], agent=agent)
    assert shown.returncode == 0, shown.stderr
    fields = {row[0]: row[1:] for row in table(shown.stdout)}
    assert fields["ID"] == [created["id"]] and fields["STATE"] == ["finished"]
    assert fields["EXIT"] == ["0"] and fields["COMMAND"] == ["true"]
    as_json = json.loads(outpost("tasks", "get", created["id"], "--json", agent=agent).stdout)
    assert as_json["id"] == created["id"] and as_json["state"] == "finished"


def test_history_as_table_and_json(agent: AgentProcess) -> None:
    task_id = run_task(agent, "twice", "--restart", "on-failure", "--max-restarts", "1", "--",
                       "sh", "-c", "exit 4")
    agent.wait_state(task_id, "failed")
    wait_until(lambda: agent.task(task_id)["restarts"] == 1 and
               agent.task(task_id)["state"] == "failed", what="failed after one restart")
    shown = outpost("tasks", "history", task_id[:8], agent=agent)
    assert shown.returncode == 0, shown.stderr
    rows = table(shown.stdout)
    assert rows[0] == ["WHEN", "STATE", "EXIT", "RESTARTS", "REASON"]
    states = [r[4] for r in rows[1:]]  # WHEN is "date time (N ago)": four cells
    assert states.count("running") == 2 and states[-1] == "failed", rows
    answer = json.loads(outpost("tasks", "history", task_id, "--json", agent=agent).stdout)
    assert answer["task_id"] == task_id
    assert [e["exit_code"] for e in answer["items"] if e["state"] == "failed"] == [4, 4]
    missing = outpost("tasks", "history", "nope-nope", agent=agent)
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_logs_tail_and_stderr(agent: AgentProcess) -> None:
    task_id = run_task(agent, "chatty", "--", "sh", "-c",
                       "for i in 1 2 3 4 5; do echo line$i; done; echo oops >&2")
    agent.wait_state(task_id, "finished")
    assert outpost("tasks", "logs", task_id, agent=agent).stdout == \
        "".join(f"line{i}\n" for i in range(1, 6))
    assert outpost("tasks", "logs", task_id, "--tail", "2", agent=agent).stdout == \
        "line4\nline5\n"
    assert outpost("tasks", "logs", task_id, "--stderr", agent=agent).stdout == "oops\n"


def test_logs_follow_streams_until_the_task_ends(agent: AgentProcess) -> None:
    task_id = run_task(agent, "slow", "--", "sh", "-c",
                       "echo start; sleep 1; echo end")
    with running("tasks", "logs", "-f", task_id, agent=agent) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "start\n"
        assert agent.task(task_id)["state"] == "running", "a line arrived while the task ran"
        out, err = proc.communicate(timeout=10)
    assert (out, err, proc.returncode) == ("end\n", "", 0)
    assert agent.task(task_id)["state"] == "finished"


def test_ctrl_c_on_logs_follow_then_kill(agent: AgentProcess) -> None:
    task_id = run_task(agent, "sleeper", "--kill-timeout", "2", "--",
                       "sh", "-c", "echo ready; exec sleep 60")
    # Started as `make test &` would start it: SIGINT ignored by inheritance. The command
    # stops on SIGINT all the same (it installs its own handler).
    with running("tasks", "logs", "-f", task_id, agent=agent, background=True) as follow:
        assert follow.stdout is not None and follow.stdout.readline() == "ready\n"
        follow.send_signal(signal.SIGINT)
        _, err = follow.communicate(timeout=10)
    assert (follow.returncode, err) == (130, "")
    assert agent.task(task_id)["state"] == "running"

    result = outpost("tasks", "kill", task_id[:10], agent=agent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(task_id)
    done = agent.wait_state(task_id, "killed")
    again = outpost("tasks", "kill", task_id, agent=agent)
    assert again.returncode == 0 and "killed" in again.stdout
    assert done["state"] == "killed"


def test_url_and_token_from_the_environment(agent: AgentProcess) -> None:
    env = _env(OUTPOST_URL=agent.url, OUTPOST_TOKEN=agent.token)
    info = outpost("info", env=env)
    assert info.returncode == 0, info.stderr
    assert {row[0]: row[1:] for row in table(info.stdout)}["ROLE"] == ["edge"]
    agent_id = json.loads(outpost("info", "--json", env=env).stdout)["agent_id"]

    agents = outpost("agents", "ls", env=env)
    assert table(agents.stdout)[0][:4] == ["ID", "NAME", "SITE", "STATUS"]
    assert table(agents.stdout)[1][0] == agent_id and table(agents.stdout)[1][3] == "online"
    offers = json.loads(outpost("offers", "ls", "--json", env=env).stdout)
    assert offers["items"][0]["agent_id"] == agent_id and offers["items"][0]["cpus"] == 2
    assert table(outpost("offers", "ls", env=env).stdout)[1][0] == agent_id

    flag_wins = outpost("--token", "wrong", "info", env=env)
    assert flag_wins.returncode == 1


def test_bad_token_is_one_line_and_exit_1(agent: AgentProcess) -> None:
    result = outpost("--url", agent.url, "--token", "not-a-token", "tasks", "ls")
    assert result.returncode == 1
    assert one_line_error(result) == "outpost: 401 unauthorized: unknown or revoked token"
    dashed = outpost("tasks", "ls", "--url", agent.url, "--token", "-looks-like-an-option")
    assert dashed.returncode == 1, "a token may start with '-' (URL-safe base64)"
    assert one_line_error(dashed) == "outpost: 401 unauthorized: unknown or revoked token"
    missing = outpost("--url", agent.url, "tasks", "ls")
    assert missing.returncode == 1 and "OUTPOST_TOKEN" in one_line_error(missing)


def test_unknown_task_and_invalid_spec_exit_1(agent: AgentProcess) -> None:
    for verb in ("get", "kill", "logs"):
        result = outpost("tasks", verb, "no-such-task", agent=agent)
        assert result.returncode == 1
        assert one_line_error(result) == "outpost: 404 not_found: task 'no-such-task' not found"
    bad = outpost("tasks", "run", "Not_A_Name", "--", "true", agent=agent)
    assert bad.returncode == 1 and one_line_error(bad).startswith("outpost: 422 invalid: name")


def test_unreachable_node_exits_3_naming_the_url() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    result = outpost("--url", url, "tasks", "ls")
    assert result.returncode == 3
    assert one_line_error(result).startswith(f"outpost: cannot reach {url}")


def test_usage_errors_exit_2() -> None:
    url = ["--url", "http://127.0.0.1:9"]
    cases = [
        [*url, "tasks", "run", "hello"],  # no command after --
        [*url, "tasks", "ls", "--limit", "lots"],
        [*url, "tasks", "run", "x", "--env", "NOEQUALS", "--", "true"],
        [*url, "tasks", "run", "x", "--max-restarts", "3", "--", "true"],
        [*url, "tasks", "ls", "--", "true"],
        [*url, "tasks", "run", "x", "--cpu", "1", "--", "true"],  # no abbreviation of --cpus
        [*url, "tasks", "explode"],
        [*url, "tasks"],
        [],
        ["tasks", "ls"],  # no URL at all
        ["--url", "not a url", "tasks", "ls"],
    ]
    for args in cases:
        result = outpost(*args)
        assert result.returncode == 2, (args, result.stderr)
        one_line_error(result)
        assert result.stdout == ""
    assert outpost("tasks", "run", "--help").returncode == 0


def _read_events_until(proc: subprocess.Popen[str], done: Any) -> list[str]:
    lines: list[str] = []
    assert proc.stdout is not None
    while not done(lines):
        line = proc.stdout.readline()
        assert line, f"event stream ended early: {lines}"
        lines.append(line)
    return lines


def test_events_after_0_prints_task_events_and_ctrl_c_exits_130(agent: AgentProcess) -> None:
    task_id = run_task(agent, "evented", "--", "true")
    agent.wait_state(task_id, "finished")
    with running("events", "--after", "0", agent=agent, background=True) as proc:
        lines = _read_events_until(proc, lambda seen: any("finished" in s for s in seen))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert (proc.returncode, err) == (130, "")
    rows = [line.split() for line in lines]
    assert rows[0][0] == "1", "replayed from the first event"
    states = [r[4] for r in rows if r[1] == "task" and r[2] == task_id[:12]]
    assert states[0] == "pending" and "running" in states and states[-1] == "finished"

    with running("events", "--after", "0", "--json", agent=agent) as as_json:
        seen = _read_events_until(as_json, lambda s: s and '"event":"task"' in s[-1])
    event = json.loads(seen[-1])
    assert event["data"]["id"] == task_id and event["data"]["state"] == "pending"
    assert isinstance(event["id"], int) and event["id"] >= 1


def test_events_stream_cut_exits_3_with_resume_hint(agent: AgentProcess) -> None:
    agent.submit("one", ["true"])
    with running("events", "--after", "0", agent=agent) as proc:
        _read_events_until(proc, len)
        agent.stop()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 3
    assert "resume with: outpost events --after " in err and len(err.splitlines()) == 1
