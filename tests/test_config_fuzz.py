"""Hypothesis against the config loaders of the agent and the hub (file + environment +
flags): whatever a config file or the environment holds, the loader returns a config or
raises ``ConfigError`` with a message; it never crashes with another exception."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core_hub import __main__ as hub_main
from core_hub.config import HubConfig
from edge_agent import __main__ as agent_main
from edge_agent.config import AgentConfig
from federation.errors import ConfigError

AGENT_KEYS = [f.name for f in dataclasses.fields(AgentConfig)]
HUB_KEYS = [f.name for f in dataclasses.fields(HubConfig)]
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(min_size=1, max_size=8), inner,
                                                 max_size=4)), max_leaves=8)


def toml_value(v: Any) -> str:
    """Enough of a TOML writer for what ``values`` makes (inline tables, mixed arrays)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_doc(table: str, body: dict[str, Any], top: dict[str, Any]) -> str:
    lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in top.items()]
    lines.append(f"[{table}]")
    lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def settings_for(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.one_of(st.sampled_from(keys), st.text(min_size=1, max_size=10)),
                           values, max_size=6)


def env_for(keys: list[str]) -> st.SearchStrategy[dict[str, str]]:
    names = st.sampled_from([f"OUTPOST_{k.upper()}" for k in keys])
    text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
                   max_size=20)
    return st.dictionaries(names, text, max_size=4)


def _loads(main: Any, argv: list[str], env: dict[str, str]) -> None:
    try:
        main.load_config(main.parse_args(argv), env)
    except ConfigError as exc:
        assert exc.message


@FUZZ
@given(body=settings_for(AGENT_KEYS), top=settings_for(AGENT_KEYS), env=env_for(AGENT_KEYS))
def test_agent_config_never_crashes(tmp_path_factory: Any, body: dict[str, Any],
                                    top: dict[str, Any], env: dict[str, str]) -> None:
    path = tmp_path_factory.mktemp("cfg") / "edge.toml"
    path.write_text(toml_doc("agent", body, top))
    _loads(agent_main, ["--config", str(path), "--data-dir", "/tmp/outpost-fuzz"], env)


@FUZZ
@given(body=settings_for(HUB_KEYS), top=settings_for(HUB_KEYS), env=env_for(HUB_KEYS))
def test_hub_config_never_crashes(tmp_path_factory: Any, body: dict[str, Any],
                                  top: dict[str, Any], env: dict[str, str]) -> None:
    path = tmp_path_factory.mktemp("cfg") / "hub.toml"
    path.write_text(toml_doc("hub", body, top))
    _loads(hub_main, ["run", "--config", str(path), "--data-dir", "/tmp/outpost-fuzz"], env)


@FUZZ
@given(data=st.binary(max_size=300))
def test_any_file_bytes_are_a_config_or_a_config_error(tmp_path_factory: Any,
                                                      data: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "edge.toml"
    path.write_bytes(data)
    _loads(agent_main, ["--config", str(path), "--data-dir", "/tmp/outpost-fuzz"], {})
    _loads(hub_main, ["run", "--config", str(path), "--data-dir", "/tmp/outpost-fuzz"], {})


def test_odd_paths_and_tables_are_config_errors(tmp_path: Path) -> None:
    for argv_path in (tmp_path, tmp_path / "missing.toml"):  # a directory, a missing file
        _loads(agent_main, ["--config", str(argv_path), "--data-dir", str(tmp_path)], {})
    odd = tmp_path / "odd.toml"
    odd.write_text("agent = 5\nhub = [1, 2]\n")
    _loads(agent_main, ["--config", str(odd), "--data-dir", str(tmp_path)], {})
    _loads(hub_main, ["run", "--config", str(odd), "--data-dir", str(tmp_path)], {})
    unreadable = tmp_path / "secret.toml"
    unreadable.write_text("listen = '127.0.0.1:1'\n")
    os.chmod(unreadable, 0)
    _loads(agent_main, ["--config", str(unreadable), "--data-dir", str(tmp_path)], {})
