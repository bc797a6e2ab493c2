"""End to end over NBD: ``snapferry backup nbd+unix://...`` → restore → compare with nbdcopy.

Real qemu-nbd / nbdkit servers, the real CLI in a subprocess (its --json output).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nbdservers import (
    NbdServers,
    extent_map_plugin,
    make_image,
    nbdcopy_to_file,
    qemu_io,
    requires,
    write_commands,
)

from snapferry.native import libnbd

pytestmark = pytest.mark.skipif(not libnbd.available(), reason="libnbd.so.0 not installed")

K = 1024
M = 1024 * 1024
CHUNK = 64 * K


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[NbdServers]:
    with NbdServers(tmp_path) as s:
        yield s


def snapferry(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "snapferry", *args], capture_output=True, text=True,
                       timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"snapferry {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


def as_json(r: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(r.stdout)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    snapferry("init", str(path), "--chunk-size", "64K", "--json")
    return path


def restore(repo: Path, backup_id: str, to: Path) -> bytes:
    snapferry("restore", backup_id, "--to", str(to), "--repo", str(repo), "--json")
    return to.read_bytes()


@requires("qemu-nbd", "qemu-img", "qemu-io", "nbdcopy")
def test_full_then_bitmap_incremental(
    tmp_path: Path, servers: NbdServers, repo: Path
) -> None:
    size = 16 * M
    img = make_image(tmp_path / "d.qcow2", size,
                     [(0, 0x11, 3 * M), (5 * M, 0x12, M + 4 * K), (10 * M, None, M)],
                     fmt="qcow2")
    # A fresh, clean bitmap: from here on it records every write.
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0")
    full = as_json(snapferry("backup", srv.uri, "--repo", str(repo), "--name", "d",
                             "--bitmap", "b0", "--json"))
    assert full["mode"] == "full"
    # A full backup reads allocated data only (no holes, no zero clusters).
    assert full["bytes_read"] <= 3 * M + M + CHUNK
    want_full = nbdcopy_to_file(srv.uri, tmp_path / "full.ref")
    assert restore(repo, full["backup_id"], tmp_path / "full.raw") == want_full

    # The guest writes (the server must let go of the image for qemu-io to write).
    srv.stop()
    changes = [(200 * K, 0x55, 10 * K), (7 * M - 2 * K, 0x56, 4 * K), (12 * M, 0x57, 128 * K)]
    qemu_io(img, "qcow2", write_commands(changes))
    # same socket, so the same NBD URI: the same source (the series' identity)
    srv2 = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0", socket=srv.socket)
    inc = as_json(snapferry("backup", srv2.uri, "--repo", str(repo), "--name", "d",
                            "--bitmap", "b0", "--json"))
    assert inc["mode"] == "incremental" and inc["parent"] == full["backup_id"]
    dirty_chunks = {c for off, _p, ln in changes
                    for c in range(off // CHUNK, (off + ln - 1) // CHUNK + 1)}
    assert len(dirty_chunks) == 5
    # the dirty chunks plus the default 1 % audit of the clean ones (none differed)
    audit = inc["disks"][0]["cbt_audit"]
    assert audit["mismatched"] == 0 and 0 < audit["sampled"] <= 10
    assert 0 < inc["bytes_read"] <= (len(dirty_chunks) + audit["sampled"]) * CHUNK
    want_inc = nbdcopy_to_file(srv2.uri, tmp_path / "inc.ref")
    assert want_inc != want_full
    assert restore(repo, inc["backup_id"], tmp_path / "inc.raw") == want_inc
    # The full restore point is unchanged by the incremental.
    assert restore(repo, full["backup_id"], tmp_path / "full2.raw") == want_full


@requires("qemu-nbd", "qemu-img")
def test_missing_bitmap_fails_in_one_line(
    tmp_path: Path, servers: NbdServers, repo: Path
) -> None:
    img = make_image(tmp_path / "d.qcow2", 2 * M, [(0, 0x11, M)], fmt="qcow2")
    srv = servers.qemu_nbd(img, fmt="qcow2")
    r = snapferry("backup", srv.uri, "--repo", str(repo), "--name", "d", "--bitmap", "nope",
                  check=False)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        "snapferry: bitmap nope not exported by the server: "
        "run a full backup (--mode full / without --bitmap)"
    ]
    assert as_json(snapferry("list", "--repo", str(repo), "--json"))["backups"] == []


@requires("nbdkit")
def test_server_dying_mid_backup_leaves_no_restore_point(
    tmp_path: Path, servers: NbdServers, repo: Path
) -> None:
    size = 8 * M
    script = extent_map_plugin(tmp_path / "map.py", size, [(0, size, "data")], kill_at=5 * M)
    srv = servers.nbdkit("sh", str(script))
    r = snapferry("backup", srv.uri, "--repo", str(repo), "--name", "d", check=False)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("snapferry: "), r.stderr
    assert "Traceback" not in r.stderr
    assert srv.wait_exit() == -9
    assert as_json(snapferry("list", "--repo", str(repo), "--json"))["backups"] == []
