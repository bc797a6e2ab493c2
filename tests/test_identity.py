"""Restore-point series keyed by the source's identity (issue 14, item 1).

A series is named by ``--name`` or, by default, by the source's identity (``HOST:/abs/
path`` for an image, the NBD URI for an export); the identity is recorded in every
manifest, a restore point of another identity is never chained to (a full backup with
a warning), and ``list`` shows the source.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_one_line_error, run_cli
from nbdservers import NbdServers, make_image, qemu_io, requires

from snapferry.engine.planning import source_identity
from snapferry.native import libnbd

M = 1 << 20


def backup(repo: Path, src: Path | str, *extra: str) -> tuple[dict[str, Any], str]:
    p = run_cli("backup", src, "--repo", repo, "--json", *extra)
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout)), p.stderr


def image(path: Path, size: int, byte: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes([byte]) * size)
    return path


def manifest(repo: Path, backup_id: str) -> dict[str, Any]:
    """The manifest as the repository stores it (format 2: ``snapshots/<backup id>``;
    the tests' repositories are plaintext)."""
    return dict(json.loads((repo / "snapshots" / backup_id).read_text()))


def test_two_images_with_one_basename_are_two_series(repo: Path, tmp_path: Path) -> None:
    """The issue's finding: other/disk.raw was filed as an incremental of disk.raw."""
    a = image(tmp_path / "disk.raw", 4 * M, 0x11)
    b = image(tmp_path / "other" / "disk.raw", 2 * M, 0x22)
    ra, _ = backup(repo, a)
    rb, err = backup(repo, b)
    host = socket.gethostname()
    assert ra["vm"] == f"{host}:{a}" and rb["vm"] == f"{host}:{b}"
    assert rb["mode"] == "full" and rb["parent"] is None and err == ""
    assert manifest(repo, rb["backup_id"])["identity"] == f"{host}:{b}"
    lst = json.loads(run_cli("list", "--repo", repo, "--json").stdout)["backups"]
    assert {(x["vm"], x["identity"]) for x in lst} == {(ra["vm"], ra["vm"]), (rb["vm"], rb["vm"])}
    # human list: names whole (no cut at 20 characters), the source shown
    out = run_cli("list", "--repo", repo).stdout
    assert ra["vm"] in out and rb["vm"] in out and "SOURCE" in out.splitlines()[0]


def test_named_series_with_another_source_is_full_with_a_warning(
    repo: Path, tmp_path: Path
) -> None:
    a = image(tmp_path / "a.raw", 4 * M, 0x11)
    b = image(tmp_path / "b.raw", 4 * M, 0x11)
    backup(repo, a, "--name", "web")
    p = run_cli("backup", b, "--repo", repo, "--name", "web")  # human: warnings on stderr
    assert p.returncode == 0, p.stderr
    host = socket.gethostname()
    assert p.stderr.splitlines() == [
        f"snapferry: warning: the source of 'web' changed (was {host}:{a}, now {host}:{b}): "
        "full backup"
    ]
    assert p.stdout.startswith("full backup ")
    j, _ = backup(repo, a, "--name", "web")  # and back: the warning is in the JSON too
    assert j["warnings"] == [f"the source of 'web' changed (was {host}:{b}, now {host}:{a}): "
                             "full backup"]
    lst = json.loads(run_cli("list", "--repo", repo, "--json").stdout)["backups"]
    assert [x["identity"] for x in lst] == [f"{host}:{a}", f"{host}:{b}", f"{host}:{a}"]
    assert all(x["vm"] == "web" and x["parent"] is None for x in lst)
    out = run_cli("list", "--repo", repo).stdout
    assert f"{host}:{a}" in out and f"{host}:{b}" in out


def test_plain_file_is_never_an_incremental(repo: Path, tmp_path: Path) -> None:
    a = image(tmp_path / "a.raw", 4 * M, 0x11)
    backup(repo, a)
    second, _ = backup(repo, a)
    assert second["mode"] == "full" and second["parent"] is None
    assert second["disks"][0]["chunks_new"] == 0  # dedup: nothing new stored
    line = assert_one_line_error(run_cli("backup", a, "--repo", repo, "--mode", "incremental"),
                                 code=2)
    assert "changed-block map" in line and "every backup of it is full" in line


def test_resized_file_is_said(repo: Path, tmp_path: Path) -> None:
    a = image(tmp_path / "a.raw", 4 * M, 0x11)
    backup(repo, a)
    os.truncate(a, 6 * M)
    res, _ = backup(repo, a)
    assert res["disks"][0]["full_reason"] == (
        f"the disk's size changed ({4 * M} -> {6 * M} bytes)")
    p = run_cli("backup", a, "--repo", repo, "--mode", "full")
    assert p.returncode == 0 and p.stderr == ""  # asked for full: nothing to warn about


@pytest.mark.skipif(not libnbd.available(), reason="libnbd.so.0 not installed")
@requires("qemu-nbd", "qemu-img", "qemu-io")
def test_nbd_export_resized_within_its_series_is_full(tmp_path: Path, repo: Path) -> None:
    img = make_image(tmp_path / "d.qcow2", 8 * M, [(0, 0x11, 2 * M)], fmt="qcow2")
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    with NbdServers(tmp_path) as servers:
        srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0")
        full, _ = backup(repo, srv.uri, "--bitmap", "b0")
        host = socket.gethostname()
        # a unix socket means something on this host only: the host is in the identity
        assert full["vm"].startswith(f"{host}:nbd+unix:///?socket=")
        assert full["vm"].endswith(str(srv.socket))
        srv.stop()
        subprocess.run(["qemu-img", "resize", "-q", str(img), str(12 * M)], check=True)
        qemu_io(img, "qcow2", ["write -P 0x22 10M 64k"])
        srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0", socket=srv.socket)
        p = run_cli("backup", srv.uri, "--repo", repo, "--bitmap", "b0", "--json")
        assert p.returncode == 0, p.stderr
        res = json.loads(p.stdout)
        assert res["vm"] == full["vm"]
        assert res["mode"] == "full" and res["parent"] is None
        assert "size changed" in res["disks"][0]["full_reason"]
        line = assert_one_line_error(run_cli("backup", srv.uri, "--repo", repo, "--bitmap",
                                             "b0", "--mode", "incremental", "--parent",
                                             full["backup_id"]), code=2)
        assert "size changed" in line


def test_identity_forms() -> None:
    host = socket.gethostname()
    assert source_identity({"kind": "file", "path": "/v/d.raw"}) == f"{host}:/v/d.raw"
    assert source_identity({"kind": "image", "path": "/v/d.qcow2", "format": "qcow2"}) == (
        f"{host}:/v/d.qcow2")
    assert source_identity({"kind": "nbd", "uri": "nbd://backup.example:10809/d"}) == (
        "nbd://backup.example:10809/d")
    for local in ("nbd://localhost/d", "nbd://127.0.0.1:10809/d", "nbd://[::1]/d",
                  "nbd+unix:///d?socket=/run/d.sock"):
        assert source_identity({"kind": "nbd", "uri": local}) == f"{host}:{local}"
