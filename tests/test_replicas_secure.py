"""Hub replicas under NATS least privilege (operator mode), on a nats-server run from
``configs/nats/hub.conf``: the replicas share the operator and account keys (docs/scaling.md
says which files to copy), so an agent's user JWT is good whoever issued it, and whichever
replica leads pushes revocations the server acts on.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

from core_hub.natsauth import SHARED_KEY_FILES
from tests.deploy_support import secure_hub_with_leafnodes
from tests.helpers import AgentProcess, HubProcess, wait_until, wait_until_async
from tests.test_nats_auth import client, creds_of, enrolled, refused

LIVENESS = ["--disconnected-after", "2.5", "--unreachable-after", "4"]


def _second_replica(tmp_path: Path, leader: HubProcess) -> HubProcess:
    """Replica b: the leader's shared keys copied in, its own authorization file (the server
    includes the leader's; both hold the same operator and accounts)."""
    data = tmp_path / "hub-b"
    data.mkdir()
    for name in SHARED_KEY_FILES:
        shutil.copy2(leader.data_dir / name, data / name)
    config = tmp_path / "hub-b.toml"
    config.write_text(f'[hub]\nnats_auth_file = "{data / "nats-auth.conf"}"\n')
    return HubProcess(data, leader.nats_url, ["--config", str(config), *LIVENESS])


async def _revoked_while_connected(url: str, creds: object, revoke: Callable[[], None]) -> None:
    """Hold a connection as ``creds``, revoke, and see the server close it and refuse it."""
    async with client(url, creds) as me:  # type: ignore[arg-type]
        revoke()
        await wait_until_async(lambda: me.nc.is_closed, 10,
                               what="the revoked agent's connection closed by the server")
    assert "Authorization Violation" in await refused(url, creds)  # type: ignore[arg-type]


def test_least_privilege_replicas_share_the_account_and_the_new_leader_revokes(
        tmp_path: Path, start_agent: Callable[..., AgentProcess]) -> None:
    with secure_hub_with_leafnodes(tmp_path, *LIVENESS) as secure:
        a = secure.hub
        b = _second_replica(tmp_path, a).start(wait=False)
        try:
            b.serving(30)
            wait_until(lambda: "standby: the placement lease is held by" in b.log(), 20,
                       what="hub-b waiting as a standby")
            x, x_id = enrolled(start_agent, a, "x")
            y, y_id = enrolled(start_agent, a, "y")
            # Through the standby: forwarded to the leader, which pushes the account.
            asyncio.run(_revoked_while_connected(
                a.nats_url, creds_of(x, x_id),
                lambda: _ok(b.api("POST", f"/v1/agents/{x_id}/revoke"))))
            a.stop(signal.SIGKILL)
            b.leading(30)
            # The new leader signs with the same account key and pushes as the same system
            # user: its revocation reaches the server too.
            asyncio.run(_revoked_while_connected(
                a.nats_url, creds_of(y, y_id),
                lambda: _ok(b.api("POST", f"/v1/agents/{y_id}/revoke"))))
            # An agent enrolled by the new leader logs in with the JWT it issued.
            z, z_id = enrolled(start_agent, b, "z")
            task = z.submit("after-takeover", ["true"])
            z.wait_state(task["id"], "finished")
            wait_until(lambda: b.api("GET", f"/v1/tasks/{task['id']}").body.get("state")
                       == "finished", 20, what="z's task at the new leader")
            for agent, agent_id in ((x, x_id), (y, y_id)):
                assert "Authorization Violation" in asyncio.run(
                    refused(a.nats_url, creds_of(agent, agent_id)))
        finally:
            b.stop()


def _ok(resp: object) -> None:
    assert getattr(resp, "status", None) == 200, getattr(resp, "body", resp)
