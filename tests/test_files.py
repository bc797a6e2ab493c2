"""``snapferry files``: list and copy files out of an ext4 restore point, no disk written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli
from servecli import serve_missing
from store_helpers import backup_image

from snapferry.engine.store import Repository


def _missing() -> str | None:
    why = serve_missing()
    if why:
        return why
    for tool in ("nbdfuse", "mkfs.ext4"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed"
    if not (shutil.which("debugfs") or Path("/usr/sbin/debugfs").exists()):
        return "debugfs (e2fsprogs) is not installed"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not usable here"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


@pytest.fixture
def ext4_point(tmp_path: Path) -> tuple[Repository, str, Path]:
    root = tmp_path / "root"
    (root / "etc" / "deep" / "er").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("guest-1\n")
    (root / "etc" / "deep" / "er" / "blob.bin").write_bytes(os.urandom(3 << 20) + b"tail")
    (root / "etc" / "empty").write_bytes(b"")
    os.symlink("hostname", root / "etc" / "link")
    os.chmod(root / "etc" / "hostname", 0o640)
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(48 << 20)
    mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
    subprocess.run([mkfs, "-q", "-F", "-d", str(root), str(img)], check=True)
    repo = Repository.init(tmp_path / "repo", chunk_size=256 << 10)
    m = backup_image(repo, {"vda": img, "raw": tmp_path / "root" / "etc" / "deep" / "er" /
                            "blob.bin"})
    return repo, m.backup_id, root


def test_ls_lists_what_the_filesystem_holds(ext4_point: tuple[Repository, str, Path]) -> None:
    repo, bid, _ = ext4_point
    p = run_cli("files", bid, "ls", "/etc", "--repo", repo.path, "--disk", "vda", "--json")
    assert p.returncode == 0, p.stderr
    entries = {e["name"]: e for e in json.loads(p.stdout)["entries"]}
    assert set(entries) == {"hostname", "deep", "empty", "link"}
    assert entries["hostname"]["kind"] == "file" and entries["hostname"]["size"] == 8
    assert entries["hostname"]["mode"] == "0640"
    assert entries["deep"]["kind"] == "dir" and entries["link"]["kind"] == "symlink"
    p = run_cli("files", bid, "ls", "/etc/deep/er", "--repo", repo.path, "--disk", "vda")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[-1] == "blob.bin" and str((3 << 20) + 4) in p.stdout


def test_get_file_dir_and_symlink_match(
    ext4_point: tuple[Repository, str, Path], tmp_path: Path
) -> None:
    repo, bid, root = ext4_point
    out = tmp_path / "out"
    out.mkdir()
    p = run_cli("files", bid, "get", "/etc/hostname", "--to", out / "h", "--repo", repo.path,
                "--disk", "vda")
    assert p.returncode == 0, p.stderr
    assert (out / "h").read_text() == "guest-1\n"
    assert (out / "h").stat().st_mode & 0o777 == 0o640
    p = run_cli("files", bid, "get", "/etc", "--to", out / "tree", "--repo", repo.path,
                "--disk", "vda")
    assert p.returncode == 0, p.stderr
    got = out / "tree" / "etc"
    for rel in ("hostname", "empty", "deep/er/blob.bin"):
        assert (got / rel).read_bytes() == (root / "etc" / rel).read_bytes(), rel
    assert os.readlink(got / "link") == "hostname"
    p = run_cli("files", bid, "get", "/etc/link", "--to", out / "l", "--repo", repo.path,
                "--disk", "vda")
    assert p.returncode == 0, p.stderr
    assert os.readlink(out / "l") == "hostname"
    # never overwrites
    assert_one_line_error(run_cli("files", bid, "get", "/etc/hostname", "--to", out / "h",
                                  "--repo", repo.path, "--disk", "vda"))
    assert (out / "h").read_text() == "guest-1\n"
    # nothing of the disk was written anywhere: only the copied files are new
    assert not list(Path("/tmp").glob("sf-files-*"))


def test_bad_input_is_one_line(ext4_point: tuple[Repository, str, Path], tmp_path: Path) -> None:
    repo, bid, _ = ext4_point
    line = assert_one_line_error(run_cli("files", bid, "ls", "/nope", "--repo", repo.path,
                                         "--disk", "vda"))
    assert "/nope" in line
    line = assert_one_line_error(run_cli("files", bid, "ls", "/", "--repo", repo.path,
                                         "--disk", "raw"))
    assert "no ext2/3/4 filesystem" in line
    assert_one_line_error(run_cli("files", bid, "ls", "etc", "--repo", repo.path,
                                  "--disk", "vda"))
    assert_one_line_error(run_cli("files", bid, "get", "/etc/hostname", "--repo", repo.path,
                                  "--disk", "vda"))
    assert_one_line_error(run_cli("files", "20990101T000000Z-0000", "ls", "/",
                                  "--repo", repo.path))
    line = assert_one_line_error(run_cli("files", bid, "ls", "/", "--repo", repo.path,
                                         "--disk", "zzz"))
    assert "no disk 'zzz'" in line
    assert not list(Path("/tmp").glob("sf-files-*"))
