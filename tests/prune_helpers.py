"""Helpers of the forget/prune tests: restore points at chosen times, leftovers of
killed writers, and whole-repository checks (restore byte-identical, read-data verify)."""

from __future__ import annotations

import random
from datetime import datetime
from pathlib import Path

from snapferry.engine.restore import restore
from snapferry.engine.store import (
    NULL_ID,
    DiskEntry,
    DiskIndex,
    Manifest,
    Repository,
    chunk_id,
    is_zero,
    strong_digest,
)
from snapferry.engine.verify import verify_repo


def point_at(repo: Repository, image: Path, when: datetime, *, vm: str = "vm1",
             disk: str = "disk0") -> Manifest:
    """A full restore point of ``image`` whose ``created`` (and backup id) is ``when``:
    the test clock. Goes through the store's writer, index and commit like a backup."""
    cs = repo.chunk_size
    size = image.stat().st_size
    with repo.lock():
        known = repo.index_names()
        writer = repo.writer_spec().open()
        idx = DiskIndex.empty(size, cs, page_entries=repo.page_entries)
        entry = DiskEntry(name=disk, virtual_size=size, source={"kind": "file"})
        data = image.read_bytes()
        for i in range(len(idx)):
            mv = memoryview(data)[i * cs : i * cs + idx.length(i)]
            if is_zero(mv):
                idx.set(i, NULL_ID)
                continue
            cid = chunk_id(repo.seed, mv)
            got = writer.store(cid, mv, strong_digest(mv))
            entry.chunks_new += got.new
            entry.chunks_reused += not got.new
            idx.set(i, cid)
        written = writer.flush()
        writer.close()
        bid = when.strftime("%Y%m%dT%H%M%SZ") + f"-{random.getrandbits(32):08x}"
        m = Manifest(backup_id=bid, vm=vm, chunk_size=cs, consistency="n/a", disks=[entry],
                     created=when.strftime("%Y-%m-%dT%H:%M:%S.000000Z"))
        repo.commit_restore_point(m, {disk: idx}, written=written, known_at_start=known)
    return m


def evolve(path: Path, rng: random.Random, chunks: int, chunk_size: int) -> None:
    """Overwrite ``chunks`` random chunk-aligned blocks of ``path`` with random bytes."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for _ in range(chunks):
            f.seek(rng.randrange(size // chunk_size) * chunk_size)
            f.write(rng.randbytes(chunk_size))


def restores_identical(repo: Repository, bid: str, expected: bytes, tmp: Path) -> bool:
    out = tmp / f"r-{bid}.raw"
    if out.exists():
        out.unlink()
    restore(repo, bid, to=out)
    same = out.read_bytes() == expected
    out.unlink()
    return same


def read_data_ok(repo: Repository) -> list[str]:
    """Problems ``verify --read-data`` finds (empty: ok)."""
    return verify_repo(repo, read_data=True).problems


def repo_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
