"""API tokens with roles at the core: viewer reads, operator acts, revoked tokens stop at once."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT, HubProcess, http


def apitoken(hub: HubProcess, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "core_hub", "apitoken", *args, "--data-dir",
                          str(hub.data_dir)], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    return out.stdout.strip()


def test_roles_and_revocation(hub_proc: HubProcess) -> None:
    viewer = apitoken(hub_proc, "create", "--role", "viewer", "--name", "wall screen")
    operator = apitoken(hub_proc, "create", "--role", "operator")
    info = http("GET", hub_proc.url + "/v1/info", token=viewer)
    assert info.status == 200 and info.body["token_role"] == "viewer"
    assert http("GET", hub_proc.url + "/v1/info", token=operator).body["token_role"] == "operator"
    assert http("GET", hub_proc.url + "/v1/tasks", token=viewer).status == 200
    spec = {"name": "x", "command": ["true"]}
    refused = http("POST", hub_proc.url + "/v1/tasks", spec, token=viewer)
    assert refused.status == 403 and refused.body["error"]["code"] == "forbidden"
    assert "viewer" in refused.body["error"]["message"]
    assert http("POST", hub_proc.url + "/v1/tasks", spec, token=operator).status == 201
    listing = apitoken(hub_proc, "ls")
    assert "wall screen" in listing and viewer not in listing, "only digests are listed"
    digest = next(line.split()[0] for line in listing.splitlines() if "wall screen" in line)
    apitoken(hub_proc, "revoke", digest)
    assert http("GET", hub_proc.url + "/v1/tasks", token=viewer).status == 401
    assert http("GET", hub_proc.url + "/v1/tasks", token=operator).status == 200
