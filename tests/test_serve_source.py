"""RestorePointSource: random reads, holes, the shared chunk cache, read-ahead, damage."""

from __future__ import annotations

import itertools
import pickle
import random
import threading
from pathlib import Path

import pytest
from store_helpers import backup_image, flip_blob, make_mixed_image

from snapferry.engine.errors import CorruptionError, SourceError, UsageError
from snapferry.engine.source import DiskSource
from snapferry.engine.sources.restore_point import RestorePointSource
from snapferry.engine.store import Repository

CS = 64 << 10


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", chunk_size=CS)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    make_mixed_image(p, 6 * (1 << 20) + 777, seed=7)  # last chunk short
    return p


def test_random_reads_match_the_image(repo: Repository, image: Path) -> None:
    m = backup_image(repo, {"sda": image})
    want = image.read_bytes()
    with RestorePointSource.open(repo, m.backup_id) as src:
        assert isinstance(src, DiskSource)
        assert src.size == len(want)
        rng = random.Random(3)
        for _ in range(300):
            off = rng.randrange(len(want))
            n = min(rng.choice((1, 511, 4096, CS - 1, CS + 3, 5 * CS)), len(want) - off)
            buf = bytearray(n)
            src.readinto(memoryview(buf), off)
            assert buf == want[off : off + n], (off, n)
        tail = bytearray(777)
        src.readinto(memoryview(tail), len(want) - 777)
        assert tail == want[-777:]
        with pytest.raises(SourceError):
            src.readinto(memoryview(bytearray(2)), len(want) - 1)


def test_extents_are_the_zero_chunks(repo: Repository, image: Path) -> None:
    m = backup_image(repo, {"sda": image})
    idx = repo.load_index(m.backup_id, "sda")
    mask = idx.nonzero_mask()
    assert 0 < int(mask.sum()) < len(idx), "the image must mix data and zero chunks"
    with RestorePointSource.open(repo, m.backup_id, "sda") as src:
        ext = list(src.extents())
        assert ext[0].offset == 0 and ext[-1].end == src.size
        for a, b in itertools.pairwise(ext):
            assert a.end == b.offset and a.zero != b.zero  # contiguous, merged runs
        for e in ext:
            for i in range(e.offset // CS, (e.end - 1) // CS + 1):
                assert bool(mask[i]) != e.zero
        # a window inside the disk is clipped to the window
        sub = list(src.extents(CS + 100, 3 * CS))
        assert sub[0].offset == CS + 100 and sub[-1].end == 4 * CS + 100
        with pytest.raises(SourceError):
            list(src.extents(dirty=True))


def test_cache_shares_duplicate_chunks_and_reads_ahead(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "dup.img"
    block = random.Random(1).randbytes(CS)
    img.write_bytes(block * 8 + random.Random(2).randbytes(16 * CS))
    m = backup_image(repo, {"d": img})
    buf = bytearray(CS)
    with RestorePointSource.open(repo, m.backup_id, readahead_bytes=0) as src:
        for i in range(8):  # one id at 8 offsets: decoded once
            src.readinto(memoryview(buf), i * CS)
        assert src.chunk_reads == 1 and src.cache_hits == 7
        for i in range(8, 24):  # no read-ahead: every new chunk is a miss
            src.readinto(memoryview(buf), i * CS)
        assert src.chunk_reads == 17 and src.cache_hits == 7
    with RestorePointSource.open(repo, m.backup_id, readahead_bytes=4 * CS) as src:
        for i in range(24):  # sequential: later chunks arrive from read-ahead
            src.readinto(memoryview(buf), i * CS)
        assert src.chunk_reads == 17
        # only the first read decodes in the foreground: from the second (sequential)
        # read on, every new chunk was queued by an earlier read's read-ahead
        assert src.foreground_loads == 1, src.foreground_loads


def test_parallel_readers_agree(repo: Repository, image: Path) -> None:
    m = backup_image(repo, {"sda": image})
    want = image.read_bytes()
    errors: list[str] = []
    with RestorePointSource.open(repo, m.backup_id, cache_bytes=4 * CS) as src:

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(100):
                off = rng.randrange(len(want) - 3 * CS)
                buf = bytearray(rng.randrange(1, 3 * CS))
                src.readinto(memoryview(buf), off)
                if buf != want[off : off + len(buf)]:
                    errors.append(f"{off}+{len(buf)}")

        ts = [threading.Thread(target=reader, args=(s,)) for s in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert errors == []


def test_corrupt_chunk_fails_only_its_reads(repo: Repository, image: Path) -> None:
    m = backup_image(repo, {"sda": image})
    idx = repo.load_index(m.backup_id, "sda")
    nz = [i for i in range(len(idx)) if idx.nonzero_mask()[i]]
    bad = nz[len(nz) // 2]
    cid = idx.get(bad)
    uses = [i for i in nz if idx.get(i) == cid]
    flip_blob(repo, cid)
    want = image.read_bytes()
    with RestorePointSource.open(repo, m.backup_id) as src:
        for _ in range(2):  # not cached: fails again, same message
            with pytest.raises(CorruptionError, match=f"chunk #{uses[0]} .*{cid.hex()}"):
                src.readinto(memoryview(bytearray(10)), bad * CS + 5)
        good = next(i for i in nz if i not in uses)
        buf = bytearray(CS)
        src.readinto(memoryview(buf), good * CS)
        assert buf == want[good * CS : (good + 1) * CS]


def test_spec_pickles_and_bad_names_are_one_line(repo: Repository, image: Path) -> None:
    m = backup_image(repo, {"a": image, "b": image})
    with pytest.raises(UsageError, match="holds 2 disks"):
        RestorePointSource.open(repo, m.backup_id)
    with pytest.raises(UsageError, match="no disk 'c'"):
        RestorePointSource.open(repo, m.backup_id, "c")
    src = RestorePointSource.open(repo, m.backup_id, "b")
    other = pickle.loads(pickle.dumps(src.spec())).open()
    try:
        a, b = bytearray(4096), bytearray(4096)
        src.readinto(memoryview(a), 1 << 20)
        other.readinto(memoryview(b), 1 << 20)
        assert a == b and other.describe()["disk"] == "b"
    finally:
        src.close()
        other.close()


def test_small_pages_null_pages_and_runs_across_pages(repo: Repository, tmp_path: Path) -> None:
    """The same restore point seen through an index of 3-entry pages: reads and extents
    cross page boundaries; all-zero pages are null (never loaded)."""
    from snapferry.engine.store.index import DiskIndex

    img = tmp_path / "paged.img"
    rng = random.Random(9)
    layout = "DDZZZZZZDZDDDZZ"  # D = data chunk, Z = zero chunk (15 chunks, 5 pages of 3)
    img.write_bytes(b"".join(rng.randbytes(CS) if c == "D" else bytes(CS) for c in layout)
                    + rng.randbytes(100))
    m = backup_image(repo, {"d": img})
    flat = repo.load_index(m.backup_id, "d")
    paged = DiskIndex(flat.virtual_size, CS, flat.ids, page_entries=3)
    assert paged.page(1) is None  # chunks 3..5 hold no data: a null page
    src = RestorePointSource(paged, repo.reader(), name="paged")
    want = img.read_bytes()
    buf = bytearray(len(want))
    src.readinto(memoryview(buf), 0)
    assert buf == want
    for off in (CS * 2 + 7, CS * 5 - 3, CS * 8 + 1):
        part = bytearray(CS * 3)
        src.readinto(memoryview(part), off)
        assert part == want[off : off + len(part)]
    runs = [(e.offset // CS, -(-e.end // CS), e.zero) for e in src.extents()]
    assert runs == [(0, 2, False), (2, 8, True), (8, 9, False), (9, 10, True),
                    (10, 13, False), (13, 15, True), (15, 16, False)]
    sub = list(src.extents(CS * 3 + 5, CS * 6))  # a window: clipped at both ends
    assert [(e.offset, e.length, e.zero) for e in sub] == [
        (CS * 3 + 5, CS * 5 - 5, True), (CS * 8, CS, False), (CS * 9, 5, True)]
