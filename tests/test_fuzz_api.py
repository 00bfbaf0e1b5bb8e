"""schemathesis against ``/openapi.json`` of a real edge and a real core: no 5xx, every
response (status, content type, body) as the document says. A longer run: ``make fuzz``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from federation.natsd import NatsServer
from tests.helpers import AgentProcess, joined

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance")
# Endless streams (SSE, log follow) are tested on their own, not by a fuzzer.
EXCLUDE = ("/v1/events", "/v1/tasks/{id}/logs")


def fuzz(url: str, token: str, examples: int) -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).with_name("schemathesis")
    args = [str(cli), "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {token}",
            "--checks", CHECKS, "--max-examples", str(examples), "--seed", "7",
            "--request-timeout", "10", "--no-color"]
    for path in EXCLUDE:
        args += ["--exclude-path", path]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
    # Within the test's own timeout (make fuzz raises it), leaving room for set-up.
    limit = max(int(os.environ.get("OUTPOST_FUZZ_TIMEOUT", "400")) - 60, 300)
    return subprocess.run(args, capture_output=True, text=True, timeout=limit, env=env)


@pytest.mark.timeout(int(os.environ.get("OUTPOST_FUZZ_TIMEOUT", "400")))
@pytest.mark.parametrize("role", ["edge", "core"])
def test_schemathesis_finds_nothing(role: str, request: pytest.FixtureRequest,
                                    start_agent: Callable[..., AgentProcess]) -> None:
    node: Any
    if role == "edge":
        node = start_agent("--cpus", "2", "--mem-mb", "512")
    else:
        nats: NatsServer = request.getfixturevalue("nats_proc")
        node = request.getfixturevalue("hub_proc")
        joined(start_agent, node, nats, "--cpus", "2", "--mem-mb", "512")
    result = fuzz(node.url, node.token, examples=int(os.environ.get("OUTPOST_FUZZ", "12")))
    if os.environ.get("OUTPOST_FUZZ_REPORT"):  # make fuzz: keep the summary to read
        Path(os.environ["OUTPOST_FUZZ_REPORT"]).with_suffix(f".{role}.txt").write_text(
            result.stdout)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
