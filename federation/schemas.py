"""JSON Schemas of the API: the single source for request validation and ``/openapi.json``.

Request bodies are checked with validators compiled from these dicts (fastjsonschema), so the
document a client reads is exactly the rule the server enforces.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from federation.errors import Invalid

NAME_PATTERN = r"^[a-z0-9]([a-z0-9_.-]{0,62})$"
LABEL_KEY_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9_./-]{0,62})$"
ENV_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
# Text that reaches a process (argv, environment): execve ends a C string at NUL, so Python
# refuses to spawn with one ("embedded null byte"); the API refuses it first.
NO_NUL_PATTERN = r"^[^\x00]*$"
TASK_STATES = ["pending", "staging", "starting", "running", "finished", "failed", "killed",
               "lost", "unknown"]
TERMINAL_STATES = frozenset({"finished", "failed", "killed", "lost"})
RESTART_POLICIES = ["never", "on-failure", "always"]
# ``revoked`` is set at the core only (``outpost-hub agents revoke``) and is final.
AGENT_STATUSES = ["online", "disconnected", "unreachable", "draining", "revoked"]

_LABELS: dict[str, Any] = {
    "type": "object",
    "maxProperties": 32,
    "propertyNames": {"pattern": LABEL_KEY_PATTERN},
    "additionalProperties": {"type": "string", "maxLength": 256},
}

RESOURCES: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "cpus": {"type": "number", "exclusiveMinimum": 0, "maximum": 1024, "default": 0.1},
        "mem_mb": {"type": "integer", "minimum": 1, "maximum": 4_194_304, "default": 32},
        "disk_mb": {"type": "integer", "minimum": 0, "maximum": 67_108_864, "default": 0},
    },
}

RESTART: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "policy": {"enum": RESTART_POLICIES, "default": "never"},
        "max": {"type": ["integer", "null"], "minimum": 0, "maximum": 1_000_000,
                "default": None, "description": "restart at most this many times; null: no cap"},
        "backoff": {"type": "number", "minimum": 0, "maximum": 3600, "default": 1.0,
                    "description": "seconds before the first restart; doubles each time"},
        "max_backoff": {"type": "number", "minimum": 0, "maximum": 86400, "default": 60.0,
                        "description": "cap of the doubling; below backoff, backoff is used"},
    },
}

ARGV: dict[str, Any] = {
    "type": "array",
    "minItems": 1,
    "maxItems": 256,
    "items": {"type": "string", "minLength": 1, "maxLength": 4096, "pattern": NO_NUL_PATTERN},
}

HEALTH: dict[str, Any] = {
    "type": ["object", "null"],
    "additionalProperties": False,
    "required": ["command"],
    "properties": {
        "command": ARGV,
        "interval": {"type": "number", "minimum": 0.1, "maximum": 3600, "default": 10.0},
        "timeout": {"type": "number", "minimum": 0.1, "maximum": 3600, "default": 5.0},
        "retries": {"type": "integer", "minimum": 1, "maximum": 100, "default": 3},
        "grace": {"type": "number", "minimum": 0, "maximum": 3600, "default": 0.0,
                  "description": "seconds after start before failures count"},
    },
}

_SELECTOR: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["key", "op"],
    "properties": {
        "key": {"type": "string", "pattern": LABEL_KEY_PATTERN},
        "op": {"enum": ["eq", "in", "not_in", "exists"]},
        "values": {"type": "array", "maxItems": 64,
                   "items": {"type": "string", "maxLength": 256}},
    },
}

CONSTRAINTS: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "site": {"type": ["string", "null"], "pattern": NAME_PATTERN, "default": None},
        "agent": {"type": ["string", "null"], "maxLength": 128, "default": None},
        "labels": {"type": "array", "maxItems": 32, "items": _SELECTOR, "default": []},
        "unique": {"enum": [None, "agent", "site"], "default": None,
                   "description": "at most one instance of the service per agent or site"},
        "strategy": {"enum": ["spread", "binpack"], "default": "spread"},
    },
}

DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
ARTIFACT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ARTIFACT_VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
# A path under the task's sandbox: relative, no '..', no empty or '.' parts.
SANDBOX_PATH_PATTERN = r"^(?!/)(?!.*(^|/)\.\.?(/|$))(?!.*//)[^\x00]{1,255}$"
ARTIFACT_USE: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "description": "an artifact to place in the sandbox before the start: by digest, or by "
                   "name and version",
    "properties": {
        "digest": {"type": "string", "pattern": DIGEST_PATTERN},
        "name": {"type": "string", "pattern": ARTIFACT_NAME_PATTERN},
        "version": {"type": "string", "pattern": ARTIFACT_VERSION_PATTERN},
        "dest": {"type": "string", "pattern": SANDBOX_PATH_PATTERN,
                 "description": "file (or, with extract, directory) under the sandbox"},
        "extract": {"type": "boolean", "default": False},
        "mode": {"type": "string", "pattern": "^0?[0-7]{3}$", "default": "0644"},
    },
    "oneOf": [{"required": ["digest", "dest"], "not": {"anyOf": [
                  {"required": ["name"]}, {"required": ["version"]}]}},
              {"required": ["name", "version", "dest"], "not": {"required": ["digest"]}}],
}

ARTIFACT: dict[str, Any] = {
    "type": "object",
    "required": ["digest", "name", "version", "size"],
    "properties": {
        "digest": {"type": "string", "pattern": DIGEST_PATTERN},
        "sha256": {"type": "string"},
        "name": {"type": "string"},
        "version": {"type": "string"},
        "size": {"type": "integer", "minimum": 0},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "created": {"type": "number"},
        "origin": {"enum": ["edge", "core"]},
        "signed": {"type": "boolean"},
        "in_use_by": {"type": "array", "items": {"type": "string"},
                      "description": "tasks that have not ended and use it (edge)"},
        "agents": {"type": "array", "items": {"type": "object"},
                   "description": "agents that hold it (core)"},
    },
}

STAGE_SELECTOR: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "description": "which agents fetch the artifact ahead of use (all given must match)",
    "properties": {
        "site": {"type": "string", "pattern": NAME_PATTERN},
        "labels": _LABELS,
        "agents": {"type": "array", "maxItems": 1000, "items": {"type": "string",
                                                                "maxLength": 64}},
    },
}

DRIVERS = ["process", "oci"]
# driver oci's image: an artifact by digest or by name and version, or a path on the agent.
IMAGE_PATTERN = (r"^(sha256:[0-9a-f]{64}|/[^\x00]*|"
                 + ARTIFACT_NAME_PATTERN[1:-1] + ":" + ARTIFACT_VERSION_PATTERN[1:-1] + ")$")
# A path inside a container (absolute, no ``..``).
CONTAINER_PATH_PATTERN = r"^/(?!(.*/)?\.\.(/|$))[A-Za-z0-9._/-]{1,255}$"
# Where a sandbox mount may not go: the container's own kernel views and its root.
RESERVED_MOUNT_POINTS = ("/", "/proc", "/sys", "/dev", "/sandbox")

OCI_OPTIONS: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "description": "container options (driver oci)",
    "properties": {
        "network": {"enum": ["none", "host"], "default": "none",
                    "description": "none: a network namespace of its own with loopback only"},
        "user": {"type": ["string", "null"], "pattern": r"^[0-9]{1,10}(:[0-9]{1,10})?$",
                 "default": None, "description": "UID[:GID] inside the container (numeric)"},
        "read_only_root": {"type": "boolean", "default": True},
        "mounts": {
            "type": "array", "maxItems": 32, "default": [],
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["source", "destination"],
                "properties": {
                    "source": {"type": "string", "pattern": SANDBOX_PATH_PATTERN,
                               "description": "a directory of the task's sandbox"},
                    "destination": {"type": "string", "pattern": CONTAINER_PATH_PATTERN},
                    "read_only": {"type": "boolean", "default": False},
                },
            },
        },
    },
}

TASK_SPEC: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "command"],
    "properties": {
        "name": {"type": "string", "pattern": NAME_PATTERN},
        "command": ARGV,
        "env": {
            "type": "object",
            "maxProperties": 256,
            "propertyNames": {"pattern": ENV_KEY_PATTERN},
            "additionalProperties": {"type": "string", "maxLength": 32768,
                                     "pattern": NO_NUL_PATTERN},
            "default": {},
        },
        "resources": RESOURCES,
        "restart": RESTART,
        "health": HEALTH,
        "constraints": CONSTRAINTS,
        "labels": _LABELS,
        "kill_timeout": {"type": "number", "minimum": 0, "maximum": 3600, "default": 10.0},
        "artifacts": {"type": "array", "maxItems": 32, "items": ARTIFACT_USE},
        "driver": {"enum": DRIVERS, "default": "process",
                   "description": "process: a command in cgroups; oci: a container (runc)"},
        "image": {"type": ["string", "null"], "minLength": 1, "maxLength": 4096,
                  "pattern": NO_NUL_PATTERN, "default": None,
                  "description": "driver oci: the OCI image, an artifact as NAME:VERSION or "
                                 "sha256:DIGEST, or an absolute path on the agent "
                                 "(oci-archive or docker-save tarball, or a layout)"},
        "oci": {**OCI_OPTIONS, "type": ["object", "null"], "default": None},
    },
}

TASK: dict[str, Any] = {
    "type": "object",
    "required": ["id", "name", "command", "state", "generation", "origin", "created_at"],
    "properties": {
        **TASK_SPEC["properties"],
        "id": {"type": "string"},
        "state": {"enum": TASK_STATES},
        "exit_code": {"type": ["integer", "null"]},
        "reason": {"type": ["string", "null"]},
        "agent_id": {"type": ["string", "null"]},
        "site": {"type": ["string", "null"]},
        "origin": {"enum": ["edge", "core"]},
        "generation": {"type": "integer"},
        "restarts": {"type": "integer"},
        "pid": {"type": ["integer", "null"]},
        "healthy": {"type": ["boolean", "null"]},
        "created_at": {"type": "number"},
        "updated_at": {"type": "number"},
        "started_at": {"type": ["number", "null"]},
        "finished_at": {"type": ["number", "null"]},
    },
}

# One change of a task's state, as the API's task history lists them (oldest first).
HISTORY_ENTRY: dict[str, Any] = {
    "type": "object",
    "required": ["ts", "state"],
    "properties": {
        "ts": {"type": "number"},
        "state": {"enum": TASK_STATES},
        "exit_code": {"type": ["integer", "null"]},
        "reason": {"type": ["string", "null"]},
        "generation": {"type": ["integer", "null"]},
        "restarts": {"type": ["integer", "null"]},
    },
}
HISTORY: dict[str, Any] = {
    "type": "object",
    "required": ["task_id", "items"],
    "properties": {"task_id": {"type": "string"},
                   "items": {"type": "array", "items": HISTORY_ENTRY}},
}
HISTORY_LIMIT = 100  # changes kept and shown per task: the newest

# Amounts in answers (an agent's capacity and what is in use): zero is a fine answer there.
USAGE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "cpus": {"type": "number", "minimum": 0},
        "mem_mb": {"type": "number", "minimum": 0},
        "disk_mb": {"type": "number", "minimum": 0},
    },
}

AGENT: dict[str, Any] = {
    "type": "object",
    "required": ["id", "name", "site", "status"],
    "properties": {
        "id": {"type": "string"},
        "name": {"type": "string"},
        "site": {"type": "string"},
        "labels": _LABELS,
        "resources": USAGE,
        "used": USAGE,
        "status": {"enum": AGENT_STATUSES},
        "version": {"type": "string"},
        "isolation": {"type": "string"},
        "drivers": {"type": "array", "items": {"type": "object"}},
        "last_seen": {"type": ["number", "null"]},
        "revoked": {"type": "boolean"},
        "revoked_at": {"type": ["number", "null"]},
    },
}

# An admin's change of what an agent is enrolled as (POST /v1/agents/{id}/enrollment): its
# site, name or resources are fixed at enrollment otherwise (core_hub/enroll.py).
ENROLLMENT_CHANGE: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "properties": {
        "name": {"type": "string", "pattern": NAME_PATTERN},
        "site": {"type": "string", "pattern": NAME_PATTERN},
        "resources": {**USAGE, "additionalProperties": False, "minProperties": 1},
    },
}

OFFER: dict[str, Any] = {
    "type": "object",
    "required": ["agent_id", "cpus", "mem_mb"],
    "properties": {
        "id": {"type": "string"},
        "agent_id": {"type": "string"},
        "site": {"type": "string"},
        "labels": _LABELS,
        "cpus": {"type": "number"},
        "mem_mb": {"type": "integer"},
        "disk_mb": {"type": "integer"},
        "used": USAGE,
        "drivers": {"type": "array", "items": {"type": "string"}},
        "expires_at": {"type": "number"},
    },
}

INFO: dict[str, Any] = {
    "type": "object",
    "required": ["role", "version", "isolation"],
    "properties": {
        "role": {"enum": ["edge", "core"]},
        "version": {"type": "string"},
        "agent_id": {"type": ["string", "null"]},
        "name": {"type": "string"},
        "site": {"type": "string"},
        "isolation": {"type": "string"},
        "drivers": {"type": "array", "items": {"type": "object"},
                    "description": "task drivers this node runs, with the runtime's version"},
    },
}

ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": "object"},
            },
        }
    },
}


SERVICE_LABEL = "outpost.service"
REVISION_LABEL = "outpost.revision"

SERVICE: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "task", "instances"],
    "properties": {
        "name": {"type": "string", "pattern": NAME_PATTERN},
        "task": {**TASK_SPEC, "required": ["command"],
                 "description": "the task each instance runs (its name is the service's)"},
        "instances": {"type": "integer", "minimum": 0, "maximum": 10000},
        "constraints": CONSTRAINTS,
        "update": {
            "type": "object",
            "additionalProperties": False,
            "description": "how a change of the task rolls out",
            "properties": {
                "batch": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 1,
                          "description": "new instances started (and old stopped) at a time"},
                "min_ready": {"type": "number", "minimum": 0, "maximum": 3600, "default": 5.0,
                              "description": "seconds a new instance must run (and not be "
                                             "unhealthy) before it counts as ready"},
                "timeout": {"type": "number", "minimum": 1, "maximum": 86400, "default": 600.0},
                "on_failure": {"enum": ["rollback", "pause"], "default": "rollback"},
                "stage_first": {"type": "boolean", "default": False,
                                "description": "before the first new instance starts, every "
                                               "agent running the service holds the new "
                                               "task's artifacts (fetched ahead); the "
                                               "timeout counts"},
            },
        },
        "disconnect": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "lost_after": {"type": "number", "minimum": 0, "maximum": 7 * 86400,
                               "default": 60.0,
                               "description": "seconds an agent may be unreachable before "
                                              "its instances count as lost"},
                "replace": {"type": "boolean", "default": True,
                            "description": "start replacements for lost instances"},
                "keep": {"enum": ["keep_original", "keep_replacement", "longest_running"],
                         "default": "keep_original",
                         "description": "which copy stays when an agent comes back"},
            },
        },
    },
}


# A service as the API answers: the request's fields plus its live status.
SERVICE_VIEW: dict[str, Any] = {**SERVICE, "additionalProperties": True, "properties": {
    **SERVICE["properties"], "running": {"type": "integer"},
    "tasks": {"type": "array", "items": {"type": "string"}},
    "lost": {"type": "array", "items": {"type": "string"}},
    "revision": {"type": "integer"}, "rollout": {"type": ["object", "null"]}}}


def validate_service(data: Any) -> dict[str, Any]:
    """A service with defaults filled and its instance task spec built (``task_spec``)."""
    svc: dict[str, Any] = validate("service", SERVICE, data)
    svc["constraints"] = validate("constraints", CONSTRAINTS, svc.get("constraints", {}))
    svc["disconnect"] = validate("disconnect", SERVICE["properties"]["disconnect"],
                                 svc.get("disconnect", {}))
    svc["update"] = validate("update", SERVICE["properties"]["update"], svc.get("update", {}))
    task = dict(svc["task"])
    task["name"] = svc["name"]
    task["constraints"] = svc["constraints"]
    task["labels"] = {**task.get("labels", {}), SERVICE_LABEL: svc["name"]}
    try:
        svc["task"] = validate_task_spec(task)
    except Invalid as exc:
        field = "task." + str(exc.details.get("field", ""))
        raise Invalid(f"task.{exc.message}", details={**exc.details, "field": field}) from None
    return svc


def page_of(item_schema: dict[str, Any]) -> dict[str, Any]:
    """A paginated list: ``items`` plus the opaque ``next_cursor`` (null on the last page)."""
    return {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": item_schema},
            "next_cursor": {"type": ["string", "null"]},
        },
    }


_compiled: dict[str, Callable[[Any], Any]] = {}


def validate(name: str, schema: dict[str, Any], data: Any) -> Any:
    """Validate ``data`` against ``schema`` and return it with defaults filled in.

    Raises ``Invalid`` naming the offending field. Validators are compiled once, on first use,
    so an idle agent does not pay for them.
    """
    import fastjsonschema

    fn = _compiled.get(name)
    if fn is None:
        fn = _compiled[name] = fastjsonschema.compile(schema, use_default=True)
    if (where := _non_finite(data)) is not None:
        # Every comparison with NaN is false, so NaN passes each bound: refused before them.
        # (The API's JSON parser refuses NaN already; msgpack bodies can still carry one.)
        raise Invalid(f"{where}: must be a finite number", details={"field": where,
                                                                     "rule": "finite"})
    try:
        return _integers(schema, fn(data))
    except fastjsonschema.JsonSchemaValueException as exc:
        path = [str(p) for p in exc.path[1:]]
        message = exc.message.replace("data.", "", 1).replace("data ", "body ", 1)
        if exc.rule == "required" and isinstance(exc.value, dict):
            missing = [k for k in exc.definition.get("required", []) if k not in exc.value]
            if missing:
                path.append(missing[0])
                message = f"{'.'.join(path)} is required"
        field = ".".join(path) or "(body)"
        if not message.startswith(field):
            message = f"{field}: {message}"
        raise Invalid(message, details={"field": field, "rule": exc.rule}) from None


MAX_NESTING = 32  # the deepest valid body is under ten levels


def _non_finite(data: Any, path: str = "", depth: int = 0) -> str | None:
    """The path of the first NaN or infinity in ``data``, or None; ``Invalid`` past
    ``MAX_NESTING`` levels (no schema here nests that deep, and recursion has a limit)."""
    if depth > MAX_NESTING:
        raise Invalid(f"{path}: nested deeper than {MAX_NESTING} levels",
                      details={"field": path, "rule": "depth"})
    if isinstance(data, float):
        return None if math.isfinite(data) else (path or "(body)")
    if isinstance(data, dict):
        items: Any = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        return None
    for key, value in items:
        found = _non_finite(value, f"{path}.{key}" if path else str(key), depth + 1)
        if found is not None:
            return found
    return None


def _integers(schema: dict[str, Any], data: Any) -> Any:
    """``data`` with integral floats made ints where ``schema`` wants an integer.

    JSON Schema counts ``2.0`` as an integer, but Python code downstream (``range``, SQLite
    columns, msgpack to the edge) would get a float: normalised here, once, so that "integer"
    in the document means ``int`` inside."""
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if isinstance(data, float) and "integer" in kinds and "number" not in kinds:
        return int(data)
    if isinstance(data, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in data.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                data[key] = _integers(sub, value)
    elif isinstance(data, list) and isinstance(schema.get("items"), dict):
        data[:] = [_integers(schema["items"], item) for item in data]
    return data


def validate_task_spec(data: Any) -> dict[str, Any]:
    """A task spec with every default filled, or ``Invalid``."""
    spec: dict[str, Any] = validate("task_spec", TASK_SPEC, data)
    for key, sub in (("resources", RESOURCES), ("restart", RESTART),
                     ("constraints", CONSTRAINTS)):
        spec[key] = validate(key, sub, spec.get(key, {}))
    spec.setdefault("labels", {})
    spec.setdefault("health", None)
    if spec.get("artifacts"):
        uses = [validate("artifacts", ARTIFACT_USE, a) for a in spec["artifacts"]]
        dests = [a["dest"].rstrip("/") for a in uses]
        if len(set(dests)) != len(dests):
            raise Invalid("artifacts: two artifacts with the same dest",
                          details={"field": "artifacts"})
        spec["artifacts"] = uses
    else:
        spec.pop("artifacts", None)
    if spec["health"] is not None:
        spec["health"] = validate("health", HEALTH, spec["health"])
    _check_driver(spec)
    # No cross-field rules (the schema cannot state them, so a client could not know): checks
    # run one after another, so a timeout longer than the interval only spaces them out, and
    # a max_backoff below backoff means the backoff never grows (see edge_agent.policy).
    return spec


def _check_driver(spec: dict[str, Any]) -> None:
    """``image`` and ``oci`` belong to driver oci, which needs an image: said plainly."""
    if spec.get("driver", "process") != "oci":
        for key in ("image", "oci"):
            if spec.get(key) is not None:
                raise Invalid(f"{key}: only for driver oci (this task's driver is "
                              f"{spec.get('driver', 'process')})",
                              details={"field": key, "rule": "driver"})
        return
    if spec.get("image") is None:
        raise Invalid("image is required with driver oci",
                      details={"field": "image", "rule": "required"})
    if not re.match(IMAGE_PATTERN, spec["image"]) or (
            spec["image"].startswith("sha256:") and not re.match(DIGEST_PATTERN, spec["image"])):
        raise Invalid("image: an artifact (NAME:VERSION or sha256:DIGEST) or an absolute path "
                      "of an OCI layout or archive on the agent",
                      details={"field": "image", "rule": "pattern"})
    spec["oci"] = validate("oci", OCI_OPTIONS, spec.get("oci") or {})
    seen: set[str] = set()
    for n, mount in enumerate(spec["oci"]["mounts"]):
        dest = mount["destination"].rstrip("/") or "/"
        field = f"oci.mounts.{n}.destination"
        if any(dest == r or dest.startswith(r.rstrip("/") + "/") for r in RESERVED_MOUNT_POINTS
               if r != "/") or dest == "/":
            raise Invalid(f"{field}: {dest} is reserved (the root, /proc, /sys, /dev and "
                          "/sandbox are the container's own)",
                          details={"field": field, "rule": "reserved"})
        if dest in seen:
            raise Invalid(f"{field}: {dest} is mounted twice",
                          details={"field": field, "rule": "unique"})
        seen.add(dest)
