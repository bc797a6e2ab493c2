"""The changed-block audit (``--audit PERCENT``) against a tracker that really lies.

A real qcow2 dirty bitmap exported by a real qemu-nbd: writes made while the bitmap is
disabled (``qemu-img bitmap --disable``) are missing from the dirty map, exactly the
failure a buggy tracker produces. The audit must notice, read the whole disk, and give a
restore point byte-identical to the disk; an honest bitmap must give no false alarm.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import cli_env, run_cli
from nbdservers import NbdServer, NbdServers, qemu_io, requires

from snapferry.engine.planning import miss_probability, plan_audit
from snapferry.engine.store.index import DiskIndex
from snapferry.native import libnbd

pytestmark = [
    pytest.mark.skipif(not libnbd.available(), reason="libnbd.so.0 not installed"),
]

K = 1024
M = 1024 * K
CHUNK = 64 * K
SIZE = 32 * M
N_CHUNKS = SIZE // CHUNK  # 512


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


def disk_bytes(img: Path, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(out)], check=True)
    return out.read_bytes()


def restored(repo: Path, backup_id: str, out: Path) -> bytes:
    p = run_cli("restore", "--repo", repo, backup_id, "--to", out)
    assert p.returncode == 0, p.stderr
    return out.read_bytes()


def random_qcow2(tmp_path: Path) -> Path:
    """A 32 MiB qcow2 full of random data (every chunk distinct) with a clean bitmap."""
    raw = tmp_path / "seed.raw"
    raw.write_bytes(random.Random(17).randbytes(SIZE))
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(img)], check=True)
    raw.unlink()
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    return img


def writes(chunks: list[int], pattern: int) -> list[str]:
    return [f"write -P {pattern:#x} {c * CHUNK} {CHUNK}" for c in chunks]


def write_behind_trackers_back(img: Path, chunks: list[int]) -> None:
    """Writes the bitmap never sees: disable it, write, enable it again."""
    subprocess.run(["qemu-img", "bitmap", "--disable", str(img), "b0"], check=True)
    qemu_io(img, "qcow2", writes(chunks, 0x5C))
    subprocess.run(["qemu-img", "bitmap", "--enable", str(img), "b0"], check=True)


RECORDED = [3, 100, 101, 300]  # dirty runs (3), (100, 2), (300)


@requires("qemu-nbd", "qemu-img", "qemu-io")
def test_lying_tracker_is_caught_and_the_disk_read_fully(
    tmp_path: Path, servers: NbdServers, repo: Path
) -> None:
    img = random_qcow2(tmp_path)
    srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0")
    full = backup(repo, srv)
    assert full["mode"] == "full"
    srv.stop()

    rng = random.Random(5)
    missed = sorted(rng.sample([c for c in range(N_CHUNKS) if c not in RECORDED], 64))
    qemu_io(img, "qcow2", writes(RECORDED, 0x11))
    write_behind_trackers_back(img, missed)
    srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0", socket=srv.socket)
    want = disk_bytes(img, tmp_path / "want.raw")

    # The premise: without the audit the incremental "succeeds" and restores wrong data.
    blind = backup(repo, srv, "--audit", "0")
    assert blind["mode"] == "incremental"
    assert blind["disks"][0]["bytes_read"] == len(RECORDED) * CHUNK
    assert restored(repo, blind["backup_id"], tmp_path / "blind.raw") != want

    # The numbers behind "a miss is unlikely": 508 clean chunks, 64 of them changed
    # behind the tracker's back, a 30 % uniform sample (153 chunks): the chance that
    # no changed chunk is drawn is C(444, 153) / C(508, 153) < 1e-10.
    assert miss_probability(N_CHUNKS - len(RECORDED), 153, len(missed)) < 1e-10
    inc = backup(repo, srv, "--audit", "30")
    (d,) = inc["disks"]
    audit = d["cbt_audit"]
    assert audit["population"] == N_CHUNKS - len(RECORDED)
    assert audit["sampled"] >= 153
    assert 1 <= audit["mismatched"] <= len(missed)
    assert "audit" in (d["full_reason"] or "")
    (warning,) = inc["warnings"]
    assert warning.startswith(f"disk disk: changed-block audit: {audit['mismatched']} of ")
    # the backup turned itself into a full read of the disk ...
    assert d["bytes_read"] == SIZE
    # ... storing only what really changed (dedup): the recorded and the missed chunks
    # (every recorded chunk holds 0x11, stored by the blind backup; every missed one 0x5C):
    # one new chunk, stored at most once per worker (workers dedup against the repository's
    # index, not against each other's unflushed packs: harmless copies prune reclaims)
    assert 1 <= d["chunks_new"] <= inc["workers"]
    # ... and the restore point is the disk, byte for byte
    assert restored(repo, inc["backup_id"], tmp_path / "inc.raw") == want

    # The parent's failed audit makes the next backup of that disk full (fresh tracker).
    nxt = backup(repo, srv)
    (d2,) = nxt["disks"]
    assert nxt["mode"] == "full" and nxt["parent"] is None
    assert "audit" in (d2["full_reason"] or "") and d2["bytes_read"] == SIZE
    assert d2["chunks_new"] == 0
    assert restored(repo, nxt["backup_id"], tmp_path / "nxt.raw") == want
    # ... after which the series is incremental again, with a clean audit.
    again = backup(repo, srv)
    assert again["mode"] == "incremental" and again["parent"] == nxt["backup_id"]
    assert again["disks"][0]["cbt_audit"]["mismatched"] == 0

    # verify reports the series' audit history: one restore point caught a lying tracker
    v = run_cli("verify", "--repo", repo, "--json")
    assert v.returncode == 0, v.stderr
    (hist,) = json.loads(v.stdout)["cbt_audit"]
    assert hist["series"] == "d" and hist["audited"] == 2  # inc and again (fulls: none)
    assert [f["backup_id"] for f in hist["failures"]] == [inc["backup_id"]]
    human = run_cli("verify", "--repo", repo)
    assert f"tracker missed writes in 1: {inc['backup_id']} (disk: " in human.stdout


@requires("qemu-nbd", "qemu-img", "qemu-io")
def test_honest_tracker_gives_no_false_alarm(
    tmp_path: Path, servers: NbdServers, repo: Path
) -> None:
    img = random_qcow2(tmp_path)
    srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0")
    backup(repo, srv)
    srv.stop()
    qemu_io(img, "qcow2", writes(RECORDED, 0x22))
    srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0", socket=srv.socket)
    # every clean chunk audited: not one may differ from the parent
    inc = backup(repo, srv, "--audit", "100")
    (d,) = inc["disks"]
    assert inc["mode"] == "incremental"
    assert d["cbt_audit"] == {"sampled": N_CHUNKS - len(RECORDED), "mismatched": 0,
                              "population": N_CHUNKS - len(RECORDED)}
    assert d["full_reason"] is None
    assert 1 <= d["chunks_new"] <= inc["workers"]  # the 0x22 chunk, once per worker at most
    assert d["bytes_stored"] > 0
    assert restored(repo, inc["backup_id"], tmp_path / "inc.raw") == disk_bytes(
        img, tmp_path / "want.raw")
    # --audit 0: the dirty chunks only
    off = backup(repo, srv, "--audit", "0")
    assert off["disks"][0]["cbt_audit"] is None
    assert off["disks"][0]["bytes_read"] == len(RECORDED) * CHUNK


@requires("qemu-nbd", "qemu-img", "qemu-io")
def test_missed_write_next_to_a_dirty_run_is_caught_at_a_tiny_rate(
    tmp_path: Path, servers: NbdServers, repo: Path
) -> None:
    """Chunks next to dirty runs are always audited (up to the cap): a tracker that
    drops the end of a write (granularity/off-by-one bugs) is caught even at 0.01 %."""
    img = random_qcow2(tmp_path)
    srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0")
    backup(repo, srv)
    srv.stop()
    qemu_io(img, "qcow2", writes([200], 0x33))
    write_behind_trackers_back(img, [201])
    srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0", socket=srv.socket)
    p = run_cli("backup", srv.uri, "--repo", repo, "--name", "d", "--bitmap", "b0",
                "--audit", "0.01")  # human output: the warning is one line on stderr
    assert p.returncode == 0, p.stderr
    (line,) = p.stderr.splitlines()
    assert line.startswith("snapferry: warning: disk disk: changed-block audit: 1 of ")
    assert line.endswith("the tracker missed writes; reading the whole disk")
    inc = json.loads(run_cli("list", "--repo", repo, "--json").stdout)["backups"][-1]
    (d,) = inc["disks"]  # list --json carries each disk's recorded audit
    assert d["cbt_audit"]["sampled"] <= 3  # 1 uniform + the 2 neighbours of chunk 200
    assert d["cbt_audit"]["mismatched"] == 1
    assert d["bytes_read"] == SIZE
    assert restored(repo, inc["backup_id"], tmp_path / "inc.raw") == disk_bytes(
        img, tmp_path / "want.raw")


# -- the sampler itself (no servers) -------------------------------------------------------


def index_with_data(n: int, data: list[int]) -> DiskIndex:
    idx = DiskIndex.empty(n * CHUNK, CHUNK)
    for c in data:
        idx.set(c, (c + 1).to_bytes(16, "big"))
    return idx


def test_sample_is_the_share_of_clean_data_chunks_plus_neighbours() -> None:
    n = 1000
    idx = index_with_data(n, list(range(0, 800)))  # 800 data chunks, 200 holes
    allocated = np.zeros(n, dtype=bool)
    allocated[900] = True  # a hole in the parent written since: in the population
    dirty = [(10, 5), (500, 1)]
    plan = plan_audit(dirty, idx, allocated, 5.0, random.Random(1))
    assert plan.population == 800 - 6 + 1
    assert plan.uniform == 40  # ceil(5 % of 795)
    chunks = set(plan.chunks.tolist())
    assert {9, 15, 499, 501} <= chunks  # the neighbours of both dirty runs
    assert not chunks & {10, 11, 12, 13, 14, 500}  # never a dirty chunk
    assert all(c < 800 or c == 900 for c in chunks)  # never a hole in both
    assert [bytes(row) for row in plan.expected] == [idx.get(int(c)) for c in plan.chunks]
    assert plan.mismatched(idx) == 0
    assert plan_audit(dirty, idx, allocated, 0.0).sampled == 0


def test_neighbours_are_capped_by_the_share() -> None:
    n = 4096
    idx = index_with_data(n, list(range(n)))
    dirty = [(c, 1) for c in range(0, n, 16)]  # 256 runs: 511 neighbours
    plan = plan_audit(dirty, idx, np.zeros(n, dtype=bool), 1.0, random.Random(2))
    assert plan.uniform == 39  # ceil(1 % of 3840)
    assert plan.neighbours <= plan.uniform + 2
    assert plan.sampled <= 2 * plan.uniform + 2


def test_miss_probability() -> None:
    assert miss_probability(1000, 10, 0) == 1.0
    assert miss_probability(1000, 1000, 1) == 0.0
    assert miss_probability(100, 1, 1) == pytest.approx(0.99)
    # hypergeometric: C(N-k, n)/C(N, n) with N=10, n=5, k=2 -> C(8,5)/C(10,5) = 56/252
    assert miss_probability(10, 5, 2) == pytest.approx(56 / 252)


@requires("qemu-nbd", "qemu-img", "qemu-io")
def test_worker_killed_during_the_fallback_full_read_leaves_no_restore_point(
    tmp_path: Path, servers: NbdServers, repo: Path
) -> None:
    """A reader killed while a failed audit reads the rest of the disk: the backup is
    rolled back like any copy (one line, no restore point); the next one catches the
    lie again and is right."""

    img = random_qcow2(tmp_path)
    srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0")
    backup(repo, srv)
    srv.stop()
    qemu_io(img, "qcow2", writes(RECORDED, 0x11))
    write_behind_trackers_back(img, list(range(400, 464)))  # 64 chunks lost
    srv = servers.qemu_nbd(img, fmt="qcow2", bitmap="b0", socket=srv.socket)
    # one worker; the first pass reads 4 dirty + ~153..310 audited chunks, the full read
    # the remaining ~200+: killed at chunk 350, inside the full read
    env = cli_env(SNAPFERRY_FAULT="worker-kill=350")
    p = run_cli("backup", srv.uri, "--repo", repo, "--name", "d", "--bitmap", "b0",
                "--audit", "30", "--workers", "1", env=env)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    warning, error = p.stderr.splitlines()  # the audit's warning, then the one error
    assert "changed-block audit" in warning and "reading the whole disk" in warning
    assert error.startswith("snapferry: reader worker ") and "nothing was committed" in error
    before = json.loads(run_cli("list", "--repo", repo, "--json").stdout)["backups"]
    assert len(before) == 1  # only the full
    inc = backup(repo, srv, "--audit", "30")
    assert inc["disks"][0]["cbt_audit"]["mismatched"] >= 1
    assert restored(repo, inc["backup_id"], tmp_path / "inc.raw") == disk_bytes(
        img, tmp_path / "want.raw")
