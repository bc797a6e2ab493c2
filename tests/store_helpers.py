"""Test helpers of the store area: build restore points straight through the store API.

``backup_image`` is a small sequential stand-in for the real backup pipeline (which has
its own end-to-end tests): it reads a local image file chunk by chunk, the way the
pipeline's workers use the store (zero check, keyed id, ``ChunkWriter.store``: the dedup
check against the indexed BLAKE3, then the writer's pack), then commits the restore point.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

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


def backup_image(
    repo: Repository,
    images: dict[str, Path],
    *,
    vm: str = "vm1",
    parent: Manifest | None = None,
    changed: dict[str, Iterable[int]] | None = None,
) -> Manifest:
    """Full backup of ``images`` (disk name -> file), or an incremental of ``parent``
    re-reading only the chunk numbers in ``changed[disk]``."""
    cs = repo.chunk_size
    indexes: dict[str, DiskIndex] = {}
    entries: list[DiskEntry] = []
    with repo.lock():
        known = repo.index_names()
        writer = repo.writer_spec().open()
        for disk, image in images.items():
            size = image.stat().st_size
            if parent is not None:
                old = repo.load_index(parent.backup_id, disk, parent)
                idx = old.resized(size) if size != old.virtual_size else old.copy()
                todo: Iterable[int] = sorted(set((changed or {}).get(disk, ())))
                if size != old.virtual_size:
                    todo = sorted(set(todo) | set(range(min(len(old), len(idx)) - 1, len(idx))))
            else:
                idx = DiskIndex.empty(size, cs, page_entries=repo.page_entries)
                todo = range(len(idx))
            entry = DiskEntry(name=disk, virtual_size=size, source={"kind": "file"})
            with open(image, "rb", buffering=0) as f:
                buf = bytearray(cs)
                for i in todo:
                    if i < 0 or i >= len(idx):
                        continue
                    n = idx.length(i)
                    mv = memoryview(buf)[:n]
                    f.seek(i * cs)
                    assert f.readinto(mv) == n
                    entry.bytes_read += n
                    if is_zero(mv):
                        idx.set(i, NULL_ID)
                        continue
                    cid = chunk_id(repo.seed, mv)
                    got = writer.store(cid, mv, strong_digest(mv))
                    if got.new:
                        entry.chunks_new += 1
                        entry.bytes_stored += got.stored
                    else:
                        entry.chunks_reused += 1
                    idx.set(i, cid)
            indexes[disk] = idx
            entries.append(entry)
        written = writer.flush()
        writer.close()
        m = Manifest(
            backup_id=repo.new_backup_id(),
            vm=vm,
            chunk_size=cs,
            mode="incremental" if parent is not None else "full",
            parent=parent.backup_id if parent is not None else None,
            consistency="n/a",
            disks=entries,
        )
        repo.commit_restore_point(m, indexes, written=written, known_at_start=known)
    return m


def make_mixed_image(path: Path, size: int, *, seed: int = 1) -> None:
    """A sparse image mixing text-like (compressible) data, random data, repeated
    blocks (dedup) and holes, at 4 KiB..256 KiB granularity."""
    rng = random.Random(seed)
    letters = b"abcdefghijklmnopqrstuvwxyz "
    words = [bytes(rng.choice(letters) for _ in range(7)) for _ in range(300)]
    repeated = rng.randbytes(64 << 10)
    with open(path, "wb") as f:
        f.truncate(size)
        off = 0
        while off < size:
            n = min(rng.choice((4 << 10, 64 << 10, 256 << 10)), size - off)
            kind = rng.random()
            if kind < 0.35:
                pass  # hole
            elif kind < 0.65:
                f.seek(off)
                f.write(b" ".join(rng.choice(words) for _ in range(n // 7 + 1))[:n])
            elif kind < 0.8:
                f.seek(off)
                f.write((repeated * (n // len(repeated) + 1))[:n])
            else:
                f.seek(off)
                f.write(rng.randbytes(n))
            off += n


def overwrite_random(path: Path, count: int, block: int = 64 << 10, *, seed: int = 2) -> set[int]:
    """Write ``count`` random ``block``-sized blocks (aligned); return their offsets."""
    rng = random.Random(seed)
    size = path.stat().st_size
    offs = {rng.randrange(size // block) * block for _ in range(count)}
    with open(path, "r+b") as f:
        for o in sorted(offs):
            f.seek(o)
            f.write(rng.randbytes(block))
    return offs


def chunks_of(offsets: Iterable[int], block: int, chunk_size: int) -> set[int]:
    out: set[int] = set()
    for o in offsets:
        out.update(range(o // chunk_size, (o + block - 1) // chunk_size + 1))
    return out


# -- white-box access to the local backend's files (tests of damage only) ---------------


def pack_path(repo: Repository, pack: str) -> Path:
    return repo.path / "data" / pack[:2] / pack


def blob_location(repo: Repository, cid: bytes) -> tuple[Path, int, int]:
    """(pack file, offset, stored length) of the first copy of blob ``cid``."""
    cands = repo.chunk_index().candidates(cid)
    assert cands, f"no blob {cid.hex()}"
    loc = cands[0]
    return pack_path(repo, loc.pack), loc.offset, loc.stored_len


def flip_blob(repo: Repository, cid: bytes, where: int | None = None) -> Path:
    """Flip one bit of blob ``cid`` inside its pack (bit rot); returns the pack."""
    path, off, n = blob_location(repo, cid)
    raw = bytearray(path.read_bytes())
    raw[off + (n // 2 if where is None else where)] ^= 0x01
    path.write_bytes(bytes(raw))
    return path


def swap_blobs(repo: Repository, a: bytes, b: bytes) -> None:
    """Overwrite blob ``a``'s bytes with (a prefix of) blob ``b``'s."""
    pa, oa, na = blob_location(repo, a)
    pb, ob, nb = blob_location(repo, b)
    src = pb.read_bytes()[ob : ob + nb]
    raw = bytearray(pa.read_bytes())
    m = min(na, nb)
    raw[oa : oa + m] = src[:m]
    pa.write_bytes(bytes(raw))


def all_packs(repo: Repository) -> list[Path]:
    return sorted((repo.path / "data").glob("*/*"))
