"""NATS least privilege: with the hub's embedded NATS, the server itself stops an agent from
speaking for another, reading another's commands or touching the streams; the enroll user can
only enroll; a revoked agent is cut off; and the whole normal flow still works.

Everything is real: a hub process with its embedded nats-server, agent processes that enroll,
and nats-py clients that present an agent's own key (read from its data dir) as an attacker
holding that key would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, StreamConfig

from core_hub.natsauth import AUTH_FILE_NAME, refresh_offline
from core_hub.store import HubStore
from federation import subjects, wire
from federation.natscreds import NatsCredentials, user_nkey
from tests.helpers import (
    AgentProcess,
    HubProcess,
    agent_nats_creds,
    converged,
    enroll_nats_creds,
    hub_nats_creds,
    joined,
    wait_until,
)


@pytest.fixture
def secure_hub(tmp_path: Path) -> Iterator[HubProcess]:
    hub = HubProcess(tmp_path / "hub", "", ["--disconnected-after", "2.5",
                                            "--unreachable-after", "4"], embedded=True).start()
    try:
        yield hub
    finally:
        hub.stop()


def enrolled(start_agent: Callable[..., AgentProcess], hub: HubProcess,
             name: str) -> tuple[AgentProcess, str]:
    agent = joined(start_agent, hub, SimpleNamespace(url=hub.nats_url), name=name)
    return agent, agent.api("GET", "/v1/info").body["agent_id"]


def agent_nkeys(hub: HubProcess, agent_id: str) -> list[str]:
    """The nkeys the agent's connections authenticated with, from the embedded server's
    monitoring port (/connz)."""
    ports = next((hub.data_dir / "nats" / "ports").glob("*.ports"))
    monitor = json.loads(ports.read_text())["monitoring"][0]
    with urllib.request.urlopen(f"{monitor}/connz?auth=true&limit=1024", timeout=5) as resp:
        conns = json.loads(resp.read())["connections"] or []
    return [c.get("authorized_user", "") for c in conns
            if c.get("name") == f"outpost-agent-{agent_id}"]


def consumer_of(agent_id: str) -> ConsumerConfig:
    """A durable consumer on another agent's commands, as an attacker would ask for one."""
    return ConsumerConfig(durable_name=f"cmd-{agent_id}",
                          filter_subject=subjects.commands_of(agent_id))


def revoked_nkeys(hub_data_dir: Path) -> set[str]:
    """The user nkeys the hub's NATS account refuses (its JWT's revocations)."""
    from core_hub.natsauth import ACCOUNT_JWT_FILE
    from federation import natsjwt

    claims = natsjwt.decode((hub_data_dir / ACCOUNT_JWT_FILE).read_text(), kind="account")
    return set(claims["nats"].get("revocations", {}))


def creds_nkey(creds: NatsCredentials) -> str:
    """The user nkey a login's JWT is for."""
    from federation import natsjwt

    assert creds.jwt is not None
    return str(natsjwt.decode(creds.jwt)["sub"])


def creds_of(agent: AgentProcess, agent_id: str) -> NatsCredentials:
    return agent_nats_creds(agent.data_dir, agent_id)  # type: ignore[no-any-return]


class Watched:
    """A nats-py connection that records the server's errors (permission violations)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: Client | None = None

    async def on_error(self, exc: Exception) -> None:
        self.errors.append(str(exc))

    async def violation(self, what: str, subject: str) -> None:
        """Wait for the server's ``permissions violation for <what> to "<subject>"``."""
        needle = f'permissions violation for {what} to "{subject}"'
        try:
            async with asyncio.timeout(5):
                while not any(needle.lower() in e.lower() for e in self.errors):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"no {needle!r} from the server; errors: {self.errors}") from None


@contextlib.asynccontextmanager
async def client(url: str, creds: NatsCredentials | None = None) -> AsyncIterator[Any]:
    me = Watched()
    options = creds.connect_options() if creds else {}
    me.nc = await nats.connect(url, allow_reconnect=False, connect_timeout=3,
                               error_cb=me.on_error, **options)
    try:
        yield me
    finally:
        await me.nc.close()


async def refused(url: str, creds: NatsCredentials | None) -> str:
    """The server's refusal of a connection with ``creds``; fails if it is accepted."""
    nc = Client()
    try:
        await nc.connect(url, allow_reconnect=False, connect_timeout=3,
                         **(creds.connect_options() if creds else {}))
    except Exception as exc:
        return str(exc)
    finally:
        await nc.close()  # a refused client still holds its socket until closed
    raise AssertionError(f"the server accepted {creds!r}")


async def test_an_agent_cannot_act_as_another_or_manage_streams(
        start_agent: Callable[..., AgentProcess], secure_hub: HubProcess) -> None:
    a, a_id = enrolled(start_agent, secure_hub, "a")
    b, b_id = enrolled(start_agent, secure_hub, "b")
    url = secure_hub.nats_url
    async with client(url, creds_of(a, a_id)) as me:
        nc = me.nc
        js = nc.jetstream(timeout=1)
        # Its own subjects work (the control).
        assert (await js.publish(subjects.events(a_id), b"junk")).stream == "OUTPOST_EVENTS"
        # Another agent's events and heartbeats: refused by the server.
        for subject in (subjects.events(b_id), subjects.heartbeat(b_id)):
            await nc.publish(subject, b"forged")
            await me.violation("publish", subject)
        # Another agent's commands: neither their subjects nor a direct get of them (by
        # subject, by a wildcard, or by the JSON body form that names any subject).
        await nc.subscribe(subjects.commands_of(b_id))
        await me.violation("subscription", subjects.commands_of(b_id))
        await nc.subscribe(f"outpost.v1.rpc.{b_id}.>")
        await me.violation("subscription", f"outpost.v1.rpc.{b_id}.>")
        await nc.subscribe(f"_INBOX.{b_id}.>")
        await me.violation("subscription", f"_INBOX.{b_id}.>")
        await nc.subscribe(">")
        await me.violation("subscription", ">")
        direct = "$JS.API.DIRECT.GET.OUTPOST_COMMANDS"
        for subject, body in ((f"{direct}.{subjects.command(b_id, 1)}", b""),
                              (f"{direct}.{subjects.commands_of(b_id)}", b""),
                              (f"{direct}.outpost.v1.cmd.*.*", b""),
                              (f"{direct}.outpost.v1.cmd.>", b""),
                              (direct, json.dumps({"last_by_subj": subjects.commands_of(
                                  b_id)}).encode())):
            with pytest.raises(nats.errors.TimeoutError):
                await nc.request(subject, body, timeout=1)
            await me.violation("publish", subject)
        # Its own commands: readable (the hub sent b a launch? no: a has none yet, so 404).
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.get_last_msg(subjects.COMMANDS_STREAM, subjects.commands_of(a_id),
                                  direct=True)
        # No stream or consumer management at all.
        attempts = [
            js.add_stream(StreamConfig(name="EVIL", subjects=["evil.>"])),
            js.delete_stream(subjects.EVENTS_STREAM),
            js.delete_stream(subjects.COMMANDS_STREAM),
            js.purge_stream(subjects.COMMANDS_STREAM),
            js.add_consumer(subjects.COMMANDS_STREAM, consumer_of(b_id)),
            js.add_consumer(subjects.COMMANDS_STREAM, consumer_of(a_id)),
            js.delete_consumer(subjects.EVENTS_STREAM, "outpost-hub-ingest"),
        ]
        for attempt in attempts:
            with pytest.raises(nats.errors.TimeoutError):
                await attempt
        for api in ("STREAM.CREATE.EVIL", "STREAM.DELETE.OUTPOST_EVENTS",
                    "STREAM.PURGE.OUTPOST_COMMANDS",
                    "CONSUMER.DELETE.OUTPOST_EVENTS.outpost-hub-ingest"):
            await me.violation("publish", f"$JS.API.{api}")
    # All still there, as the hub sees it.
    async with client(url, hub_nats_creds(secure_hub.data_dir)) as hub:
        jsm = hub.nc.jetstream(timeout=5)
        names = {s.config.name for s in await jsm.streams_info()}
        assert {subjects.EVENTS_STREAM, subjects.COMMANDS_STREAM} <= names and "EVIL" not in names
        assert await jsm.consumers_info(subjects.COMMANDS_STREAM) == []
    # A forged event never reached the hub's view of b; b is still online and unharmed.
    agents = {x["id"]: x for x in secure_hub.api("GET", "/v1/agents").body["items"]}
    assert agents[b_id]["status"] == "online"


async def test_the_enroll_user_can_only_enroll_and_anonymous_is_refused(
        start_agent: Callable[..., AgentProcess], secure_hub: HubProcess) -> None:
    a, a_id = enrolled(start_agent, secure_hub, "a")
    url = secure_hub.nats_url
    assert "Authorization Violation" in await refused(url, None)
    assert "Authorization Violation" in await refused(
        url, NatsCredentials(user="outpost-enroll", password="guess"))
    async with client(url, enroll_nats_creds(secure_hub.data_dir)) as me:
        nc = me.nc
        # Enrolling is allowed: the hub answers (here: no such token), and the answer holds
        # nothing secret.
        reply = wire.unpack((await nc.request(subjects.ENROLL, wire.pack({}), timeout=5)).data)
        assert reply["ok"] is False and set(reply) == {"ok", "code", "error"}
        for subject in (subjects.events(a_id), subjects.heartbeat(a_id), "$JS.API.INFO",
                        f"outpost.v1.rpcreply.{a_id}.x"):
            await nc.publish(subject, b"x")
            await me.violation("publish", subject)
        for subject in (subjects.ENROLL, subjects.commands_of(a_id), "outpost.v1.>",
                        f"_INBOX.{a_id}.>"):
            await nc.subscribe(subject)
            await me.violation("subscription", subject)
    # An enrollment reply is the agent id and the hub's public key: no credential in it.
    hub_key = (secure_hub.data_dir / "hub.key").read_bytes()
    assert hub_key not in (a.data_dir / "agent.db").read_bytes()


async def test_a_revoked_agent_is_cut_off_after_refresh(
        start_agent: Callable[..., AgentProcess], secure_hub: HubProcess) -> None:
    a, a_id = enrolled(start_agent, secure_hub, "a")
    b, b_id = enrolled(start_agent, secure_hub, "b")
    url = secure_hub.nats_url
    assert revoked_nkeys(secure_hub.data_dir) == set()
    async with client(url, creds_of(b, b_id)):
        pass  # b's key is accepted before
    store = HubStore(secure_hub.data_dir / "hub.db")
    try:
        store.revoke_agent(b_id)
    finally:
        store.close()
    assert refresh_offline(secure_hub.data_dir) is True
    assert revoked_nkeys(secure_hub.data_dir) == {creds_nkey(creds_of(b, b_id))}
    # The live connection of b is closed and its key is refused from now on.
    wait_until(lambda: not b.api("GET", "/v1/info").body["link"]["connected"], 10,
               what="the revoked agent's NATS link to drop")
    assert "Authorization Violation" in await refused(url, creds_of(b, b_id))
    async with client(url, creds_of(a, a_id)) as me:  # a is untouched
        await me.nc.jetstream(timeout=2).publish(subjects.events(a_id), b"junk")
    assert refresh_offline(secure_hub.data_dir) is False  # nothing changed: no reload


async def test_revoking_through_the_hub_api_closes_the_agents_nats_link(
        start_agent: Callable[..., AgentProcess], secure_hub: HubProcess) -> None:
    """POST /v1/agents/{id}/revoke on the running hub: Hub._after_agent_change refreshes the
    server's users, so the agent's link drops and its key is refused at once."""
    a, a_id = enrolled(start_agent, secure_hub, "a")
    b, b_id = enrolled(start_agent, secure_hub, "b")
    assert secure_hub.api("POST", f"/v1/agents/{b_id}/drain").status in (200, 202)
    async with client(secure_hub.nats_url, hub_nats_creds(secure_hub.data_dir)) as hub:
        jsm = hub.nc.jetstream(timeout=5)
        for _ in range(100):  # b's drain command is stored (the hub's sender publishes it)
            try:
                await jsm.get_last_msg(subjects.COMMANDS_STREAM, subjects.commands_of(b_id))
                break
            except nats.js.errors.NotFoundError:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("b's drain command never reached the commands stream")
    assert secure_hub.api("POST", f"/v1/agents/{b_id}/revoke").status == 200
    wait_until(lambda: agent_nkeys(secure_hub, b_id) == [], 5, what="b's link closed")
    assert "Authorization Violation" in await refused(secure_hub.nats_url, creds_of(b, b_id))
    assert len(agent_nkeys(secure_hub, a_id)) == 1
    async with client(secure_hub.nats_url, hub_nats_creds(secure_hub.data_dir)) as hub:
        jsm = hub.nc.jetstream(timeout=5)
        with pytest.raises(nats.js.errors.NotFoundError):  # nothing left of b's commands
            await jsm.get_last_msg(subjects.COMMANDS_STREAM, subjects.commands_of(b_id))


def test_enroll_events_commands_and_logs_work_with_least_privilege(
        start_agent: Callable[..., AgentProcess], secure_hub: HubProcess) -> None:
    a, a_id = enrolled(start_agent, secure_hub, "a")
    # Events: a task submitted at the edge shows at the hub.
    talker = a.submit("talker", ["sh", "-c", "echo one; echo two"])
    a.wait_state(talker["id"], "finished")
    converged(a, secure_hub)
    # Commands: the hub places a task on the agent (a launch through its command consumer).
    placed = secure_hub.api("POST", "/v1/tasks", {
        "name": "from-core", "command": ["sh", "-c", "echo placed"],
        "constraints": {"agent": a_id}})
    assert placed.status in (201, 202), placed.body
    wait_until(lambda: a.api("GET", f"/v1/tasks/{placed.body['id']}").status == 200
               and a.task(placed.body["id"])["state"] == "finished", 20,
               what="the core's task to run at the agent")
    # Live reads: logs forwarded to the edge and streamed back on its rpcreply subject.
    converged(a, secure_hub)
    assert secure_hub.api("GET", f"/v1/tasks/{talker['id']}/logs").raw == b"one\ntwo\n"
    ticker = a.submit("ticker", ["sh", "-c", "for i in 1 2 3; do echo t$i; sleep 0.3; done"])
    wait_until(lambda: secure_hub.api("GET", f"/v1/tasks/{ticker['id']}").status == 200, 10,
               what="the ticker at the hub")
    req = urllib.request.Request(f"{secure_hub.url}/v1/tasks/{ticker['id']}/logs?follow=true",
                                 headers={"Authorization": f"Bearer {secure_hub.token}"})
    with urllib.request.urlopen(req, timeout=15) as stream:
        assert stream.read() == b"t1\nt2\nt3\n"
    # A hub restart keeps the agent's user (the file is rendered from the store again).
    secure_hub.stop()
    secure_hub.start()
    a.stop()  # its NATS URL changed with the restarted embedded server's port
    a.args = [*a.args[:a.args.index("--nats") + 1], secure_hub.nats_url,
              *a.args[a.args.index("--nats") + 2:]]
    a.start()
    wait_until(lambda: any(x["id"] == a_id and x["status"] == "online" for x in
                           secure_hub.api("GET", "/v1/agents").body["items"]), 20,
               what="the agent back online after the hub restart")


async def test_a_rotated_key_keeps_its_user_for_the_grace_then_only_the_new_key_works(
        tmp_path: Path) -> None:
    """The hub refreshes before answering a rotation on the agent's old connection; the old
    key must outlive that answer, and no longer (real server, real store, a settable clock)."""
    from nacl.signing import SigningKey

    from core_hub.natsauth import ROTATION_GRACE_S, NatsAuth, NatsOperator, push_account
    from federation.identity import id_from_public_key
    from federation.natscreds import agent_credentials
    from federation.natsd import NatsServer

    old, new = (SigningKey.generate() for _ in range(2))
    agent_id = id_from_public_key(bytes(old.verify_key))
    store = HubStore(tmp_path / "hub.db")
    now = [1000.0]
    operator = NatsOperator.load(tmp_path)
    server = NatsServer(tmp_path / "nats", config_extra=f'include "{AUTH_FILE_NAME}"')

    async def push(jwt: str) -> None:
        await push_account(server.url, operator, jwt)

    auth = NatsAuth(server.store_dir / AUTH_FILE_NAME, store, operator, push,
                    clock=lambda: now[0])
    try:
        store.enroll_agent(agent_id, bytes(old.verify_key), name="a", site="s", labels={},
                           resources={}, version="", now=0)
        auth.write()
        await server.start()
        old_jwt = auth.issue(agent_id, bytes(old.verify_key))
        async with client(server.url, agent_credentials(bytes(old), agent_id, old_jwt)):
            pass
        store.rotate_agent_key(agent_id, bytes(old.verify_key), bytes(new.verify_key), 5,
                               now[0])
        new_jwt = auth.issue(agent_id, bytes(new.verify_key))
        assert await auth.refresh() is False  # nothing to refuse yet
        for key, jwt in ((old, old_jwt), (new, new_jwt)):  # both, during the grace
            async with client(server.url, agent_credentials(bytes(key), agent_id, jwt)):
                pass
        now[0] += ROTATION_GRACE_S + 1
        assert await auth.refresh() is True
        assert "Authorization Violation" in await refused(
            server.url, agent_credentials(bytes(old), agent_id, old_jwt))
        async with client(server.url, agent_credentials(bytes(new), agent_id, new_jwt)):
            pass
    finally:
        await server.stop()
        store.close()


def test_key_rotation_under_least_privilege(start_agent: Callable[..., AgentProcess],
                                            secure_hub: HubProcess) -> None:
    """The rotation request goes out on the old key's connection; the agent then comes back
    as its new key (a NATS user the hub added before answering) and its events flow."""
    from tests.test_key_rotation import rotate_key

    a, a_id = enrolled(start_agent, secure_hub, "a")
    old = creds_of(a, a_id)
    result = rotate_key(a)
    assert result.returncode == 0, result.stderr
    new = creds_of(a, a_id)
    assert new.seed != old.seed
    new_nkey = user_nkey(wire.Signer((a.data_dir / "agent.key").read_bytes()).public)
    assert creds_nkey(new) == new_nkey  # the hub issued the new key its user JWT
    # The agent's link is now the new key's (the server's own list of connections says so).
    wait_until(lambda: agent_nkeys(secure_hub, a_id) == [new_nkey], 15,
               what="the agent connected as its new key")
    after = a.submit("after-rotation", ["true"])
    a.wait_state(after["id"], "finished")
    converged(a, secure_hub)

    async def new_key_accepted() -> None:
        async with client(secure_hub.nats_url, new) as me:
            await me.nc.publish(subjects.heartbeat(a_id), b"")
            await me.nc.flush()
            assert not me.errors

    asyncio.run(new_key_accepted())


def test_a_site_leaf_carries_only_its_agents(
        tmp_path: Path, start_agent: Callable[..., AgentProcess]) -> None:
    """An external NATS from configs/nats/hub.conf with the least-privilege lines on, as
    docs/deploy.md says; a site bundle's leaf (its own key) links the site's agent, whose
    enrollment, events, commands and logs flow; the leaf carries nothing for other agents and
    no stream management; a leaf without the site's key cannot link at all."""
    import re

    from core_hub import bundle
    from tests.deploy_support import ConfServer, secure_hub_with_leafnodes, site_leaf

    servers: list[ConfServer] = []
    with contextlib.ExitStack() as stack:  # leaves killed first, then the hub and its NATS
        secure = stack.enter_context(secure_hub_with_leafnodes(
            tmp_path, "--disconnected-after", "2.5", "--unreachable-after", "4"))
        hub, leaf_port = secure.hub, secure.leaf_port
        servers.append(secure.nats)
        assert "Authorization Violation" in asyncio.run(refused(servers[0].url, None))
        out = tmp_path / "bundle"
        bundle.write_bundle(hub.data_dir, "berlin", out,
                            hub_url=f"nats-leaf://127.0.0.1:{leaf_port}")
        assert re.search(r'credentials: "[^"]+/nats-leaf.creds"',
                         (out / "nats-leaf.conf").read_text())
        creds = out / bundle.LEAF_CREDS
        assert creds.stat().st_mode & 0o077 == 0 and "SU" in creds.read_text()

        def leaf(name: str, leaf_creds: Path | None) -> ConfServer:
            server = site_leaf(tmp_path, name, "berlin", leaf_port, leaf_creds)
            stack.callback(server.kill)
            servers.append(server)
            return server

        site = leaf("site", creds)
        wait_until(lambda: servers[0].leafs() == 1, 15, what="the site's leaf linked")
        (tmp_path / "berlin").mkdir()
        (tmp_path / "berlin" / "agent.key").write_bytes((out / "agent.key").read_bytes())
        edge = joined(start_agent, hub, SimpleNamespace(url=site.url), "--site", "berlin",
                      name="berlin")
        edge_id = edge.api("GET", "/v1/info").body["agent_id"]
        talker = edge.submit("talker", ["sh", "-c", "echo through the leaf"])
        edge.wait_state(talker["id"], "finished")
        converged(edge, hub)
        placed = hub.api("POST", "/v1/tasks", {"name": "from-core", "command": ["true"],
                                                "constraints": {"agent": edge_id}})
        assert placed.status in (201, 202), placed.body
        wait_until(lambda: edge.api("GET", f"/v1/tasks/{placed.body['id']}").status == 200, 20,
                   what="the core's launch to reach the site")
        assert hub.api("GET", f"/v1/tasks/{talker['id']}/logs").raw == b"through the leaf\n"

        async def rogue_at_the_site() -> None:
            other = "a" + "x" * 25
            # Replies cross the link only to the site's agents' inboxes.
            async with client(site.url, NatsCredentials(inbox_prefix=f"_INBOX.{edge_id}")) as me:
                js = me.nc.jetstream(timeout=1)
                await js.publish(subjects.events(edge_id), b"junk")  # its own agent's: carried
                for attempt in (js.publish(subjects.events(other), b"forged"),
                                js.delete_stream(subjects.EVENTS_STREAM),
                                js.add_consumer(subjects.COMMANDS_STREAM,
                                                consumer_of(other)),
                                me.nc.request(f"$JS.hub.API.DIRECT.GET.OUTPOST_COMMANDS."
                                              f"{subjects.commands_of(other)}", b"")):
                    with pytest.raises((nats.errors.TimeoutError,
                                        nats.errors.NoRespondersError,
                                        nats.js.errors.NoStreamResponseError,
                                        nats.js.errors.ServiceUnavailableError)):
                        await attempt

        asyncio.run(rogue_at_the_site())
        converged(edge, hub)  # the junk envelope was counted bad, nothing else changed
        stranger = leaf("stranger", None)
        wait_until(lambda: "Authorization Violation" in stranger.log_path.read_text(), 15,
                   what="a leaf without the site's key refused")
        assert servers[0].leafs() == 1
