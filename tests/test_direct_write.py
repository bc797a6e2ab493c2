"""Restore's writes: O_DIRECT where the file system takes it, disk-adjacent chunks
joined into one write, the buffered fallback, and the same bytes every way."""

from __future__ import annotations

import mmap
import os
import random
from pathlib import Path

import pytest
from store_helpers import backup_image, make_mixed_image

from snapferry.engine.direct_write import (
    ALIGN,
    DIRECT_IO_ENV,
    DirectTarget,
    TaskBuffer,
    direct_suits,
    fs_type,
    open_direct,
)
from snapferry.engine.restore import restore
from snapferry.engine.store import Repository

KiB, MiB = 1 << 10, 1 << 20
TMPFS_MAGIC = 0x01021994
CS = 64 * KiB


def _dedup_image(path: Path) -> None:
    """Chunks that repeat next to each other and far apart, incompressible chunks
    (stored raw), compressible ones, holes between them and a partial last chunk."""
    rng = random.Random(7)
    a, b = rng.randbytes(CS), b"x" * CS
    layout = [a, a, None, b, rng.randbytes(CS), a, None, None, b, b, b] * 6
    with open(path, "wb") as f:
        for i, c in enumerate(layout):
            if c is not None:
                f.seek(i * CS)
                f.write(c)
        f.seek(len(layout) * CS)
        f.write(rng.randbytes(CS // 3))  # the disk ends inside a chunk


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", chunk_size=CS, zstd_level=1)


def _direct_here(d: Path) -> bool:
    probe = d / ".direct-probe"
    probe.write_bytes(b"")
    fd = open_direct(probe)
    probe.unlink()
    if fd is None:
        return False
    os.close(fd)
    return True


@pytest.mark.parametrize("workers", [1, 2])
def test_restore_is_identical_with_repeats_holes_and_a_partial_tail(
    repo: Repository, tmp_path: Path, workers: int
) -> None:
    img = tmp_path / "d.img"
    _dedup_image(img)
    m = backup_image(repo, {"sda": img})
    out = tmp_path / "out.raw"
    res = restore(repo, m.backup_id, to=out, workers=workers)
    assert out.read_bytes() == img.read_bytes()
    assert res.direct_io == _direct_here(tmp_path)
    assert res.unique_chunks < res.chunks - res.zero_chunks, "the image repeats chunks"
    st = out.stat()
    assert st.st_blocks * 512 < st.st_size, "holes stay holes"


def test_direct_io_can_be_turned_off(repo: Repository, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    img = tmp_path / "d.img"
    make_mixed_image(img, 6 * MiB + 999)
    m = backup_image(repo, {"sda": img})
    monkeypatch.setenv(DIRECT_IO_ENV, "0")
    res = restore(repo, m.backup_id, to=tmp_path / "buffered.raw", workers=2)
    assert not res.direct_io
    monkeypatch.delenv(DIRECT_IO_ENV)
    res2 = restore(repo, m.backup_id, to=tmp_path / "direct.raw", workers=2)
    assert res2.direct_io == _direct_here(tmp_path)
    assert (tmp_path / "buffered.raw").read_bytes() == img.read_bytes()
    assert (tmp_path / "direct.raw").read_bytes() == img.read_bytes()


def test_a_refused_direct_write_falls_back_to_buffered(tmp_path: Path) -> None:
    p = tmp_path / "t.raw"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 4 * ALIGN)
    direct = open_direct(p)
    if direct is None:
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    try:
        t = DirectTarget(fd, direct)
        # a buffer that is not block-aligned: the kernel refuses it (EINVAL)
        raw = bytearray(ALIGN + 1)
        data = memoryview(raw)[1:]
        data[:] = b"q" * ALIGN
        t.write(data, ALIGN)
        assert not t.is_direct, "after EINVAL every write is buffered"
        t.write(memoryview(b"r" * 10), 3 * ALIGN)
        assert os.pread(fd, 4 * ALIGN, 0) == (bytes(ALIGN) + b"q" * ALIGN + bytes(ALIGN)
                                               + b"r" * 10 + bytes(ALIGN - 10))
    finally:
        os.close(direct)
        os.close(fd)


def test_task_buffer_joins_adjacent_chunks_only(tmp_path: Path) -> None:
    writes: list[tuple[int, int, bytes]] = []

    class Recording(DirectTarget):
        def write(self, data: memoryview, offset: int) -> None:
            writes.append((offset, data.nbytes, bytes(data[::CS])))

    t = Recording(-1)
    b = TaskBuffer(CS, 6)
    chunks = [4, 5, 6, 8, 9, 11]  # ascending: the slots' places on the disk
    for i, c in enumerate(chunks):
        b.views[i][:] = bytes([c]) * CS
        assert b.holds(b.views[i])
    filled = [True, True, True, True, False, True]  # chunk 9: written elsewhere
    assert b.write_out(t, chunks, filled) == 3
    assert writes == [(4 * CS, 3 * CS, bytes([4, 5, 6])), (8 * CS, CS, bytes([8])),
                      (11 * CS, CS, bytes([11]))]
    assert not b.holds(memoryview(bytearray(CS)))
    assert isinstance(b.buf, mmap.mmap)


def test_tmpfs_stays_buffered(repo: Repository, tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or fs_type(shm) != TMPFS_MAGIC:
        pytest.skip("no tmpfs at /dev/shm")
    assert not direct_suits(shm)
    img = tmp_path / "d.img"
    _dedup_image(img)
    m = backup_image(repo, {"sda": img})
    out = shm / f"snapferry-test-{os.getpid()}.raw"
    try:
        res = restore(repo, m.backup_id, to=out, workers=2)
        assert not res.direct_io
        assert out.read_bytes() == img.read_bytes()
    finally:
        out.unlink(missing_ok=True)


def test_a_shrunk_disk_with_repeats_ends_where_the_disk_ends(
    repo: Repository, tmp_path: Path
) -> None:
    """Repeats of one chunk (joined writes from one slot) and a tail cut by a shrink:
    nothing is written past the disk's end."""
    rng = random.Random(11)
    a = rng.randbytes(CS)
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        for i in range(8):
            f.write(a if i in (0, 3, 4, 7) else rng.randbytes(CS))
    full = backup_image(repo, {"sda": img})
    with open(img, "r+b") as f:
        f.truncate(7 * CS + 1000)  # chunk 7 (a copy of chunk 0) now ends inside it
    shrunk = backup_image(repo, {"sda": img}, parent=full, changed={"sda": []})
    out = tmp_path / "out.raw"
    res = restore(repo, shrunk.backup_id, to=out, workers=2)
    assert out.stat().st_size == 7 * CS + 1000
    assert out.read_bytes() == img.read_bytes()
    assert res.bytes_written == 7 * CS + 1000


def test_pwritev_joins_a_chunk_repeated_side_by_side(tmp_path: Path) -> None:
    p = tmp_path / "t.raw"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    direct = open_direct(p)
    try:
        os.ftruncate(fd, 8 * CS)
        calls: list[int] = []

        class Counting(DirectTarget):
            def writev(self, bufs: list[memoryview], offset: int) -> None:
                calls.append(len(bufs))
                super().writev(bufs, offset)

        b = TaskBuffer(CS, 2)
        b.views[0][:] = b"x" * CS
        b.views[1][:] = b"y" * CS
        # slot 0 at chunks 1 and 3..5, slot 1 at chunk 2: one stretch, 1..5
        writes = b.write_out(Counting(fd, direct), [1, 2], [True, True],
                             [(3, 0), (4, 0), (5, 0)])
        assert writes == 1 and calls == [4]  # [x][y][x][x][x]: slots 0-1 joined, then 0, 0, 0
        want = bytes(CS) + b"x" * CS + b"y" * CS + b"x" * CS * 3 + bytes(2 * CS)
        assert os.pread(fd, 8 * CS, 0) == want
    finally:
        if direct is not None:
            os.close(direct)
        os.close(fd)
