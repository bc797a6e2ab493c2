"""Backups of NBD exports through the CLI: real qemu-nbd serving a qcow2 with a
persistent dirty bitmap; full, then a bitmap incremental, each restored and compared."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import assert_one_line_error, run_cli
from nbdservers import NbdServers, make_image, nbd_servers, qemu_io, requires

__all__ = ["nbd_servers"]  # the fixture, imported for use below

MiB = 1 << 20


def to_raw(image: Path, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(out)],
                   check=True, capture_output=True)
    return out.read_bytes()


def backup(repo: Path, uri: str, *extra: str) -> dict:
    p = run_cli("backup", uri, "--repo", repo, "--name", "nbddisk", "--json", *extra)
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout))


def restored(repo: Path, backup_id: str, out: Path) -> bytes:
    r = run_cli("restore", "--repo", repo, backup_id, "--to", out)
    assert r.returncode == 0, r.stderr
    return out.read_bytes()


@requires("qemu-nbd", "qemu-img", "qemu-io")
def test_nbd_full_then_bitmap_incremental(
    repo: Path, tmp_path: Path, nbd_servers: NbdServers
) -> None:
    img = make_image(tmp_path / "d.qcow2", 16 * MiB,
                     [(0, 0x11, 3 * MiB), (8 * MiB, 0x22, MiB + 4096)], fmt="qcow2")
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    srv = nbd_servers.qemu_nbd(img, fmt="qcow2", bitmap="b0")
    full = backup(repo, srv.uri, "--bitmap", "b0")
    assert full["mode"] == "full"
    d = full["disks"][0]
    assert d["bytes_read"] == 5 * MiB  # allocated chunks only (3 + 2 partly written)
    srv.stop()

    qemu_io(img, "qcow2", ["write -P 0x33 4096 512", "write -P 0x44 12M 64k"])
    srv = nbd_servers.qemu_nbd(img, fmt="qcow2", bitmap="b0")
    inc = backup(repo, srv.uri, "--bitmap", "b0")
    assert inc["mode"] == "incremental" and inc["parent"] == full["backup_id"]
    assert inc["disks"][0]["bytes_read"] == 2 * MiB  # the two dirty chunks
    srv.stop()

    want = to_raw(img, tmp_path / "want.raw")
    assert restored(repo, inc["backup_id"], tmp_path / "inc.raw") == want
    old = restored(repo, full["backup_id"], tmp_path / "full.raw")
    assert old[4096:4608] == b"\x11" * 512 and old[12 * MiB : 12 * MiB + 1] == b"\0"


@requires("qemu-nbd", "qemu-img")
def test_nbd_single_connection_server(repo: Path, tmp_path: Path, nbd_servers: NbdServers) -> None:
    """A server without multi-conn (qemu-nbd -e 1) gets one worker, and still works."""
    img = make_image(tmp_path / "s.raw", 20 * MiB, [(0, 0x5A, 20 * MiB)])
    srv = nbd_servers.qemu_nbd(img, shared=1)
    res = backup(repo, srv.uri, "--workers", "2")
    assert res["workers"] == 1
    assert res["disks"][0]["chunks_new"] == 1 and res["disks"][0]["chunks_reused"] == 19
    assert restored(repo, res["backup_id"], tmp_path / "s.out") == img.read_bytes()


@requires("qemu-nbd", "qemu-img")
def test_nbd_missing_bitmap_is_one_line(
    repo: Path, tmp_path: Path, nbd_servers: NbdServers
) -> None:
    img = make_image(tmp_path / "n.raw", 4 * MiB, [(0, 0x5A, MiB)])
    srv = nbd_servers.qemu_nbd(img)
    assert_one_line_error(run_cli("backup", srv.uri, "--repo", repo, "--bitmap", "nope"))
    assert not list((repo / "snapshots").glob("*"))
