"""Restore: byte identity, sparseness, qcow2, disk choice, overwrite rules, damage."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from store_helpers import (
    backup_image,
    blob_location,
    chunks_of,
    flip_blob,
    make_mixed_image,
    overwrite_random,
    swap_blobs,
)

from snapferry.engine.errors import CorruptionError, UsageError
from snapferry.engine.restore import restore
from snapferry.engine.store import Repository
from snapferry.engine.store.hashing import NULL_ID

MiB = 1 << 20


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", chunk_size=256 << 10, zstd_level=3)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    make_mixed_image(p, 24 * MiB + 12345)  # not a multiple of the chunk size
    return p


def test_raw_restore_identical_and_sparse(repo: Repository, image: Path, tmp_path: Path) -> None:
    m = backup_image(repo, {"sda": image})
    out = tmp_path / "out.raw"
    res = restore(repo, m.backup_id, to=out, workers=2)
    assert out.read_bytes() == image.read_bytes()
    idx = repo.load_index(m.backup_id, "sda")
    assert idx.zero_count() > 0, "the test image must hold zero chunks"
    st = out.stat()
    assert st.st_size == image.stat().st_size
    # holes stay holes: allocation is at most the non-zero chunks (+ fs rounding)
    assert st.st_blocks * 512 <= idx.nonzero_count() * repo.chunk_size + 64 * 1024
    assert st.st_blocks * 512 < st.st_size
    j = res.to_json()
    assert j["disk"] == "sda" and j["chunks"] == len(idx) and j["format"] == "raw"
    assert j["zero_chunks"] == idx.zero_count() and 0 < j["unique_chunks"] <= idx.nonzero_count()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temp left"


def test_incremental_points_restore_independently(
    repo: Repository, image: Path, tmp_path: Path
) -> None:
    before = image.read_bytes()
    full = backup_image(repo, {"sda": image})
    offs = overwrite_random(image, 12)
    changed = chunks_of(offs, 64 << 10, repo.chunk_size)
    inc = backup_image(repo, {"sda": image}, parent=full, changed={"sda": changed})
    assert inc.parent == full.backup_id and inc.mode == "incremental"
    assert inc.disks[0].bytes_read <= len(changed) * repo.chunk_size
    restore(repo, full.backup_id, to=tmp_path / "full.raw", workers=1)
    restore(repo, inc.backup_id, to=tmp_path / "inc.raw", workers=3)
    assert (tmp_path / "full.raw").read_bytes() == before
    assert (tmp_path / "inc.raw").read_bytes() == image.read_bytes()


def test_resized_disk(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    make_mixed_image(img, 4 * MiB)
    full = backup_image(repo, {"sda": img})
    with open(img, "r+b") as f:  # grow, with data in the new tail
        f.truncate(6 * MiB + 777)
        f.seek(5 * MiB)
        f.write(os.urandom(1000))
    grown = backup_image(repo, {"sda": img}, parent=full, changed={"sda": []})
    restore(repo, grown.backup_id, to=tmp_path / "g.raw")
    assert (tmp_path / "g.raw").read_bytes() == img.read_bytes()
    with open(img, "r+b") as f:  # shrink to a non chunk-aligned size
        f.truncate(3 * MiB + 5)
    shrunk = backup_image(repo, {"sda": img}, parent=grown, changed={"sda": []})
    restore(repo, shrunk.backup_id, to=tmp_path / "s.raw")
    assert (tmp_path / "s.raw").read_bytes() == img.read_bytes()


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (qemu-utils) missing")
def test_qcow2_restore_matches(repo: Repository, image: Path, tmp_path: Path) -> None:
    m = backup_image(repo, {"sda": image})
    out = tmp_path / "out.qcow2"
    res = restore(repo, m.backup_id, to=out, fmt="qcow2")
    assert res.format == "qcow2"
    info = subprocess.run(["qemu-img", "info", "--output=json", str(out)],
                          capture_output=True, text=True, check=True).stdout
    assert '"format": "qcow2"' in info
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(image), str(out)],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert out.stat().st_size < image.stat().st_size, "qcow2 keeps the holes out"
    assert not list(tmp_path.glob(".out.qcow2.*")), "temporary raw file removed"


def test_disk_choice(repo: Repository, tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_mixed_image(a, 2 * MiB, seed=3)
    make_mixed_image(b, 3 * MiB, seed=4)
    m = backup_image(repo, {"sda": a, "sdb": b})
    with pytest.raises(UsageError, match=r"holds 2 disks; choose one with --disk \(sda, sdb\)"):
        restore(repo, m.backup_id, to=tmp_path / "x.raw")
    with pytest.raises(UsageError, match="no disk 'sdc'"):
        restore(repo, m.backup_id, to=tmp_path / "x.raw", disk="sdc")
    restore(repo, m.backup_id, to=tmp_path / "b.raw", disk="sdb")
    assert (tmp_path / "b.raw").read_bytes() == b.read_bytes()
    assert not (tmp_path / "x.raw").exists()


def test_existing_target_needs_force(repo: Repository, image: Path, tmp_path: Path) -> None:
    m = backup_image(repo, {"sda": image})
    out = tmp_path / "out.raw"
    out.write_bytes(b"precious")
    with pytest.raises(UsageError, match="exists"):
        restore(repo, m.backup_id, to=out)
    assert out.read_bytes() == b"precious"
    restore(repo, m.backup_id, to=out, force=True)
    assert out.read_bytes() == image.read_bytes()
    with pytest.raises(UsageError, match="directory"):
        restore(repo, m.backup_id, to=tmp_path, force=True)


def _some_chunk(repo: Repository, backup_id: str) -> bytes:
    idx = repo.load_index(backup_id, "sda")
    return next(idx.get(i) for i in range(len(idx)) if idx.get(i) != NULL_ID)


def test_corrupt_chunk_aborts_and_leaves_nothing(
    repo: Repository, image: Path, tmp_path: Path
) -> None:
    m = backup_image(repo, {"sda": image})
    cid = _some_chunk(repo, m.backup_id)
    flip_blob(repo, cid)
    out = tmp_path / "out.raw"
    out.write_bytes(b"old")
    with pytest.raises(CorruptionError, match=cid.hex()):
        restore(repo, m.backup_id, to=out, force=True, workers=2)
    assert out.read_bytes() == b"old", "existing target untouched"
    with pytest.raises(CorruptionError):
        restore(repo, m.backup_id, to=tmp_path / "new.raw")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["disk.img", "out.raw", "repo"]


def test_swapped_chunk_is_caught_by_id(repo: Repository, image: Path, tmp_path: Path) -> None:
    """A well-formed chunk under the wrong name passes CRC/BLAKE3 but not the id check."""
    m = backup_image(repo, {"sda": image})
    idx = repo.load_index(m.backup_id, "sda")
    ids = sorted(idx.unique_ids())
    swap_blobs(repo, ids[0], ids[1])
    with pytest.raises(CorruptionError, match=r"another id|decompress|decodes to"):
        restore(repo, m.backup_id, to=tmp_path / "o.raw")
    assert not (tmp_path / "o.raw").exists()


def test_missing_chunk(repo: Repository, image: Path, tmp_path: Path) -> None:
    m = backup_image(repo, {"sda": image})
    path, _o, _n = blob_location(repo, _some_chunk(repo, m.backup_id))
    path.unlink()
    with pytest.raises(CorruptionError, match="missing"):
        restore(repo, m.backup_id, to=tmp_path / "o.raw")
