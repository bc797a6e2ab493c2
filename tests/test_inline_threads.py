"""The in-process reader's compute threads (engine/inline_reader.py, ``_ThreadedWorker``)
store exactly what the one-thread reader stores: the same ids, the same new/reused
split (dedup within the item, against the repository and a collision refused), the same
stored bytes, blobs that read back; and a failure mid-copy leaves no thread behind.

Real file sources and on-disk repositories; correctness only (no timings)."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np
import pytest

from snapferry.engine.errors import CorruptionError
from snapferry.engine.inline_reader import InlineReader, _ThreadedWorker
from snapferry.engine.pool import BatchResult, Copy, Flush, PoolConfig, WorkItem
from snapferry.engine.sources.file import FileSource
from snapferry.engine.store import NULL_ID, Repository, chunk_id

K = 1024
CS = 64 * K


def _image(path: Path) -> bytes:
    """Random, zero, compressible and repeated chunks, and a short last chunk."""
    rnd = random.Random(7)
    parts = []
    for i in range(90):
        kind = i % 5
        if kind == 0:
            parts.append(rnd.randbytes(CS))
        elif kind == 1:
            parts.append(bytes(CS))
        elif kind == 2:
            parts.append((f"line {i} of text\n" * 8000).encode()[:CS])
        elif kind == 3:
            parts.append(parts[0])  # a repeat: dedup inside the item
        else:
            parts.append(rnd.randbytes(CS // 2) + bytes(CS // 2))
    data = b"".join(parts) + rnd.randbytes(CS // 3)
    path.write_bytes(data)
    return data


def _copy(repo: Repository, img: Path, runs: list[tuple[int, int]], threads: int
          ) -> list[BatchResult]:
    cfg = PoolConfig(store=repo.writer_spec(), chunk_size=CS, item_bytes=32 * CS)
    src = FileSource(img)
    out: list[BatchResult] = []
    rd = InlineReader(cfg, {0: (src, src.size)}, compute_threads=threads)
    try:
        assert isinstance(rd._worker, _ThreadedWorker) == (threads > 1)
        items = [WorkItem(0, runs[i : i + 3]) for i in range(0, len(runs), 3)]
        rd.run((Copy(it) for it in items), out.append)
        rd.run([Flush()], lambda w: None)
    finally:
        rd.close()
        src.close()
    return out


def _merged(results: list[BatchResult]) -> tuple[np.ndarray, ...]:
    return (np.concatenate([r.chunks for r in results]),
            np.concatenate([r.ids for r in results]),
            np.concatenate([r.new for r in results]),
            np.concatenate([r.stored for r in results]))


@pytest.mark.parametrize("encryption", ["none", "repokey"])
def test_threads_store_what_one_thread_stores(tmp_path: Path, encryption: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPFERRY_TEST_SCRYPT_N", "1024")
    img = tmp_path / "d.raw"
    data = _image(img)
    n = -(-len(data) // CS)
    runs = [(0, 7), (9, 1), (12, 30), (50, 2), (60, n - 60)]
    kw = {"passphrase": "pw"} if encryption != "none" else {}
    one = Repository.init(tmp_path / "one", encryption=encryption, **kw)
    many = Repository.init(tmp_path / "many", encryption=encryption, **kw)
    a = _merged(_copy(one, img, runs, 1))
    b = _merged(_copy(many, img, runs, 3))
    assert (a[0] == b[0]).all()
    assert (a[2] == b[2]).all() and a[2].sum() > 10 and (~a[2]).sum() > 10  # new / reused
    # ids: the keyed XXH3 of each chunk, NULL_ID for zeros (each repository's seed)
    for repo, (chunks, ids, _new, _stored) in ((one, a), (many, b)):
        for c, cid in zip(chunks.tolist(), ids, strict=True):
            chunk = data[c * CS : (c + 1) * CS]
            want = NULL_ID if not any(chunk) else chunk_id(repo.seed, chunk)
            assert bytes(cid) == want
        rd = repo.reader()
        for c, cid in zip(chunks.tolist(), ids, strict=True):
            if bytes(cid) != NULL_ID:
                assert bytes(rd.read(bytes(cid))) == data[c * CS : (c + 1) * CS]
    if encryption == "none":  # sizes equal when both store plain zstd
        assert (a[3] == b[3]).all()
    # a second copy into the same repository: every chunk a dedup hit
    again = _merged(_copy(many, img, runs, 2))
    assert not again[2].any() and (again[1] == b[1]).all()


def test_a_collision_is_refused_with_threads(tmp_path: Path) -> None:
    """An id the repository holds for other data (a crafted XXH3 collision, simulated by
    a stored blob whose digest differs) is refused, never deduplicated."""
    img = tmp_path / "d.raw"
    data = _image(img)
    repo = Repository.init(tmp_path / "r", encryption="none")
    _copy(repo, img, [(0, 1)], 2)  # chunk 0 stored
    repo2 = Repository.open(tmp_path / "r")
    w = _ThreadedWorker(PoolConfig(store=repo2.writer_spec(), chunk_size=CS), 2)
    src = FileSource(img)
    try:
        w.sources[0] = src
        w.specs[0] = (src.spec(), src.size)
        cid0 = chunk_id(repo2.seed, data[:CS])  # chunks 0 and 3 hold these bytes
        real = w.writer.digest  # this writer sees other data (digest) under that id
        w.writer.digest = lambda d: b"\x01" * 32 if chunk_id(repo2.seed, d) == cid0 else real(d)
        with pytest.raises(CorruptionError, match="different data"):
            w.copy(WorkItem(0, [(0, 5)]))
    finally:
        w.close()
        src.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("snapferry-chunk")]
