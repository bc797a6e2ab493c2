"""Repository: init/open errors, config validation, commit protocol, listing with
damaged manifests, shared/exclusive locks, concurrent writers, disk full."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import small_tmpfs
from store_helpers import backup_image

from snapferry.engine.errors import CorruptionError, RepositoryError, UsageError
from snapferry.engine.restore import restore
from snapferry.engine.store import DiskEntry, DiskIndex, Manifest, Repository
from snapferry.engine.store.hashing import chunk_id, strong_digest
from snapferry.engine.verify import repo_info, verify_repo

ROOT = Path(__file__).resolve().parent.parent


def test_init_and_open(tmp_path: Path) -> None:
    r = Repository.init(tmp_path / "repo", chunk_size=256 << 10, zstd_level=1)
    cfg = json.loads((tmp_path / "repo" / "config").read_text())
    assert cfg["format"] == 2 and cfg["chunk_size"] == 256 << 10 and cfg["zstd_level"] == 1
    assert cfg["encryption"] == "none" and cfg["key_id"] == 0 and cfg["page_entries"] == 4096
    assert int(cfg["seed"], 16) == r.seed
    o = Repository.open(tmp_path / "repo")
    assert (o.seed, o.chunk_size, o.zstd_level, o.id) == (r.seed, r.chunk_size, 1, r.id)
    other = Repository.init(tmp_path / "repo2")
    assert other.seed != r.seed, "a random seed per repository"


def test_init_refuses_non_empty_dir_and_bad_sizes(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("hi")
    with pytest.raises(RepositoryError, match="not empty"):
        Repository.init(tmp_path / "x")
    for bad in (100_000, 4096, 0, 32 << 20):
        with pytest.raises(UsageError, match="power of two"):
            Repository.init(tmp_path / "y", chunk_size=bad)
    for lvl in (0, 20, -1):
        with pytest.raises(UsageError, match="compression level"):
            Repository.init(tmp_path / "y", zstd_level=lvl)
    assert not (tmp_path / "y").exists() or not any((tmp_path / "y").iterdir())


@pytest.mark.parametrize(
    ("key", "value"),
    [("chunk_size", 4096), ("chunk_size", 100_000), ("chunk_size", "1M"), ("zstd_level", 99),
     ("page_entries", 7), ("pack_size", 10), ("seed", "zz"), ("format", "2")],
)
def test_invalid_config_is_one_clear_error(tmp_path: Path, key: str, value: object) -> None:
    Repository.init(tmp_path / "r")
    cfg_path = tmp_path / "r" / "config"
    cfg = json.loads(cfg_path.read_text())
    cfg[key] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(RepositoryError) as ei:
        Repository.open(tmp_path / "r")
    assert "\n" not in str(ei.value)


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="does not exist"):
        Repository.open(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(RepositoryError, match="not a snapferry repository"):
        Repository.open(tmp_path / "plain")
    (tmp_path / "plain" / "config").write_text("garbage")
    with pytest.raises(RepositoryError, match="not a snapferry repository"):
        Repository.open(tmp_path / "plain")


def test_newer_and_format_1_refused(tmp_path: Path) -> None:
    Repository.init(tmp_path / "r")
    cfg_path = tmp_path / "r" / "config"
    cfg = json.loads(cfg_path.read_text())
    cfg["format"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(RepositoryError, match=r"format 3, newer .* upgrade snapferry"):
        Repository.open(tmp_path / "r")
    cfg["format"] = 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(RepositoryError, match=r"format 1 \(one file per chunk\)") as ei:
        Repository.open(tmp_path / "r")
    assert "\n" not in str(ei.value)


def test_backup_ids_sort_and_are_unique(tmp_path: Path) -> None:
    r = Repository.init(tmp_path / "r")
    ids = [r.new_backup_id() for _ in range(50)]
    assert len(set(ids)) == 50
    assert all(len(i) == 25 and i[8] == "T" and i[15] == "Z" for i in ids)


def _point(r: Repository, vm: str, data: bytes) -> tuple[Manifest, DiskIndex, object]:
    idx = DiskIndex.empty(len(data), r.chunk_size, page_entries=r.page_entries)
    w = r.writer_spec().open()
    for i in range(len(idx)):
        part = data[i * r.chunk_size : (i + 1) * r.chunk_size]
        cid = chunk_id(r.seed, part)
        w.store(cid, part, strong_digest(part))
        idx.set(i, cid)
    written = w.flush()
    m = Manifest(backup_id=r.new_backup_id(), vm=vm, chunk_size=r.chunk_size,
                 disks=[DiskEntry("sda", len(data))])
    return m, idx, written


def test_commit_list_load(tmp_path: Path) -> None:
    r = Repository.init(tmp_path / "r", chunk_size=64 << 10)
    data1 = os.urandom(200_000)
    m1, i1, w1 = _point(r, "vm/a b", data1)
    r.commit_restore_point(m1, {"sda": i1}, written=w1)  # type: ignore[arg-type]
    m2, i2, w2 = _point(r, "other", os.urandom(100_000))
    r.commit_restore_point(m2, {"sda": i2}, written=w2)  # type: ignore[arg-type]
    assert sorted(p.name for p in (r.path / "snapshots").iterdir()) == sorted(
        [m1.backup_id, m2.backup_id])
    assert [m.backup_id for m in r.list_backups("vm/a b")] == [m1.backup_id]
    assert {m.backup_id for m in r.list_backups()} == {m1.backup_id, m2.backup_id}
    assert r.load_index(m1.backup_id, "sda") == i1
    assert r.load_manifest(m1.backup_id).disks[0].chunks == 4
    latest = r.latest("vm/a b")
    assert latest is not None and latest.backup_id == m1.backup_id
    assert r.latest("ghost") is None
    with pytest.raises(RepositoryError, match="no restore point"):
        r.load_manifest("20200101T000000Z-0000")
    with pytest.raises(RepositoryError, match="no restore point"):
        r.load_manifest("../config")
    with pytest.raises(RepositoryError, match="no disk 'sdb'"):
        r.load_index(m1.backup_id, "sdb")
    with pytest.raises(RepositoryError, match="already exists"):
        r.commit_restore_point(m1, {"sda": i1})
    out = tmp_path / "o.raw"
    restore(r, m1.backup_id, to=out)
    assert out.read_bytes() == data1


def test_damaged_manifests_are_reported_and_skipped(tmp_path: Path) -> None:
    """Invalid JSON, wrong field types, a bad page reference: each such restore point is
    reported (verify, info) and skipped (list, latest, backup), never blocking others."""
    r = Repository.init(tmp_path / "r", chunk_size=64 << 10)
    good, gi, gw = _point(r, "vm1", os.urandom(70_000))
    r.commit_restore_point(good, {"sda": gi}, written=gw)  # type: ignore[arg-type]
    snaps = r.path / "snapshots"
    bad_json = "20990101T000000Z-00000001"
    (snaps / bad_json).write_text('{"format": 2, "disks": ')
    wrong_type = "20990101T000000Z-00000002"
    d = json.loads((snaps / good.backup_id).read_text())
    d["backup_id"] = wrong_type
    d["disks"][0]["virtual_size"] = "big"
    (snaps / wrong_type).write_text(json.dumps(d))
    bad_ref = "20990101T000000Z-00000003"
    d = json.loads((snaps / good.backup_id).read_text())
    d["backup_id"] = bad_ref
    d["disks"][0]["pages"] = [""]
    (snaps / bad_ref).write_text(json.dumps(d))
    assert [m.backup_id for m in r.list_backups()] == [good.backup_id]
    latest = r.latest("vm1")
    assert latest is not None and latest.backup_id == good.backup_id
    for bad in (bad_json, wrong_type, bad_ref):
        with pytest.raises(CorruptionError):
            r.load_manifest(bad)
    rep = verify_repo(r)
    assert not rep.ok and sorted(rep.bad_backups) == sorted([bad_json, wrong_type, bad_ref])
    assert good.backup_id in rep.backups_checked
    info = repo_info(r)
    assert len(info["damaged_restore_points"]) == 3 and len(info["restore_points"]) == 1
    img = tmp_path / "img"
    img.write_bytes(os.urandom(70_000))
    m3 = backup_image(r, {"sda": img}, vm="vm1", parent=latest)  # a backup still works
    assert m3.backup_id in {m.backup_id for m in r.list_backups()}


# -- concurrent writers ------------------------------------------------------------
def _writer_proc(root: str, blocks: list[bytes], order_seed: int, vm: str) -> str:
    from store_helpers import backup_image as bi

    r = Repository.open(root)
    order = list(range(len(blocks)))
    random.Random(order_seed).shuffle(order)
    img = Path(root).parent / f"img-{vm}"
    img.write_bytes(b"".join(blocks[i] for i in order))
    return bi(r, {"sda": img}, vm=vm).backup_id


def test_concurrent_writers_from_processes(tmp_path: Path) -> None:
    """Four processes back up overlapping data into one repository at once: all
    commit (no exclusive lock), all restore byte-identical, verify passes."""
    r = Repository.init(tmp_path / "r", chunk_size=64 << 10)
    blocks = [os.urandom(8192) + bytes((64 << 10) - 8192) for _ in range(60)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        ids = pool.starmap(_writer_proc, [(str(r.path), blocks, k, f"vm{k}") for k in range(4)])
    assert sorted(m.backup_id for m in r.list_backups()) == sorted(ids)
    for k, bid in enumerate(ids):
        out = tmp_path / f"out{k}"
        restore(r, bid, to=out)
        assert out.read_bytes() == (tmp_path / f"img-vm{k}").read_bytes()
    rep = verify_repo(r, None, read_data=True)
    assert rep.ok, rep.problems
    assert set(r.store.iterate()) >= {chunk_id(r.seed, b) for b in blocks}
    assert r.store.temp_files() == [], "no temp files left behind"


# -- locks -------------------------------------------------------------------------
HOLDER = textwrap.dedent(
    """
    import sys
    from snapferry.engine.store import Repository
    r = Repository.open(sys.argv[1])
    with r.lock(sys.argv[2], exclusive=sys.argv[2] == "prune"):
        print("locked", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    """
)


def _holder(r: Repository, purpose: str) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(r.path), purpose],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


@pytest.fixture
def repo_r(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "r")


def test_backups_share_deleters_exclude(repo_r: Repository) -> None:
    r = repo_r
    p = _holder(r, "backup")
    try:
        with r.lock("backup"):
            pass  # a second backup runs beside the first
        with pytest.raises(RepositoryError, match=f"locked by backup .*pid {p.pid}"), r.lock(
            "prune", exclusive=True
        ):
            pass
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "released"
        p.wait()
        with r.lock("prune", exclusive=True):
            assert [x.name.split("-")[0] for x in (r.path / "locks").iterdir()] == ["exclusive"]
            with pytest.raises(RepositoryError, match="locked by prune"), r.lock("backup"):
                pass
        assert list((r.path / "locks").iterdir()) == []
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_stale_lock_of_dead_process_is_removed(repo_r: Repository) -> None:
    r = repo_r
    p = _holder(r, "prune")
    p.send_signal(signal.SIGKILL)
    p.wait()
    locks = list((r.path / "locks").iterdir())
    assert len(locks) == 1 and json.loads(locks[0].read_text())["pid"] == p.pid
    with r.lock("backup"):
        names = [x.name for x in (r.path / "locks").iterdir()]
        assert len(names) == 1 and names[0].startswith("shared-")


def test_lock_released_on_error(repo_r: Repository) -> None:
    r = repo_r
    with pytest.raises(ValueError), r.lock("prune", exclusive=True):
        with pytest.raises(RepositoryError, match="locked"), r.lock("prune", exclusive=True):
            pass
        raise ValueError("boom")
    with r.lock("prune", exclusive=True):
        pass


def test_a_held_lock_is_refreshed_and_a_refreshed_lock_is_live(
    repo_r: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder rewrites its lock object (``refreshed``) while it holds it, so another
    host's long job is never taken for stale (24 h counts from the last refresh); a lock
    removed meanwhile (as stale) is not brought back by the refresher."""
    import time
    from datetime import UTC, datetime, timedelta

    from snapferry.engine.store import locks

    monkeypatch.setattr(locks, "REFRESH_S", 0.05)
    r = repo_r
    with r.lock("backup"):
        (f,) = (r.path / "locks").iterdir()
        first = json.loads(f.read_text())
        deadline = time.monotonic() + 10
        while "refreshed" not in json.loads(f.read_text()) and time.monotonic() < deadline:
            time.sleep(0.02)
        again = json.loads(f.read_text())
        assert "refreshed" not in first and "refreshed" in again
        assert {k: v for k, v in again.items() if k != "refreshed"} == first
    assert list((r.path / "locks").iterdir()) == []

    with r.lock("backup"):
        (f,) = (r.path / "locks").iterdir()
        f.unlink()  # what a prune does to a lock it found stale
        time.sleep(0.3)
        assert list((r.path / "locks").iterdir()) == []

    def stamp(hours: float) -> str:
        return (datetime.now(UTC) - timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")

    other = {"role": "shared", "pid": 1, "host": "elsewhere.invalid", "since": stamp(25)}
    assert locks.is_stale(other, 100)  # an old-style lock: 24 h from its start
    assert not locks.is_stale(dict(other, refreshed=stamp(0.2)), 100)
    assert locks.is_stale(dict(other, refreshed=stamp(24.5)), 100)


# -- disk full ---------------------------------------------------------------------
@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "tiny", "3m",
                     "mounting a tiny tmpfs needs root (the RLIMIT_FSIZE test covers this)") as m:
        yield m


def test_disk_full_keeps_earlier_points(tiny_fs: Path, tmp_path: Path) -> None:
    r = Repository.init(tiny_fs / "repo", chunk_size=64 << 10)
    small = tmp_path / "small.img"
    small.write_bytes(random.Random(1).randbytes(1 << 20))
    m1 = backup_image(r, {"sda": small})
    big = tmp_path / "big.img"
    big.write_bytes(random.Random(2).randbytes(4 << 20))
    with pytest.raises(RepositoryError, match="disk is full"):
        backup_image(r, {"sda": big})
    assert [m.backup_id for m in r.list_backups()] == [m1.backup_id]
    assert list((r.path / "locks").iterdir()) == [], "lock released"
    rep = verify_repo(r, None, read_data=True)
    assert rep.ok, rep.problems
    out = tmp_path / "out.raw"
    restore(r, m1.backup_id, to=out)
    assert out.read_bytes() == small.read_bytes()


RLIMIT_SCRIPT = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    sys.path.insert(0, "tests")
    from snapferry.engine.errors import SnapferryError
    from snapferry.engine.store import Repository
    from store_helpers import backup_image
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))
    r = Repository.open(sys.argv[1])
    try:
        backup_image(r, {"sda": Path(sys.argv[2])})
    except SnapferryError as e:
        print("ERR", type(e).__name__, e)
    """
)


def test_file_size_limit_is_a_clean_error(tmp_path: Path) -> None:
    """Portable stand-in for disk full (no mount needed): writes fail with EFBIG."""
    r = Repository.init(tmp_path / "repo", chunk_size=64 << 10)
    small = tmp_path / "small.img"
    small.write_bytes(random.Random(1).randbytes(30_000))
    m1 = backup_image(r, {"sda": small})
    big = tmp_path / "big.img"
    big.write_bytes(random.Random(2).randbytes(1 << 20))
    p = subprocess.run([sys.executable, "-c", RLIMIT_SCRIPT, str(r.path), str(big)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("ERR RepositoryError file size limit"), p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert [m.backup_id for m in r.list_backups()] == [m1.backup_id]
    assert verify_repo(r, None, read_data=True).ok
