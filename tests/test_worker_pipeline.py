"""The reader worker's overlapped stages: scattered NBD reads with several requests in
flight, the read-ahead thread, the pack-saver thread (save, index file, read-back).

Real qemu-nbd, real worker processes and an on-disk repository; correctness only (no
timings)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from nbdservers import NbdServers, requires

from snapferry.engine.errors import CorruptionError, RepositoryError
from snapferry.engine.pool import (
    BatchResult,
    Copy,
    Flush,
    PoolConfig,
    ReaderPool,
    VerifyPacks,
    WorkItem,
    _segments,
)
from snapferry.engine.sources.file import FileSpec
from snapferry.engine.sources.nbd import NbdSource
from snapferry.engine.store import Repository, chunk_id
from snapferry.engine.store.backend import Backend
from snapferry.engine.store.pack import FinishedPack, WrittenObjects
from snapferry.engine.store.saver import PackSaver

K = 1024
M = 1024 * K
CS = 64 * K


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[NbdServers]:
    with NbdServers(tmp_path) as s:
        yield s


def test_segments_gather_short_runs_and_cut_long_ones() -> None:
    segs = _segments([(0, 3), (10, 1), (20, 9)], 4)
    assert segs == [[(0, 3, 0), (10, 1, 3)], [(20, 4, 0)], [(24, 4, 0)], [(28, 1, 0)]]
    flat = [(f, n) for seg in segs for f, n, _p in seg]
    assert sum(n for _f, n in flat) == 13
    for seg in segs:  # positions in the buffer never overlap
        assert sum(n for _f, n, _p in seg) <= 4
        assert [p for _f, _n, p in seg] == list(np.cumsum([0] + [n for _f, n, _p in seg])[:-1])


@requires("qemu-nbd")
def test_nbd_scattered_pieces_equal_the_file(tmp_path: Path, servers: NbdServers) -> None:
    img = tmp_path / "r.raw"
    img.write_bytes(os.urandom(8 * M))
    data = img.read_bytes()
    srv = servers.qemu_nbd(img)
    pieces = [(0, 5 * M, 64 * K), (64 * K, 128 * K, 300 * K), (364 * K, 8 * M - 4 * K, 4 * K),
              (368 * K, 0, 1)]
    buf = bytearray(368 * K + 1)
    with NbdSource.open(srv.uri, request_size=128 * K, max_in_flight=4) as src:
        src.readinto_pieces(memoryview(buf), pieces)
        with pytest.raises(ValueError, match="outside the disk"):
            src.readinto_pieces(memoryview(buf), [(0, 8 * M - 1, 2)])
    for pos, off, n in pieces:
        assert buf[pos : pos + n] == data[off : off + n]


def _pool_copy(repo: Repository, spec: object, size: int, runs: list[tuple[int, int]],
               *, verify_saved: bool) -> tuple[list[BatchResult], WrittenObjects]:
    cfg = PoolConfig(store=repo.writer_spec(), chunk_size=CS, item_bytes=16 * CS,
                     verify_saved=verify_saved)
    results: list[BatchResult] = []
    written = WrittenObjects()

    def got(r: BatchResult) -> None:
        results.append(r)
        written.extend(r.written)

    with ReaderPool(cfg, 2) as pool:
        pool.add_disk(0, spec, size)  # type: ignore[arg-type]
        items = [WorkItem(0, runs[i : i + 5]) for i in range(0, len(runs), 5)]
        pool.run([Copy(it) for it in items], got)
        pool.run([Flush()], written.extend, broadcast=True)
        checked: list[tuple[int, int]] = []
        pool.run([VerifyPacks(deep=(p,)) for p in written.packs], checked.append)
        assert sum(n for n, _b in checked) == len(written.packs)  # each counted once
    return results, written


@requires("qemu-nbd")
@pytest.mark.parametrize("verify_saved", [True, False])
def test_pool_reads_scattered_chunks_over_nbd(
    tmp_path: Path, servers: NbdServers, verify_saved: bool
) -> None:
    """An incremental's shape (single chunks far apart, short runs): every chunk's id is
    the id of its bytes, whatever segment and read-ahead buffer it travelled in."""
    repo = Repository.init(tmp_path / "repo", chunk_size=CS, pack_size=1 * M)
    img = tmp_path / "s.raw"
    size = 40 * M + 5 * K  # a short last chunk
    img.write_bytes(os.urandom(size))
    srv = servers.qemu_nbd(img)
    with NbdSource.open(srv.uri) as src:
        spec = src.spec()
    n = -(-size // CS)
    runs = [(c, 1) for c in range(0, n, 3)] + [(3, 2), (100, 9), (n - 2, 2)]
    results, written = _pool_copy(repo, spec, size, runs, verify_saved=verify_saved)
    data = img.read_bytes()
    seen = 0
    for r in results:
        for c, cid in zip(r.chunks.tolist(), r.ids, strict=True):
            assert bytes(cid) == chunk_id(repo.seed, data[c * CS : (c + 1) * CS])
            seen += 1
    assert seen == sum(k for _c, k in runs)
    assert len(written.packs) > 2  # several packs went through the saver thread
    assert sorted(written.verified) == (sorted(written.packs) if verify_saved else [])
    assert set(written.indexes) <= repo.index_names()


def test_pool_with_a_file_source_and_a_zero_run(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    img = tmp_path / "f.raw"
    with open(img, "wb") as f:
        f.write(os.urandom(2 * M))
        f.truncate(4 * M)
    results, written = _pool_copy(repo, FileSpec(str(img)), 4 * M, [(0, 64)],
                                  verify_saved=True)
    ids = np.concatenate([r.ids for r in results])
    assert (ids[32:] == 0).all() and ids[:32].any(axis=1).all()
    assert written.verified == written.packs


class _FailingBackend:
    """Fails the second pack save (a full disk, a lost connection)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.saves = 0

    def save(self, kind: str, name: str, data: bytes | bytearray | memoryview, *,
             if_absent: bool = True) -> bool:
        if kind == "data":
            self.saves += 1
            if self.saves == 2:
                raise RepositoryError("writing data: no space left on device")
        return self.inner.save(kind, name, data, if_absent=if_absent)


def _job(name: str) -> FinishedPack:
    return FinishedPack(name, b"p" * 100, "e" + name[1:], b"x" * 10)


def test_saver_reports_what_it_saved_and_raises_a_failure(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    backend = _FailingBackend(repo.backend)
    verified: list[str] = []
    saver = PackSaver(backend, verified.append)  # type: ignore[arg-type]
    a, b = "a" * 64, "b" * 64
    saver.submit(_job(a))
    saver.wait()
    first = saver.take()
    assert first.packs == [a] and first.indexes == ["e" + a[1:]] and first.verified == [a]
    assert verified == [a]
    saver.submit(_job(b))
    with pytest.raises(RepositoryError, match="no space"):
        saver.wait()
    assert saver.take().packs == []  # the failed pack was not saved
    with pytest.raises(RepositoryError):
        saver.submit(_job("c" * 64))  # stays failed
    saver.close()


def test_saver_failed_verify_still_reports_the_saved_pack(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)

    def bad(name: str) -> None:
        raise CorruptionError(f"pack {name[:16]} written by this backup: CRC mismatch")

    saver = PackSaver(repo.backend, bad)
    saver.submit(_job("d" * 64))
    with pytest.raises(CorruptionError, match="CRC"):
        saver.wait()
    w = saver.take()
    assert w.packs == ["d" * 64] and w.verified == []  # saved (abort removes it), unproven
    saver.close()


def test_workers_learn_each_others_new_chunks(tmp_path: Path) -> None:
    """A chunk one worker stored is a hit for the others later in the same backup (told
    before their next item): the second half of the disk repeats the first, and once
    the first half's replies are in, no chunk of the second is stored again."""
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    blocks = [os.urandom(CS) for _ in range(48)]
    img = tmp_path / "twice.raw"
    img.write_bytes(b"".join(blocks[i % 48] for i in range(96)))
    cfg = PoolConfig(store=repo.writer_spec(), chunk_size=CS, item_bytes=CS)
    first: list[BatchResult] = []
    second: list[BatchResult] = []
    with ReaderPool(cfg, 2) as pool:
        pool.add_disk(0, FileSpec(str(img)), 96 * CS)
        pool.run([Copy(WorkItem(0, [(i, 1)])) for i in range(48)], first.append)
        pool.run([Copy(WorkItem(0, [(i, 1)])) for i in range(48, 96)], second.append)
        pool.run([Flush()], lambda w: None, broadcast=True)
        assert pool.stats is not None
    assert sum(int(r.new.sum()) for r in first) == 48
    assert sum(int(r.new.sum()) for r in second) == 0  # every copy a hit
    assert len(list(repo.store.iterate())) == 48
    by_chunk = {int(c): bytes(i) for r in first + second
                for c, i in zip(r.chunks.tolist(), r.ids, strict=True)}
    assert all(by_chunk[c] == by_chunk[c + 48] for c in range(48))


def test_a_worker_does_not_read_back_twice_what_it_checked_at_save(tmp_path: Path) -> None:
    """In-process use of a worker (the path an in-process reader takes): packs it read
    back right after saving them count as checked without a second read; a pack it did
    not write is read and checked."""
    from snapferry.engine.pool import _Worker

    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    img = tmp_path / "w.raw"
    img.write_bytes(os.urandom(2 * M))
    size = 2 * M
    mine = _Worker(PoolConfig(store=repo.writer_spec(), chunk_size=CS, verify_saved=True), 0)
    other = _Worker(PoolConfig(store=repo.writer_spec(), chunk_size=CS), 1)
    try:
        for w in (mine, other):
            w.specs[0] = (FileSpec(str(img)), size)
        mine.handle(Copy(WorkItem(0, [(0, 16)])))
        own = mine.handle(Flush())
        other.handle(Copy(WorkItem(0, [(16, 16)])))
        theirs = other.handle(Flush())
        assert isinstance(own, WrittenObjects) and isinstance(theirs, WrittenObjects)
        assert own.verified == own.packs and theirs.verified == []
        assert mine.handle(VerifyPacks(deep=tuple(own.packs))) == (len(own.packs), 0)
        n, nbytes = mine.handle(VerifyPacks(deep=tuple(theirs.packs)))  # type: ignore[misc]
        assert n == len(theirs.packs) and nbytes > 0
    finally:
        mine.close()
        other.close()
