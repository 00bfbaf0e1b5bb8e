"""Which artifacts a task spec names: its ``artifacts`` entries and, for driver oci, an image
given as an artifact. The edge resolves them through its cache; the core stages them ahead of
a rollout (``core_hub/services.py``)."""

from __future__ import annotations

from typing import Any


def image_artifact(image: str) -> dict[str, str] | None:
    """The artifact reference an ``image`` names (``sha256:<hex>`` or ``NAME:VERSION``), or
    None for a path on the agent (an absolute one; the schema allows nothing else)."""
    if image.startswith("/"):
        return None
    if image.startswith("sha256:"):
        return {"digest": image}
    name, _, version = image.rpartition(":")
    return {"name": name, "version": version}


def task_artifact_refs(spec: dict[str, Any]) -> list[dict[str, str]]:
    """Every artifact ``spec`` needs before it can start, as ``{"digest"}`` or ``{"name",
    "version"}`` references, each once, in the spec's order (the image last)."""
    refs: list[dict[str, str]] = []
    for use in spec.get("artifacts") or []:
        ref = ({"digest": use["digest"]} if use.get("digest")
               else {"name": use["name"], "version": use["version"]})
        if ref not in refs:
            refs.append(ref)
    image = spec.get("image")
    if spec.get("driver") == "oci" and isinstance(image, str):
        ref_or_none = image_artifact(image)
        if ref_or_none is not None and ref_or_none not in refs:
            refs.append(ref_or_none)
    return refs
