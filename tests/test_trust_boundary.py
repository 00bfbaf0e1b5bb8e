"""Attacks on the trust boundary (issue 10, sections 1-3), each against real processes.

A hub with its embedded nats-server and least privilege, real agents that enroll, and nats-py
clients that log in as an attacker would: with the public enroll login, or with one agent's
own key (read from its data dir, as from a stolen box). Each test is an attack that worked
before the fix:

- reply-subject injection: a request to ``outpost.v1.enroll`` whose reply subject is a
  JetStream API call, a KV key or another agent's subject (the hub answered it with its rights);
- the hub's own NATS user could purge and delete streams;
- a corrupt record in the registry bucket stopped the hub from starting;
- dedupe poisoning: agent A publishing on its own subject with B's next ``Nats-Msg-Id``;
- site hijack: A's signed ``agent`` event and ``offer`` (and a re-enrollment) claiming another
  site, name and 1024 cpus;
- one edge flooding the events stream until others' events were pushed out;
- a gap the hub never noticed (events JetStream acked that the hub never applied).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

from federation import subjects, wire
from federation.streams import AGENTS_BUCKET
from tests import test_dashboard as dashboard
from tests.helpers import (
    ROOT,
    AgentProcess,
    HubProcess,
    converged,
    enroll_nats_creds,
    hub_nats_creds,
    joined,
    wait_until,
)
from tests.test_nats_auth import client, creds_of, enrolled

# The dashboard tests' chromium fixture (installed with apt when missing).
chromium_path = dashboard.chromium_path


@pytest.fixture
def secure_hub(tmp_path: Path) -> Iterator[HubProcess]:
    hub = HubProcess(tmp_path / "hub", "", ["--disconnected-after", "2.5",
                                            "--unreachable-after", "4"], embedded=True).start()
    try:
        yield hub
    finally:
        hub.stop()


def metric(hub: HubProcess, name: str, labels: str = "") -> float:
    text = hub.api("GET", "/metrics").raw.decode()
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def applied_seq(hub: HubProcess, agent_id: str) -> int:
    db = sqlite3.connect(f"file:{hub.data_dir / 'hub.db'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT applied_seq FROM agents WHERE id = ?",
                              (agent_id,)).fetchone()[0])
    finally:
        db.close()


async def stream_counts(hub: HubProcess, *filters: str) -> dict[str, int]:
    """Messages in each stream (and on each filtered events subject), as the hub sees them."""
    async with client(hub.nats_url, hub_nats_creds(hub.data_dir)) as me:
        js = me.nc.jetstream(timeout=5)
        out = {name: (await js.stream_info(name)).state.messages
               for name in (subjects.EVENTS_STREAM, subjects.COMMANDS_STREAM,
                            f"KV_{AGENTS_BUCKET}")}
        for subject in filters:
            info = await js.stream_info(subjects.EVENTS_STREAM, subjects_filter=subject)
            out[subject] = (info.state.subjects or {}).get(subject, 0)
        return out


# ------------------------------------------------------------ 1. replies and least privilege


async def test_the_hub_answers_only_into_the_requesters_inbox(
        start_agent: Callable[..., AgentProcess], secure_hub: HubProcess) -> None:
    """With the public enroll login (and with an agent's key), requests whose reply subject
    is a purge, a KV key or another agent's subjects are dropped, counted and logged; the
    streams and the registry are untouched and the hub starts again."""
    a, a_id = enrolled(start_agent, secure_hub, "a")
    b, b_id = enrolled(start_agent, secure_hub, "b")
    before = await stream_counts(secure_hub)
    assert before[subjects.EVENTS_STREAM] > 0 and before[f"KV_{AGENTS_BUCKET}"] == 2
    evil = [f"$JS.API.STREAM.PURGE.{subjects.EVENTS_STREAM}",
            f"$JS.API.STREAM.PURGE.{subjects.COMMANDS_STREAM}",
            f"$JS.API.STREAM.PURGE.KV_{AGENTS_BUCKET}",
            f"$JS.API.STREAM.DELETE.{subjects.COMMANDS_STREAM}",
            f"$KV.{AGENTS_BUCKET}.x", f"$KV.{AGENTS_BUCKET}.{b_id}",
            subjects.events(b_id), subjects.command(b_id, 1), subjects.heartbeat(b_id),
            f"_INBOX.{b_id}.x.y", "_INBOX_HUB.x", "_INBOX_ENROLL.*", "_INBOX_ENROLL.>"]
    junk = wire.pack({"token": "nope"})
    async with client(secure_hub.nats_url, enroll_nats_creds(secure_hub.data_dir)) as me:
        for reply in evil:
            await me.nc.publish(subjects.ENROLL, junk, reply=reply)
        # Answered in order by the one subscription: once this answer is here, all were seen.
        answer = wire.unpack((await me.nc.request(subjects.ENROLL, junk, timeout=5)).data)
        assert answer["ok"] is False
    # A's own key asking for a rotation (or an enrollment) with a reply into the streams.
    rotation = wire.rotate_request(wire.Signer((a.data_dir / "agent.key").read_bytes()),
                                   wire.Signer(bytes(32)), a_id, 10**6)
    async with client(secure_hub.nats_url, creds_of(a, a_id)) as me:
        for reply in (f"$JS.API.STREAM.PURGE.{subjects.EVENTS_STREAM}",
                      f"$KV.{AGENTS_BUCKET}.{a_id}"):
            await me.nc.publish(subjects.ENROLL, rotation, reply=reply)
        await me.nc.flush()
    after = await stream_counts(secure_hub)
    for name in before:
        assert after[name] >= before[name], (name, before, after)
    wait_until(lambda: metric(secure_hub, "outpost_replies_dropped_total") >= len(evil) + 2,
               10, what="the injected requests counted as dropped")
    assert "outside the requester's inbox" in secure_hub.log()
    # The rotation was not applied either: a's key is unchanged and it still works.
    task = a.submit("still-a", ["true"])
    a.wait_state(task["id"], "finished")
    converged(a, secure_hub)
    agents = {x["id"]: x for x in secure_hub.api("GET", "/v1/agents").body["items"]}
    assert agents[b_id]["status"] == "online" and set(agents) == {a_id, b_id}
    secure_hub.stop()
    secure_hub.start()  # no bogus registry record keeps it from starting
    assert {x["id"] for x in secure_hub.api("GET", "/v1/agents").body["items"]} == {a_id, b_id}


async def test_the_hubs_own_nats_user_cannot_purge_or_delete(
        start_agent: Callable[..., AgentProcess], secure_hub: HubProcess) -> None:
    """Defence in depth: even the hub's own key (what a buggy responder publishes with) may
    not purge, delete or reconfigure a stream or bucket; the hub still runs its whole flow."""
    a, a_id = enrolled(start_agent, secure_hub, "a")
    before = await stream_counts(secure_hub)
    async with client(secure_hub.nats_url, hub_nats_creds(secure_hub.data_dir)) as me:
        js = me.nc.jetstream(timeout=1)
        info = await js.stream_info(subjects.EVENTS_STREAM)  # reading is allowed
        config = info.config
        config.max_msgs = 1
        for attempt in (js.purge_stream(subjects.EVENTS_STREAM),
                        js.purge_stream(subjects.COMMANDS_STREAM),
                        js.purge_stream(f"KV_{AGENTS_BUCKET}"),
                        js.delete_stream(subjects.COMMANDS_STREAM),
                        js.delete_key_value(AGENTS_BUCKET),
                        js.delete_msg(subjects.EVENTS_STREAM, 1),
                        js.update_stream(config)):
            with pytest.raises(nats.errors.TimeoutError):
                await attempt
        for api in (f"STREAM.PURGE.{subjects.EVENTS_STREAM}",
                    f"STREAM.DELETE.{subjects.COMMANDS_STREAM}",
                    f"STREAM.UPDATE.{subjects.EVENTS_STREAM}"):
            await me.violation("publish", f"$JS.API.{api}")
    assert await stream_counts(secure_hub) == before
    placed = secure_hub.api("POST", "/v1/tasks", {"name": "from-core", "command": ["true"],
                                                  "constraints": {"agent": a_id}})
    assert placed.status in (201, 202), placed.body
    wait_until(lambda: a.api("GET", f"/v1/tasks/{placed.body['id']}").status == 200
               and a.task(placed.body["id"])["state"] == "finished", 20,
               what="the core's task to run at the agent")


async def test_a_corrupt_registry_record_is_skipped_not_fatal(
        start_agent: Callable[..., AgentProcess], secure_hub: HubProcess) -> None:
    a, a_id = enrolled(start_agent, secure_hub, "a")
    async with client(secure_hub.nats_url, hub_nats_creds(secure_hub.data_dir)) as me:
        kv = await me.nc.jetstream(timeout=5).key_value(AGENTS_BUCKET)
        await kv.put("x", wire.pack({"ok": False, "code": "unauthorized"}))  # an old reply
        await kv.put("agarbage", b"\xc1 not msgpack")
    secure_hub.stop()
    (secure_hub.data_dir / "hub.db").unlink()  # a fresh view restores every record
    for suffix in ("-wal", "-shm"):
        (secure_hub.data_dir / f"hub.db{suffix}").unlink(missing_ok=True)
    secure_hub.start()
    assert [x["id"] for x in secure_hub.api("GET", "/v1/agents").body["items"]] == [a_id]
    log = secure_hub.log()
    assert "skipping the unreadable OUTPOST_AGENTS record 'x'" in log
    assert "skipping the unreadable OUTPOST_AGENTS record 'agarbage'" in log


# ------------------------------------------------------------ 2. dedupe poisoning


async def test_another_agent_cannot_poison_the_dedupe(
        start_agent: Callable[..., AgentProcess], secure_hub: HubProcess) -> None:
    """A (its own key, its own subject) sends every ``Nats-Msg-Id`` B's next batches could
    carry; B's events still reach the hub, and no gap opens."""
    a, a_id = enrolled(start_agent, secure_hub, "a")
    b, b_id = enrolled(start_agent, secure_hub, "b")
    converged(b, secure_hub)
    floor = b.api("GET", "/v1/info").body["link"]["acked_seq"]
    async with client(secure_hub.nats_url, creds_of(a, a_id)) as me:
        js = me.nc.jetstream(timeout=5)
        sends = [js.publish(subjects.events(a_id), b"poison",
                            headers={"Nats-Msg-Id": f"{b_id}:{first}:{last}"})
                 for first in range(floor + 1, floor + 25)
                 for last in range(first, first + 25)]
        acks = await asyncio.gather(*sends)
        assert not any(ack.duplicate for ack in acks)
    for i in range(3):
        task = b.submit(f"b{i}", ["true"])
        b.wait_state(task["id"], "finished")
    converged(b, secure_hub, timeout=15)
    assert applied_seq(secure_hub, b_id) >= b.api("GET", "/v1/info").body["link"]["acked_seq"]


# ------------------------------------------------------------ 3. site hijack


def publish_as(agent: AgentProcess, agent_id: str, url: str, first: int,
               *items: tuple[str, dict[str, Any]]) -> int:
    """Sign ``items`` with the agent's key as its events ``first..`` and publish them on its
    subject (an attacker holding the key); returns the last seq."""
    signer = wire.Signer((agent.data_dir / "agent.key").read_bytes())
    now = time.time()
    events = [wire.Event(first + i, kind, now, orjson.dumps(body))
              for i, (kind, body) in enumerate(items)]
    data = wire.sign_batch(agent_id, events, signer, first=first)

    async def send() -> None:
        async with client(url, creds_of(agent, agent_id)) as me:
            await me.nc.jetstream(timeout=5).publish(subjects.events(agent_id), data)

    asyncio.run(send())
    return first + len(items) - 1


def enroll_as(hub: HubProcess, signer: wire.Signer, token: str, **fields: Any) -> dict[str, Any]:
    async def ask() -> dict[str, Any]:
        async with client(hub.nats_url, enroll_nats_creds(hub.data_dir)) as me:
            reply = await me.nc.request(subjects.ENROLL, wire.enroll_request(
                signer, token, **{"labels": {}, "resources": {"cpus": 1}, **fields}), timeout=5)
            answer: dict[str, Any] = wire.unpack(reply.data)
            return answer

    return asyncio.run(ask())


def test_a_stolen_edge_cannot_take_over_another_site(
        start_agent: Callable[..., AgentProcess], secure_hub: HubProcess) -> None:
    """A's key signs an ``agent`` event and an ``offer`` claiming B's site and name and 1024
    cpus, and asks to re-enroll as that: all refused (counted, logged); B keeps its name; a
    new key cannot take B's name; a site-bound token enrolls its site only."""
    nats_at = type("N", (), {"url": secure_hub.nats_url})
    a = joined(start_agent, secure_hub, nats_at, "--site", "berlin", "--cpus", "2",
               name="edge-berlin")
    a_id = a.api("GET", "/v1/info").body["agent_id"]
    b = joined(start_agent, secure_hub, nats_at, "--site", "oslo", "--cpus", "2",
               name="edge-oslo")
    b_id = b.api("GET", "/v1/info").body["agent_id"]
    b_task = b.submit("b-task", ["true"])
    b.wait_state(b_task["id"], "finished")
    converged(b, secure_hub)  # a runs no tasks: the core's list is b's
    wait_until(lambda: a.api("GET", "/v1/info").body["link"]["outbox_depth"] == 0, 10)
    a.stop()  # the attacker has the box (and its key); its seqs are the attacker's now
    # Next after the last seq a's own store used (what the hub applied may lag behind it).
    db = sqlite3.connect(f"file:{a.data_dir / 'agent.db'}?mode=ro", uri=True)
    try:
        first = int(db.execute("SELECT MAX(seq) FROM events").fetchone()[0]) + 1
    finally:
        db.close()
    big = {"cpus": 1024, "mem_mb": 1 << 20, "disk_mb": 1 << 20}
    last = publish_as(a, a_id, secure_hub.nats_url, first,
                      ("agent", {"id": a_id, "name": "edge-oslo", "site": "oslo",
                                 "labels": {}, "resources": big, "status": "online",
                                 "version": "x", "isolation": "rlimit"}),
                      ("offer", {"id": f"{a_id}:x", "agent_id": a_id, "site": "oslo",
                                 "labels": {}, **big, "used": {},
                                 "expires_at": time.time() + 600}),
                      ("offer", {"id": f"{a_id}:y", "agent_id": a_id, "site": "berlin",
                                 "labels": {}, **big, "used": {},
                                 "expires_at": time.time() + 600}),
                      ("task", {"id": b_task["id"], "name": "b-task", "state": "failed"}),
                      ("result", {"status": "nonsense"}))
    wait_until(lambda: applied_seq(secure_hub, a_id) >= last, 10, what="the forged events")
    assert secure_hub.api("GET", "/v1/agents/edge-oslo").body["id"] == b_id
    mine = secure_hub.api("GET", f"/v1/agents/{a_id}").body
    assert (mine["name"], mine["site"], mine["resources"]["cpus"]) == ("edge-berlin", "berlin", 2)
    offers = secure_hub.api("GET", "/v1/offers").body["items"]
    assert not [o for o in offers if o["agent_id"] == a_id and o["cpus"] > 2], offers
    assert all(o["site"] == "berlin" for o in offers if o["agent_id"] == a_id), offers
    for field in ("name", "site", "resources", "offer_site", "offer_resources"):
        assert metric(secure_hub, "outpost_ingest_refused_claims_total",
                      f'{{field="{field}"}}') >= 1, field
    assert "refused site oslo" in secure_hub.log()
    # Ingest's other refusals are in /metrics too (issue 10, section 5).
    assert metric(secure_hub, "outpost_ingest_foreign_tasks_total") >= 1
    assert metric(secure_hub, "outpost_ingest_bad_events_total") >= 1
    assert "outpost_ingest_gaps_total " in secure_hub.api("GET", "/metrics").raw.decode()
    assert secure_hub.api("GET", f"/v1/tasks/{b_task['id']}").body["state"] == "finished"
    # Re-enrolling the same key as another site (no token needed for a known key): refused.
    signer = wire.Signer((a.data_dir / "agent.key").read_bytes())
    answer = enroll_as(secure_hub, signer, "any", name="edge-oslo", site="oslo")
    assert answer["ok"] is False and answer["code"] == "forbidden", answer
    answer = enroll_as(secure_hub, signer, "any", name="edge-berlin", site="berlin",
                       resources=big)
    assert answer["ok"] is False and "resources" in answer["error"], answer
    assert secure_hub.api("GET", f"/v1/agents/{a_id}").body["site"] == "berlin"
    # A new key may not take a name in use; a site-bound token enrolls its site only.
    newcomer = wire.Signer(bytes(range(7, 39)))
    answer = enroll_as(secure_hub, newcomer, secure_hub.join_token(), name="edge-oslo",
                       site="oslo")
    assert answer["ok"] is False and answer["code"] == "conflict", answer
    token = subprocess.run(
        [sys.executable, "-m", "core_hub", "token", "create", "--data-dir",
         str(secure_hub.data_dir), "--site", "berlin"], capture_output=True, text=True,
        cwd=ROOT, check=True).stdout.strip()
    answer = enroll_as(secure_hub, newcomer, token, name="edge-3", site="oslo")
    assert answer["ok"] is False and "site 'berlin' only" in answer["error"], answer
    answer = enroll_as(secure_hub, newcomer, token, name="edge-3", site="berlin")
    assert answer["ok"] is True, answer


# ------------------------------------------------------------ 2. quotas and gaps


def hub_toml(path: Path, **settings: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[hub]\n" + "".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    return path


async def test_one_edge_cannot_flush_the_others_events_out(
        start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    """A size-limited events stream (1 MiB) with a per-agent quota (20 messages): A floods
    its own subject with 3 MiB; B's events stay in the stream, A holds at most its quota."""
    config = hub_toml(tmp_path / "hub.toml", events_max_bytes=1 << 20,
                      events_max_msgs_per_subject=20)
    hub = HubProcess(tmp_path / "hub", "", ["--config", str(config)], embedded=True).start()
    try:
        a, a_id = enrolled(start_agent, hub, "a")
        b, b_id = enrolled(start_agent, hub, "b")
        converged(b, hub)
        before = await stream_counts(hub, subjects.events(b_id))
        assert before[subjects.events(b_id)] > 0
        async with client(hub.nats_url, creds_of(a, a_id)) as me:
            js = me.nc.jetstream(timeout=10)
            junk = bytes(2048)
            for _ in range(15):
                await asyncio.gather(*(js.publish(subjects.events(a_id), junk)
                                       for _i in range(100)))
        after = await stream_counts(hub, subjects.events(a_id), subjects.events(b_id))
        assert after[subjects.events(b_id)] >= before[subjects.events(b_id)], (before, after)
        assert after[subjects.events(a_id)] <= 20
    finally:
        hub.stop()


def test_a_gap_that_does_not_fill_is_reported(
        start_agent: Callable[..., AgentProcess], nats_proc: Any, tmp_path: Path,
        chromium_path: str) -> None:
    """Events JetStream acked but the hub never applied (here: turned over by the per-agent
    quota while the hub was down): the hub says so in /metrics, the log and the agent's
    record the dashboard shows, instead of calling the agent in sync."""
    config = hub_toml(tmp_path / "hub.toml", events_max_msgs_per_subject=10,
                      sync_gap_after_s=1.0)
    hub = HubProcess(tmp_path / "hub", nats_proc.url,
                     ["--config", str(config), "--disconnected-after", "2.5",
                      "--unreachable-after", "4"]).start()
    try:
        b = joined(start_agent, hub, nats_proc, name="b")
        b_id = b.api("GET", "/v1/info").body["agent_id"]
        converged(b, hub)
        assert metric(hub, "outpost_sync_gaps") == 0
        hub.stop()
        for i in range(12):  # each acked before the next: more messages than the quota
            task = b.submit(f"t{i}", ["true"])
            b.wait_state(task["id"], "finished")
            wait_until(lambda: b.api("GET", "/v1/info").body["link"]["outbox_depth"] == 0, 10)
        hub.start()
        wait_until(lambda: metric(hub, "outpost_sync_gaps") == 1, 20, what="the gap reported")
        assert metric(hub, "outpost_sync_gaps_total") == 1
        gap = hub.api("GET", f"/v1/agents/{b_id}").body["outbox"]["gap"]
        assert gap["acked_seq"] > gap["applied_seq"], gap
        assert "events were lost on the way" in hub.log()
        # The dashboard's card for b says so (real chromium, as tests/test_dashboard.py).
        from playwright.sync_api import expect, sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path,
                                         args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page()
                page.goto(f"{hub.url}/#token={hub.token}")
                outbox = page.locator(f'article.agent[data-agent-id="{b_id}"] .outbox')
                expect(outbox).to_have_text(re.compile(r"^sync gap · acked \d+, core has \d+$"),
                                            timeout=15_000)
            finally:
                browser.close()
    finally:
        hub.stop()


def test_only_an_admin_changes_an_agents_site(
        start_agent: Callable[..., AgentProcess], secure_hub: HubProcess) -> None:
    """``outpost-hub agents move`` (POST /v1/agents/{id}/enrollment, admin): the agent's site
    changes at the core, its offers are then judged by the new site; names stay unique; an
    operator token may not; the edge answers 409."""
    nats_at = type("N", (), {"url": secure_hub.nats_url})
    a = joined(start_agent, secure_hub, nats_at, "--site", "berlin", name="edge-a")
    a_id = a.api("GET", "/v1/info").body["agent_id"]
    joined(start_agent, secure_hub, nats_at, "--site", "oslo", name="edge-oslo")
    moved = subprocess.run(
        [sys.executable, "-m", "core_hub", "agents", "move", "--data-dir",
         str(secure_hub.data_dir), a_id, "--site", "munich", "--cpus", "8"],
        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert moved.returncode == 0 and "at site munich" in moved.stdout, moved.stderr
    agent = secure_hub.api("GET", f"/v1/agents/{a_id}").body
    assert (agent["site"], agent["resources"]["cpus"]) == ("munich", 8)
    taken = secure_hub.api("POST", f"/v1/agents/{a_id}/enrollment", {"name": "edge-oslo"})
    assert taken.status == 409, taken.body
    assert secure_hub.api("POST", f"/v1/agents/{a_id}/enrollment", {"site": "x y"}).status == 422
    operator = subprocess.run(
        [sys.executable, "-m", "core_hub", "apitoken", "create", "--data-dir",
         str(secure_hub.data_dir), "--role", "operator"],
        capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip().split()[-1]
    assert secure_hub.api("POST", f"/v1/agents/{a_id}/enrollment", {"site": "oslo"},
                          token=operator).status == 403
    assert a.api("POST", f"/v1/agents/{a_id}/enrollment", {"site": "oslo"}).status == 409
    # The edge still says berlin (its own config) in its offers: they stand for munich now.
    a.api("POST", "/v1/tasks", {"name": "nudge", "command": ["true"]})  # a fresh offer
    wait_until(lambda: metric(secure_hub, "outpost_ingest_refused_claims_total",
                              '{field="offer_site"}') >= 1, 30, what="a's offer site refused")
    offers = secure_hub.api("GET", "/v1/offers").body["items"]
    assert [o["site"] for o in offers if o["agent_id"] == a_id] == ["munich"], offers


# ------------------------------------------------------------ 8. the public enroll login


FLOOD_RATE, FLOOD_BURST = 50, 100  # the hub's enroll rate in the flood test (--enroll-rate)


def test_a_flood_through_the_public_enroll_login_is_shed_not_served_or_logged(
        tmp_path: Path, start_agent: Callable[..., AgentProcess]) -> None:
    """Anyone may log in as the public enroll user. From there, one client sent 26,000 bogus
    enrollment requests a second (fresh keys, a made-up join token): each got a signature
    check, a token lookup and a log line, so the hub ran at 100 % CPU, its API answered in
    about 1 s instead of 4 ms, and its log grew 3.5 MB in 15 s. Requests beyond the hub's
    enroll rate are now shed unread (counted in /metrics), a full backlog stops the hub
    listening until it drains, and refusals are logged as a summary, not one line each."""
    import os

    from federation.identity import id_from_public_key

    hub = HubProcess(tmp_path / "hub", "", ["--enroll-rate", str(FLOOD_RATE),
                                            "--enroll-burst", str(FLOOD_BURST)],
                     embedded=True).start()
    try:
        a, a_id = enrolled(start_agent, hub, "a")
        lines_before = len(hub.log().splitlines())
        account = hub.join_token().split(".", 1)[1]
        bogus = f"opj_{'x' * 43}.{account}"
        signers = [wire.Signer(os.urandom(32)) for _ in range(20)]
        flood = [(f"_INBOX.{id_from_public_key(s.public)}.x",
                  wire.enroll_request(s, bogus, name=f"n{i}", site="s"))
                 for i, s in enumerate(signers)]
        sent = 0
        started = time.monotonic()

        async def send() -> None:
            nonlocal sent
            async with client(hub.nats_url, enroll_nats_creds(hub.data_dir)) as me:
                for round_ in range(1000):
                    for reply, data in flood:
                        await me.nc.publish(subjects.ENROLL, data, reply=reply)
                    # and one whose reply would land outside the sender's inbox
                    await me.nc.publish(subjects.ENROLL, flood[0][1],
                                        reply=f"$JS.API.STREAM.PURGE.{subjects.EVENTS_STREAM}")
                    sent += len(flood) + 1
                    if round_ % 25 == 0:
                        await me.nc.flush()
                await me.nc.flush()

        asyncio.run(send())
        # The enrolled agent goes on syncing.
        task = a.submit("after-the-flood", ["true"])
        a.wait_state(task["id"], "finished")
        converged(a, hub)
        wait_until(lambda: metric(hub, "outpost_enrollment_requests_shed_total") > 0, 10,
                   what="shed requests counted")
        elapsed = time.monotonic() - started
        handled = sum(metric(hub, "outpost_enrollments_total", f'{{result="{r}"}}')
                      for r in ("ok", "refused"))
        assert 0 < handled <= FLOOD_BURST + FLOOD_RATE * elapsed + 1, (handled, elapsed)
        shed = metric(hub, "outpost_enrollment_requests_shed_total")
        dropped = metric(hub, "outpost_replies_dropped_total")
        # A full backlog takes the hub's interest off the subject: most of the flood is
        # dropped by nats-server and never reaches the hub at all.
        assert dropped >= 1 and shed >= 1 and handled + shed + dropped < sent // 2, (
            handled, shed, dropped, sent)
        new_lines = hub.log().splitlines()[lines_before:]
        assert len(new_lines) < 100, (len(new_lines), new_lines[:5], new_lines[-5:])
        summary = [line for line in new_lines if "enrollment requests shed" in line]
        assert summary, new_lines[-20:]
        # Once the flood is over, a real agent enrolls as usual.
        b, b_id = enrolled(start_agent, hub, "b")
        assert b_id != a_id
    finally:
        hub.stop()


async def test_an_agents_own_request_subject_takes_only_its_own_rotations_and_renewals(
        start_agent: Callable[..., AgentProcess], secure_hub: HubProcess) -> None:
    """``subjects.agent_requests(id)`` is the flood-proof lane for an enrolled agent's
    rotations and renewals: the server lets only that agent publish there, and the hub
    answers nothing else there (an enrollment, or a renewal for another agent)."""
    import os

    a, a_id = enrolled(start_agent, secure_hub, "a")
    b, b_id = enrolled(start_agent, secure_hub, "b")
    a_key = wire.Signer((a.data_dir / "agent.key").read_bytes())
    async with client(secure_hub.nats_url, creds_of(a, a_id)) as me:
        answer = wire.unpack((await me.nc.request(
            subjects.agent_requests(a_id), wire.renew_request(a_key, a_id), timeout=5)).data)
        assert answer["ok"] is True and answer["agent_id"] == a_id and answer["nats_jwt"]
        stranger = wire.Signer(os.urandom(32))
        enrollment = wire.enroll_request(stranger, "opj_x.y", name="n", site="s")
        answer = wire.unpack((await me.nc.request(
            subjects.agent_requests(a_id), enrollment, timeout=5)).data)
        assert answer["ok"] is False and answer["code"] == "invalid", answer
        await me.nc.publish(subjects.agent_requests(b_id), wire.renew_request(a_key, a_id))
        await me.violation("publish", subjects.agent_requests(b_id))
    async with client(secure_hub.nats_url, enroll_nats_creds(secure_hub.data_dir)) as me:
        await me.nc.publish(subjects.agent_requests(a_id), wire.renew_request(a_key, a_id))
        await me.violation("publish", subjects.agent_requests(a_id))
    agents = {x["id"]: x["status"] for x in secure_hub.api("GET", "/v1/agents").body["items"]}
    assert agents == {a_id: "online", b_id: "online"}
