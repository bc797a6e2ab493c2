"""The pipeline's library API: FileSource, BackupSession with changed ranges (the path
the coordinator takes for CBT incrementals), resizes, alias protection, abort.

Real worker processes and a real on-disk repository throughout. The changed-range lists
stand in for a hypervisor's dirty bitmap (no VM here; the coordinator tests cover it).
"""

from __future__ import annotations

import itertools
import os
import pickle
import subprocess
import sys
from pathlib import Path

import imagegen
import numpy as np
import pytest
from store_helpers import all_packs, flip_blob

from snapferry.engine.backup import BackupOptions, BackupSession, DiskInput, merge_runs, run_backup
from snapferry.engine.errors import CorruptionError, RepositoryError, SnapferryError, SourceError
from snapferry.engine.restore import restore
from snapferry.engine.sources import open_source
from snapferry.engine.sources.file import FileSource, FileSpec
from snapferry.engine.store import Repository, chunk_id, strong_digest
from snapferry.engine.store.hashing import NULL_ID

CS = 64 << 10


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", chunk_size=CS)


def sparse_file(path: Path, size: int, writes: list[tuple[int, bytes]]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)
    return path


def restored_equals(repo: Repository, backup_id: str, image: Path, tmp_path: Path) -> bool:
    out = tmp_path / f"restore-{backup_id}.raw"
    restore(repo, backup_id, to=out)
    return out.read_bytes() == image.read_bytes()


# -- FileSource ------------------------------------------------------------------------


def test_file_source_extents_and_reads(tmp_path: Path) -> None:
    img = sparse_file(tmp_path / "a.raw", 8 << 20, [(1 << 20, b"x" * 4096), (5 << 20, b"y")])
    with FileSource(img) as src:
        ext = list(src.extents())
        assert ext[0].offset == 0 and ext[-1].end == 8 << 20
        assert all(a.end == b.offset for a, b in itertools.pairwise(ext))
        data = [e for e in ext if not e.zero]
        assert sum(e.length for e in data) < 1 << 20  # holes are holes
        assert any(e.offset <= 1 << 20 < e.end for e in data)
        assert any(e.offset <= 5 << 20 < e.end for e in data)
        buf = bytearray(4096)
        src.readinto(memoryview(buf), 1 << 20)
        assert buf == b"x" * 4096
        with pytest.raises(SourceError, match="short read"):
            src.readinto(memoryview(bytearray(10)), (8 << 20) - 5)
        with pytest.raises(SourceError, match="no changed-block tracking"):
            list(src.extents(dirty=True))
        spec = pickle.loads(pickle.dumps(src.spec()))
        assert spec == FileSpec(str(img))
        with spec.open() as again:
            assert again.size == 8 << 20
        assert src.describe()["kind"] == "file"


def test_open_source_forms(tmp_path: Path) -> None:
    img = sparse_file(tmp_path / "b.raw", 1 << 20, [])
    src = open_source(str(img))
    assert isinstance(src, FileSource)
    src.close()
    with pytest.raises(SnapferryError, match="accepted forms"):
        open_source("ftp://x/y")
    with pytest.raises(SnapferryError, match="--bitmap needs an NBD source"):
        open_source(str(img), bitmap="b0")
    with pytest.raises(SourceError, match="does not exist"):
        open_source(str(tmp_path / "missing.raw"))
    with pytest.raises(SourceError, match="directory"):
        open_source(str(tmp_path))


def test_merge_runs_rounds_out_and_merges() -> None:
    runs = merge_runs([(CS * 3 + 1, 10), (0, 1), (CS * 4 - 1, 2), (CS * 10, 0)], CS, CS * 8)
    assert runs == [(0, 1), (3, 2)]
    assert merge_runs([(CS * 7, CS * 5)], CS, CS * 8) == [(7, 1)]  # clipped to the disk


# -- sessions --------------------------------------------------------------------------


def test_changed_ranges_incremental(repo: Repository, tmp_path: Path) -> None:
    img = imagegen.make_image(tmp_path / "d.raw", 4 << 20, seed=3)
    full = run_backup(repo, "vm", [DiskInput("sda", FileSource(img))],
                      BackupOptions(workers=2), consistency="crash")
    assert full.mode == "full"
    before = img.read_bytes()
    # guest writes: one unaligned write spanning two chunks, one zeroing a chunk
    with open(img, "r+b") as f:
        f.seek(CS * 5 - 100)
        f.write(os.urandom(300))
        f.seek(CS * 9)
        f.write(bytes(CS))
    changed = [(CS * 5 - 100, 300), (CS * 9, CS)]
    inc = run_backup(
        repo, "vm",
        [DiskInput("sda", FileSource(img), changed=changed, tracking={"bitmap": "b1"})],
        BackupOptions(workers=2), consistency="crash",
    )
    assert inc.mode == "incremental" and inc.parent == full.backup_id
    d = inc.disks[0]
    assert d.bytes_read == 3 * CS  # chunks 4, 5 and 9 only
    idx = repo.load_index(inc.backup_id, "sda")
    assert idx.get(9) == NULL_ID
    m = repo.load_manifest(inc.backup_id)
    assert m.disk("sda").tracking == {"bitmap": "b1"}
    assert restored_equals(repo, inc.backup_id, img, tmp_path)
    old = tmp_path / "old.raw"
    old.write_bytes(before)
    assert restored_equals(repo, full.backup_id, old, tmp_path)


def test_changed_ranges_on_grown_disk(repo: Repository, tmp_path: Path) -> None:
    img = sparse_file(tmp_path / "g.raw", 2 * CS + 1000, [(0, os.urandom(2 * CS + 1000))])
    run_backup(repo, "vm", [DiskInput("sda", FileSource(img))], BackupOptions(workers=1),
               consistency="crash")
    with open(img, "r+b") as f:  # grow by 3 chunks; data beyond the old end
        f.seek(2 * CS + 1000)
        f.write(os.urandom(3 * CS))
    inc = run_backup(repo, "vm", [DiskInput("sda", FileSource(img), changed=[])],
                     BackupOptions(workers=1), consistency="crash")
    assert inc.disks[0].virtual_size == 5 * CS + 1000
    assert restored_equals(repo, inc.backup_id, img, tmp_path)


def test_changed_ranges_need_a_parent_disk(repo: Repository, tmp_path: Path) -> None:
    img = sparse_file(tmp_path / "p.raw", CS, [(0, b"a")])
    with pytest.raises(SnapferryError, match="no parent index for disk sda"):
        run_backup(repo, "vm", [DiskInput("sda", FileSource(img), changed=[(0, 1)])],
                   BackupOptions(workers=1), consistency="crash")
    assert repo.list_backups() == []
    with repo.lock():  # the failed session released the lock
        pass


def test_dedup_never_aliases_different_data(repo: Repository, tmp_path: Path) -> None:
    """A stored chunk whose id matches but whose content differs (as a crafted XXH3
    collision would) is detected by the BLAKE3 check: the backup fails, nothing is
    committed, and the impostor is not referenced."""
    data = os.urandom(CS)
    img = sparse_file(tmp_path / "c.raw", CS, [(0, data)])
    cid = chunk_id(repo.seed, data)
    w = repo.writer_spec().open()  # same id, other data (a crafted collision)
    other = os.urandom(CS)
    assert w.store(cid, other, strong_digest(other)).new
    w.flush()
    with pytest.raises(CorruptionError, match="alias"):
        run_backup(repo, "vm", [DiskInput("sda", FileSource(img))], BackupOptions(workers=1),
                   consistency="crash")
    assert repo.list_backups() == []


def test_abort_is_idempotent_and_cleans_up(repo: Repository, tmp_path: Path) -> None:
    img = imagegen.make_image(tmp_path / "e.raw", 2 << 20, seed=4, zero_frac=0)
    s = BackupSession(repo, "vm", BackupOptions(workers=2))
    with pytest.raises(RepositoryError, match="locked"), repo.lock("prune", exclusive=True):
        pass  # a backup holds the shared role: deleters must wait
    with repo.lock():
        pass  # ... but other backups may run at once
    s.copy([DiskInput("sda", FileSource(img))])
    assert list(repo.store.iterate())  # chunks were written ...
    s.abort()
    s.abort()
    assert list(repo.store.iterate()) == []  # ... and removed again: they were new
    assert all_packs(repo) == [] and repo.index_names() == set()
    assert repo.list_backups() == []
    with repo.lock("prune", exclusive=True):
        pass


def test_full_verify_catches_a_pack_that_does_not_read_back(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--verify full``: each worker reads back every pack right after saving it; a pack
    that does not give back what was written stops the copy, nothing is committed and
    what the backup saved is removed."""
    img = imagegen.make_image(tmp_path / "f.raw", 1 << 20, seed=8, zero_frac=0)
    monkeypatch.setenv("SNAPFERRY_FAULT", "pack-rot=1")  # a byte flipped after the save
    s = BackupSession(repo, "vm", BackupOptions(workers=1, verify="full"))
    with pytest.raises(CorruptionError, match="written by this backup"):
        s.copy([DiskInput("sda", FileSource(img))])
    assert repo.list_backups() == []
    assert all_packs(repo) == [] and repo.index_names() == set()


def test_verify_reads_back_packs_not_checked_when_saved(
    repo: Repository, tmp_path: Path
) -> None:
    """Packs their writer did not read back (``verify_saved`` off) are checked by the
    pre-commit verify: bit rot between the save and the verify is caught."""
    from snapferry.engine.pool import Copy, Flush, PoolConfig, ReaderPool, VerifyPacks, WorkItem
    from snapferry.engine.store.pack import WrittenObjects

    img = imagegen.make_image(tmp_path / "g.raw", 1 << 20, seed=9, zero_frac=0)
    cfg = PoolConfig(store=repo.writer_spec(), chunk_size=CS, verify_saved=False)
    written = WrittenObjects()
    with ReaderPool(cfg, 1) as pool:
        pool.add_disk(0, FileSpec(str(img)), 1 << 20)
        pool.run([Copy(WorkItem(0, [(0, 16)]))], lambda r: written.extend(r.written))
        pool.run([Flush()], written.extend, broadcast=True)
        assert written.packs and written.verified == []
        flip_blob(repo, next(repo.store.iterate()))  # bit rot between write and verify
        with pytest.raises(CorruptionError, match="written by this backup"):
            pool.run([VerifyPacks(deep=tuple(written.packs))], lambda r: None)


def test_parallel_duplicate_chunks_are_counted_once(repo: Repository, tmp_path: Path) -> None:
    block = os.urandom(CS)
    img = sparse_file(tmp_path / "dup.raw", 64 * CS, [(i * CS, block) for i in range(64)])
    res = run_backup(repo, "vm", [DiskInput("sda", FileSource(img))],
                     BackupOptions(workers=2, item_bytes=CS), consistency="crash")
    d = res.disks[0]
    # each worker stores its first copy (no cross-worker dedup within one backup)
    assert 1 <= d.chunks_new <= 2 and d.chunks_new + d.chunks_reused == 64
    assert len(list(repo.store.iterate())) == 1
    idx = repo.load_index(res.backup_id, "sda")
    assert (idx.ids == np.frombuffer(chunk_id(repo.seed, block), dtype=np.uint8)).all()


def test_unclosed_session_does_not_hang_interpreter_exit(tmp_path: Path) -> None:
    """A library caller that never commits or aborts: the process still exits (workers
    ignore SIGTERM, so they must be killed before multiprocessing joins them)."""
    img = imagegen.make_image(tmp_path / "u.raw", 2 << 20, seed=2, zero_frac=0)
    script = (
        "import sys\n"
        "from snapferry.engine.store import Repository\n"
        "from snapferry.engine.backup import BackupSession, BackupOptions, DiskInput\n"
        "from snapferry.engine.sources.file import FileSource\n"
        f"r = Repository.init({str(tmp_path / 'r')!r}, chunk_size=65536)\n"
        "s = BackupSession(r, 'vm', BackupOptions(workers=2))\n"
        f"s.copy([DiskInput('sda', FileSource({str(img)!r}))])\n"
        "print('copied')\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "copied"
