"""Repository: init/open errors, commit protocol, listing, locks, concurrent puts,
disk full."""

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
from snapferry.engine.store import DiskEntry, DiskIndex, LocalChunkStore, Manifest, Repository
from snapferry.engine.store.chunkfmt import decode_verified, encode_chunk
from snapferry.engine.store.hashing import chunk_id
from snapferry.engine.verify import verify_repo

ROOT = Path(__file__).resolve().parent.parent


def test_init_and_open(tmp_path: Path) -> None:
    r = Repository.init(tmp_path / "repo", chunk_size=256 << 10, zstd_level=1)
    cfg = json.loads((tmp_path / "repo" / "config").read_text())
    assert cfg["format"] == 1 and cfg["chunk_size"] == 256 << 10 and cfg["zstd_level"] == 1
    assert int(cfg["seed"], 16) == r.seed
    for sub in ("chunks", "backups", "locks"):
        assert (tmp_path / "repo" / sub).is_dir()
    o = Repository.open(tmp_path / "repo")
    assert (o.seed, o.chunk_size, o.zstd_level, o.id) == (r.seed, r.chunk_size, 1, r.id)
    other = Repository.init(tmp_path / "repo2")
    assert other.seed != r.seed, "a random seed per repository"


def test_init_refuses_non_empty_dir_and_bad_chunk_size(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("hi")
    with pytest.raises(RepositoryError, match="not empty"):
        Repository.init(tmp_path / "x")
    with pytest.raises(UsageError, match="power of two"):
        Repository.init(tmp_path / "y", chunk_size=100_000)
    with pytest.raises(UsageError):
        Repository.init(tmp_path / "y", chunk_size=32 << 20)


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="does not exist"):
        Repository.open(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(RepositoryError, match="not a snapferry repository"):
        Repository.open(tmp_path / "plain")
    (tmp_path / "plain" / "config").write_text("garbage")
    with pytest.raises(RepositoryError, match="not a snapferry repository"):
        Repository.open(tmp_path / "plain")


def test_newer_format_refused(tmp_path: Path) -> None:
    Repository.init(tmp_path / "r")
    cfg_path = tmp_path / "r" / "config"
    cfg = json.loads(cfg_path.read_text())
    cfg["format"] = 2
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(RepositoryError, match=r"format 2, newer .* upgrade snapferry"):
        Repository.open(tmp_path / "r")


def test_backup_ids_sort_and_are_unique(tmp_path: Path) -> None:
    r = Repository.init(tmp_path / "r")
    ids = [r.new_backup_id() for _ in range(50)]
    assert len(set(ids)) >= 45  # 16 random bits per second: collisions are rare
    assert all(len(i) == 21 and i[8] == "T" and i[15] == "Z" for i in ids)


def _point(r: Repository, vm: str, data: bytes) -> tuple[Manifest, DiskIndex]:
    idx = DiskIndex.empty(len(data), r.chunk_size)
    for i in range(len(idx)):
        part = data[i * r.chunk_size : (i + 1) * r.chunk_size]
        cid = chunk_id(r.seed, part)
        r.store.put(cid, encode_chunk(part, level=1))
        idx.set(i, cid)
    m = Manifest(backup_id=r.new_backup_id(), vm=vm, chunk_size=r.chunk_size,
                 disks=[DiskEntry("sda", len(data))])
    return m, idx


def test_commit_list_load(tmp_path: Path) -> None:
    r = Repository.init(tmp_path / "r", chunk_size=64 << 10)
    m1, i1 = _point(r, "vm/a b", os.urandom(200_000))
    r.commit_restore_point(m1, {"sda": i1})
    m2, i2 = _point(r, "other", os.urandom(100_000))
    r.commit_restore_point(m2, {"sda": i2})
    bdir = r.backup_dir(m1.backup_id)
    assert bdir.parent.name == "vm%2Fa%20b", "vm names are quoted into one path component"
    assert sorted(p.name for p in bdir.iterdir()) == ["manifest.json", "sda.idx"]
    assert [m.backup_id for m in r.list_backups("vm/a b")] == [m1.backup_id]
    assert {m.backup_id for m in r.list_backups()} == {m1.backup_id, m2.backup_id}
    assert r.load_index(m1.backup_id, "sda") == i1
    assert r.load_manifest(m1.backup_id).disks[0].chunks == 4
    latest = r.latest("vm/a b")
    assert latest is not None and latest.backup_id == m1.backup_id
    assert r.latest("ghost") is None
    with pytest.raises(RepositoryError, match="no restore point"):
        r.load_manifest("20200101T000000Z-0000")
    with pytest.raises(RepositoryError, match="no disk 'sdb'"):
        r.load_index(m1.backup_id, "sdb")
    with pytest.raises(RepositoryError, match="already exists"):
        r.commit_restore_point(m1, {"sda": i1})


def test_uncommitted_point_is_invisible(tmp_path: Path) -> None:
    """A crash before the manifest rename leaves a directory without manifest.json."""
    r = Repository.init(tmp_path / "r", chunk_size=64 << 10)
    m, i = _point(r, "vm1", os.urandom(70_000))
    half = r.path / "backups" / "vm1" / m.backup_id
    half.mkdir(parents=True)
    i.save(half / "sda.idx")
    (half / ".manifest.json.123.tmp").write_text("{")
    assert r.list_backups() == [] and r.latest("vm1") is None


def test_bad_manifest_and_index_reported(tmp_path: Path) -> None:
    r = Repository.init(tmp_path / "r", chunk_size=64 << 10)
    m, i = _point(r, "vm1", os.urandom(70_000))
    bdir = r.commit_restore_point(m, {"sda": i})
    (bdir / "manifest.json").write_text('{"format": 1, "disks": ')
    with pytest.raises(CorruptionError):
        r.load_manifest(m.backup_id)
    with pytest.raises(CorruptionError):
        r.list_backups("vm1")
    m2, i2 = _point(r, "vm2", os.urandom(70_000))
    bdir2 = r.commit_restore_point(m2, {"sda": i2})
    raw = bytearray((bdir2 / "sda.idx").read_bytes())
    raw[-3] ^= 0xFF
    (bdir2 / "sda.idx").write_bytes(bytes(raw))
    with pytest.raises(CorruptionError, match="checksum"):
        r.load_index(m2.backup_id, "sda")


# -- chunk store -------------------------------------------------------------------
def test_store_put_get_header_delete(tmp_path: Path) -> None:
    r = Repository.init(tmp_path / "r")
    s = r.store
    data = b"hello world " * 1000
    cid = chunk_id(r.seed, data)
    blob = encode_chunk(data, level=3)
    assert not s.has(cid)
    assert s.put(cid, blob) is True
    assert s.put(cid, blob) is False, "idempotent"
    assert s.has(cid) and s.get(cid) == blob
    assert s.header(cid).raw_len == len(data)
    assert list(s.iterate()) == [cid] and s.stored_bytes() == len(blob)
    p = Path(s.path_of(cid))
    assert p.relative_to(r.path).parts == ("chunks", cid.hex()[:2], cid.hex()[2:4], cid.hex())
    s.sync()
    s.delete(cid)
    assert not s.has(cid) and list(s.iterate()) == []
    with pytest.raises(CorruptionError, match="missing"):
        s.get(cid)
    with pytest.raises(CorruptionError, match="missing"):
        s.header(cid)


def test_store_header_detects_truncation(tmp_path: Path) -> None:
    r = Repository.init(tmp_path / "r")
    data = os.urandom(5000)
    cid = chunk_id(r.seed, data)
    r.store.put(cid, encode_chunk(data, level=3))
    p = Path(r.store.path_of(cid))
    os.chmod(p, 0o644)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(CorruptionError, match="header says"):
        r.store.header(cid)


def _put_worker(root: str, seed: int, blocks: list[bytes], order_seed: int) -> int:
    store = LocalChunkStore(root)
    order = list(range(len(blocks)))
    random.Random(order_seed).shuffle(order)
    new = 0
    for i in order:
        cid = chunk_id(seed, blocks[i])
        new += store.put(cid, encode_chunk(blocks[i], level=1))
    store.sync()
    return new


def test_concurrent_puts_from_processes(tmp_path: Path) -> None:
    r = Repository.init(tmp_path / "r")
    blocks = [os.urandom(8192) + bytes(8192) for _ in range(200)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        news = pool.starmap(_put_worker, [(str(r.path), r.seed, blocks, k) for k in range(4)])
    # each id was new to at least one worker, and no worker saw more than all of them
    assert sum(news) >= len(blocks) and max(news) <= len(blocks)
    ids = set(r.store.iterate())
    assert ids == {chunk_id(r.seed, b) for b in blocks}
    for b in blocks:
        cid = chunk_id(r.seed, b)
        assert decode_verified(r.store.get(cid), cid, r.seed) == b
    assert r.store.temp_files() == [], "no temp files left behind"


# -- locks -------------------------------------------------------------------------
HOLDER = textwrap.dedent(
    """
    import sys
    from snapferry.engine.store import Repository
    r = Repository.open(sys.argv[1])
    with r.lock("backup"):
        print("locked", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    """
)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[Repository, subprocess.Popen[str]]]:
    r = Repository.init(tmp_path / "r")
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(r.path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "locked"
        yield r, p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_lock_held_by_live_process(holder: tuple[Repository, subprocess.Popen[str]]) -> None:
    r, p = holder
    with pytest.raises(RepositoryError, match=f"locked by backup \\(pid {p.pid}"), r.lock():
        pass
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "released"
    p.wait()
    with r.lock():
        assert (r.path / "locks" / "exclusive.lock").exists()
    assert not (r.path / "locks" / "exclusive.lock").exists()


def test_stale_lock_of_dead_process_taken_over(
    holder: tuple[Repository, subprocess.Popen[str]],
) -> None:
    r, p = holder
    p.send_signal(signal.SIGKILL)
    p.wait()
    lock = r.path / "locks" / "exclusive.lock"
    assert json.loads(lock.read_text())["pid"] == p.pid, "the dead holder's lock is still there"
    with r.lock():
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_lock_is_not_reentrant_and_released_on_error(tmp_path: Path) -> None:
    r = Repository.init(tmp_path / "r")
    with pytest.raises(ValueError), r.lock():
        with pytest.raises(RepositoryError, match="locked"), r.lock():
            pass
        raise ValueError("boom")
    with r.lock():
        pass


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
    assert not (r.path / "locks" / "exclusive.lock").exists(), "lock released"
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
