"""A small incremental runs in the backup process (no reader workers to spawn), and
keeps the pool's guarantees: the restore point restores byte-identical, and a Ctrl-C
or SIGKILL in the middle of its copy leaves the repository as it was (no restore point,
nothing this backup stored left behind but the temp files a SIGKILL cannot remove,
which `verify` reports as leftovers), and the next backup works.

Real qemu-nbd exporting a real qcow2 dirty bitmap; the stall is the ``worker-stall``
fault point, which in the in-process reader holds the backup process itself."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_env, run_cli, snapferry_exe
from nbdservers import NbdServer, NbdServers, qemu_io, requires

from snapferry.engine import faults
from snapferry.engine.faults import FAULT_ENV
from snapferry.native import libnbd

pytestmark = [
    pytest.mark.skipif(not libnbd.available(), reason="libnbd.so.0 not installed"),
]

CHUNK = 64 * 1024
SIZE = 32 << 20
CHANGED = [5, 77, 78, 200, 311, 480]  # chunks rewritten between the two backups


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[NbdServers]:
    with NbdServers(tmp_path) as s:
        yield s


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    p = run_cli("init", path, "--chunk-size", "64K")
    assert p.returncode == 0, p.stderr
    return path


def backup(repo: Path, srv: NbdServer, *extra: str) -> dict[str, Any]:
    p = run_cli("backup", srv.uri, "--repo", repo, "--name", "d", "--bitmap", "b0",
                "--json", *extra)
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout))


def qcow2_with_bitmap(tmp_path: Path) -> Path:
    raw = tmp_path / "seed.raw"
    raw.write_bytes(random.Random(23).randbytes(SIZE))
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(img)], check=True)
    raw.unlink()
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    return img


def rewrite(img: Path, pattern: int) -> None:
    qemu_io(img, "qcow2", [f"write -P {pattern:#x} {c * CHUNK} {CHUNK}" for c in CHANGED])


def disk_bytes(img: Path, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(out)], check=True)
    return out.read_bytes()


def restored(repo: Path, backup_id: str, out: Path) -> bytes:
    p = run_cli("restore", "--repo", repo, backup_id, "--to", out)
    assert p.returncode == 0, p.stderr
    return out.read_bytes()


def objects(repo: Path) -> set[str]:
    return {str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()
            and p.parts[len(repo.parts)] in ("data", "index", "snapshots")}


def full_then_changed(tmp_path: Path, servers: NbdServers, repo: Path,
                      pattern: int) -> tuple[Path, NbdServer, dict[str, Any]]:
    img = qcow2_with_bitmap(tmp_path)
    srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0")
    full = backup(repo, srv, "--workers", "2")
    assert full["mode"] == "full" and full["in_process"] is False
    srv.stop()
    rewrite(img, pattern)
    srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0", socket=srv.socket)
    return img, srv, full


@requires("qemu-nbd", "qemu-img", "qemu-io")
def test_small_incremental_runs_in_process_and_restores(
    tmp_path: Path, servers: NbdServers, repo: Path
) -> None:
    img, srv, full = full_then_changed(tmp_path, servers, repo, 0x3C)
    inc = backup(repo, srv)
    assert inc["mode"] == "incremental" and inc["parent"] == full["backup_id"]
    assert inc["in_process"] is True and inc["workers"] == 1
    (d,) = inc["disks"]
    assert d["chunks_new"] == 1  # the six rewritten chunks hold the same 64 KiB
    assert d["bytes_read"] < SIZE // 4  # the changed chunks and the 1 % audit only
    want = disk_bytes(img, tmp_path / "want.raw")
    assert restored(repo, inc["backup_id"], tmp_path / "inc.raw") == want
    v = run_cli("verify", "--repo", repo, "--read-data")
    assert v.returncode == 0, v.stderr
    # an explicit --workers keeps the reader pool, however small the work
    srv.stop()
    rewrite(img, 0x3D)
    srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0", socket=srv.socket)
    pooled = backup(repo, srv, "--workers", "2")
    assert pooled["mode"] == "incremental" and pooled["in_process"] is False


@requires("qemu-nbd", "qemu-img", "qemu-io")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_signal_during_in_process_incremental_leaves_the_repository_consistent(
    sig: signal.Signals, tmp_path: Path, servers: NbdServers, repo: Path
) -> None:
    img, srv, full = full_then_changed(tmp_path, servers, repo, 0x5A)
    before = objects(repo)
    stall = tmp_path / "stall.pids"
    env = cli_env(**{FAULT_ENV: faults.spec(worker_stall=f"1@{stall}")})
    p = subprocess.Popen(
        [*snapferry_exe(), "backup", srv.uri, "--repo", str(repo), "--name", "d",
         "--bitmap", "b0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (stall.exists() and stall.read_text().strip()):
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "backup never reached the stall point"
            time.sleep(0.05)
        # in process: the stalled reader is the backup process itself
        assert [int(x) for x in stall.read_text().split()] == [p.pid]
        os.killpg(p.pid, sig)
        _out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if sig == signal.SIGINT:
        assert p.returncode == 130 and "Traceback" not in err
        (line,) = err.strip().splitlines()
        assert line.startswith("snapferry: ") and "interrupted" in line
        assert objects(repo) == before  # nothing this backup stored is left
    else:
        assert p.returncode == -signal.SIGKILL
    listed = json.loads(run_cli("list", "--repo", repo, "--json").stdout)["backups"]
    assert [b["backup_id"] for b in listed] == [full["backup_id"]]
    v = run_cli("verify", "--repo", repo, "--read-data")
    assert v.returncode == 0, v.stderr
    inc = backup(repo, srv)  # the next backup works and is right
    assert inc["in_process"] is True
    want = disk_bytes(img, tmp_path / "want.raw")
    assert restored(repo, inc["backup_id"], tmp_path / "inc.raw") == want
