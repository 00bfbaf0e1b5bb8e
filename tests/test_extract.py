"""Archives from an artifact are extracted only when every member stays inside the sandbox."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from edge_agent.extract import UnsafeArchive, extract


def _tar(path: Path, members: list[tarfile.TarInfo], gz: bool = False) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for m in members:
            data = b"x" * m.size if m.isfile() else None
            tar.addfile(m, io.BytesIO(data) if data is not None else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "",
            size: int = 1) -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type = kind
    m.linkname = link
    m.size = size if kind == tarfile.REGTYPE else 0
    m.mode = 0o755
    return m


def test_good_tar_gz_and_zip(tmp_path: Path) -> None:
    arch = _tar(tmp_path / "a.tgz", [_member("bin", tarfile.DIRTYPE),
                                    _member("bin/app", size=3),
                                    _member("bin/alias", tarfile.SYMTYPE, "app")], gz=True)
    assert extract(arch, tmp_path / "out") == 3
    assert (tmp_path / "out/bin/app").read_bytes() == b"xxx"
    assert (tmp_path / "out/bin/alias").resolve() == (tmp_path / "out/bin/app").resolve()
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w") as zf:
        info = zipfile.ZipInfo("run.sh")
        info.external_attr = (stat.S_IFREG | 0o755) << 16
        zf.writestr(info, "#!/bin/sh\necho hi\n")
    assert extract(z, tmp_path / "zout") == 1
    assert (tmp_path / "zout/run.sh").stat().st_mode & 0o100


@pytest.mark.parametrize("member, why", [
    (_member("../evil"), "'..'"),
    (_member("a/../../evil"), "'..'"),
    (_member("/etc/evil"), "absolute"),
    (_member("link", tarfile.SYMTYPE, "../../etc/passwd"), "leaves"),
    (_member("link", tarfile.SYMTYPE, "/etc/passwd"), "absolute"),
    (_member("hard", tarfile.LNKTYPE, "../outside"), "leaves"),
    (_member("dev", tarfile.CHRTYPE), "device"),
    (_member("fifo", tarfile.FIFOTYPE), "device"),
])
def test_unsafe_tar_refused_and_nothing_written(tmp_path: Path, member: tarfile.TarInfo,
                                                why: str) -> None:
    arch = _tar(tmp_path / "bad.tar", [_member("ok.txt"), member])
    with pytest.raises(UnsafeArchive, match=why):
        extract(arch, tmp_path / "out")
    assert not (tmp_path / "out" / "ok.txt").exists()  # checked whole before any write
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("name", ["../evil", "/abs/evil", "a/../../evil"])
def test_unsafe_zip_refused(tmp_path: Path, name: str) -> None:
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr(zipfile.ZipInfo(name), "evil")
    with pytest.raises(UnsafeArchive):
        extract(z, tmp_path / "out")
    assert not (tmp_path / "out" / "ok.txt").exists()


def test_zip_symlink_refused(tmp_path: Path) -> None:
    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchive, match="not a regular file"):
        extract(z, tmp_path / "out")


def test_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"just bytes")
    with pytest.raises(UnsafeArchive, match="not a tar"):
        extract(tmp_path / "plain", tmp_path / "out")
