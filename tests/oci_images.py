"""Tiny OCI images for the container tests, built the way a user would: ``umoci init``,
``new``, ``repack`` and ``config`` over a rootfs holding the static busybox, then exported as
an oci-archive and as docker-save output (``skopeo``). Also a hand-made layout whose layer
climbs out of its root (``../``), which the agent must refuse.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import apt_install

APPLETS = ("sh", "sleep", "cat", "ps", "ls", "echo", "head", "dd", "httpd", "id", "touch", "wc",
           "grep", "true", "tail", "mkdir", "kill", "wget", "hostname", "ip")
TOOLS = ("runc", "umoci", "skopeo", "busybox")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def ensure_tools() -> None:
    """The tools, installed with apt where missing (as the browser tests do), else a skip."""
    if not missing_tools():
        return
    apt_install(["runc", "umoci", "skopeo", "busybox-static"], lambda: not missing_tools(), 600)
    if missing_tools():
        pytest.skip(f"container tools missing and apt cannot install them: {missing_tools()}")


@dataclass(frozen=True)
class Images:
    layout: Path  # an OCI layout directory (tag v1)
    archive: Path  # the same image as an oci-archive tarball
    docker: Path  # the same image as docker-save output
    escaping: Path  # an oci-archive whose layer writes to ../../<outside>
    outside: Path  # where that layer aims


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=120)


def build_busybox(work: Path) -> Path:
    layout = work / "layout"
    _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", f"{layout}:v1")
    bundle = work / "bundle"
    _run("umoci", "unpack", "--image", f"{layout}:v1", str(bundle))
    bindir = bundle / "rootfs" / "bin"
    bindir.mkdir(parents=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", bindir / "busybox")
    for applet in APPLETS:
        (bindir / applet).symlink_to("busybox")
    (bundle / "rootfs" / "etc").mkdir()
    (bundle / "rootfs" / "etc" / "motd").write_text("hello from the image\n")
    (bundle / "rootfs" / "www").mkdir()
    (bundle / "rootfs" / "www" / "index.html").write_text("outpost container\n")
    _run("umoci", "repack", "--image", f"{layout}:v1", str(bundle))
    _run("umoci", "config", "--image", f"{layout}:v1", "--config.env", "PATH=/bin",
         "--config.env", "IMAGE_VAR=from-image", "--config.workingdir", "/www",
         "--config.cmd", "/bin/sh")
    shutil.rmtree(bundle)
    return layout


def _tar_dir(src: Path, dest: Path) -> None:
    with tarfile.open(dest, "w") as tar:
        for item in sorted(src.rglob("*")):
            tar.add(item, arcname=str(item.relative_to(src)), recursive=False)


def build_escaping(work: Path, outside: Path) -> Path:
    """An oci-archive, written by hand, whose one layer holds ``../../..<outside>``."""
    layout = work / "escaping"
    (layout / "blobs" / "sha256").mkdir(parents=True)

    def blob(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (layout / "blobs" / "sha256" / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        payload = b"escaped\n"
        info = tarfile.TarInfo("../../../../../../../.." + str(outside))
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    layer = blob(buf.getvalue())
    config = blob(json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                              "rootfs": {"type": "layers",
                                         "diff_ids": [layer["digest"]]}}).encode())
    manifest = blob(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer}],
    }).encode())
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
        "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
    archive = work / "escaping.tar"
    _tar_dir(layout, archive)
    return archive


@pytest.fixture(scope="session")
def oci_images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    ensure_tools()
    work = tmp_path_factory.mktemp("oci-images")
    layout = build_busybox(work)
    archive = work / "busybox.tar"
    _tar_dir(layout, archive)
    docker = work / "busybox-docker.tar"
    _run("skopeo", "copy", "--quiet", f"oci:{layout}:v1",
         f"docker-archive:{docker}:outpost/busybox:v1")
    outside = work / "outside" / "escaped"
    outside.parent.mkdir()
    return Images(layout, archive, docker, build_escaping(work, outside), outside)
