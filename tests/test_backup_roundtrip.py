"""Backup → restore round trips through the CLI, dedup and incremental economics.

Real components only: the installed ``snapferry`` command, real worker processes, the
real chunk store on disk, generated sparse images.
"""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path

import imagegen
import pytest
from conftest import TEST_IMAGE_SIZE, manifests, run_cli

CHUNK = 1 << 20


def backup_json(repo: Path, image: Path, *extra: str) -> dict:
    p = run_cli("backup", image, "--repo", repo, "--json", *extra)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # no progress bar and no chatter when not on a terminal
    return json.loads(p.stdout)


def repo_size(repo: Path) -> int:
    return sum(f.stat().st_size for f in repo.rglob("*") if f.is_file())


def zero_chunks(image: Path, chunk: int = CHUNK) -> list[int]:
    out = []
    with open(image, "rb") as f:
        i = 0
        while block := f.read(chunk):
            if block.count(0) == len(block):
                out.append(i)
            i += 1
    return out


def data_in(path: Path, start: int, end: int) -> bool:
    """True when ``[start, end)`` of ``path`` holds allocated data (not a hole)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            pos = os.lseek(fd, start, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after start
            return False
        return pos < end
    finally:
        os.close(fd)


def restore_and_compare(repo: Path, backup_id: str, image: Path, out: Path) -> None:
    p = run_cli("restore", "--repo", repo, backup_id, "--to", out, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["virtual_size"] == image.stat().st_size
    assert filecmp.cmp(image, out, shallow=False)


def check_roundtrip(repo: Path, image: Path, tmp_path: Path) -> dict:
    res = backup_json(repo, image)
    assert res["mode"] == "full" and res["parent"] is None
    (d,) = res["disks"]
    zeros = zero_chunks(image)
    assert zeros, "the generated image must hold zero chunks"
    assert d["virtual_size"] == image.stat().st_size
    # holes are never read: exactly the chunks holding allocated data are read
    size = image.stat().st_size
    allocated = [i for i in range(-(-size // CHUNK)) if data_in(image, i * CHUNK, (i + 1) * CHUNK)]
    assert len(allocated) < d["chunks"]
    assert d["bytes_read"] == sum(min(CHUNK, size - i * CHUNK) for i in allocated)
    assert d["chunks_new"] + d["chunks_reused"] == d["chunks"] - d["zero_chunks"]
    assert d["zero_chunks"] == len(zeros)
    assert d["chunks_reused"] > 0  # repeated blocks deduplicate
    assert 0 < d["bytes_stored"] < d["bytes_read"]  # text compresses
    out = tmp_path / "restored.raw"
    restore_and_compare(repo, res["backup_id"], image, out)
    # sparse where the source had zero chunks
    for i in zeros:
        assert not data_in(out, i * CHUNK, min((i + 1) * CHUNK, image.stat().st_size)), i
    # (+ slack for the filesystem's own extent-tree blocks)
    assert out.stat().st_blocks * 512 <= (d["chunks"] - len(zeros)) * CHUNK + (256 << 10)
    return res


def test_roundtrip_mixed_image(repo: Path, mixed_image: Path, tmp_path: Path) -> None:
    check_roundtrip(repo, mixed_image, tmp_path)
    v = run_cli("verify", "--repo", repo, "--read-data", "--json")
    assert v.returncode == 0, v.stdout + v.stderr
    assert json.loads(v.stdout)["ok"] is True


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SNAPFERRY_SLOW") != "1", reason="set SNAPFERRY_SLOW=1")
def test_roundtrip_1gib(repo: Path, tmp_path: Path) -> None:
    image = imagegen.make_image(tmp_path / "big.raw", 1 << 30, seed=77)
    check_roundtrip(repo, image, tmp_path)


def test_odd_size_image_and_small_chunks(tmp_path: Path) -> None:
    """A size that is not a multiple of the chunk size, 64 KiB chunks, 3 workers."""
    repo = tmp_path / "repo64k"
    assert run_cli("init", repo, "--chunk-size", "64K").returncode == 0
    image = imagegen.make_image(tmp_path / "odd.raw", (20 << 20) + 12345, seed=9)
    res = backup_json(repo, image, "--workers", "3", "--name", "odd")
    assert res["workers"] == 3 and res["vm"] == "odd"
    assert res["disks"][0]["chunks"] == -(-image.stat().st_size // (64 << 10))
    restore_and_compare(repo, res["backup_id"], image, tmp_path / "odd.out")


def test_second_backup_adds_under_one_percent(
    repo: Path, mixed_image: Path, tmp_path: Path
) -> None:
    first = backup_json(repo, mixed_image)
    size1 = repo_size(repo)
    second = backup_json(repo, mixed_image)
    size2 = repo_size(repo)
    # a plain file has no changed-block tracker: every backup reads it fully, so it is
    # a full backup (no parent); dedup makes it store nothing new
    assert second["mode"] == "full" and second["parent"] is None
    assert second["vm"] == first["vm"]
    d = second["disks"][0]
    assert d["chunks_new"] == 0 and d["bytes_stored"] == 0
    assert size2 - size1 < size1 // 100, (size1, size2)
    restore_and_compare(repo, second["backup_id"], mixed_image, tmp_path / "r2.raw")


def test_rewritten_blocks_add_about_the_rewritten_data(
    repo: Path, mixed_image: Path, tmp_path: Path
) -> None:
    first = backup_json(repo, mixed_image)
    size1 = repo_size(repo)
    copy = tmp_path / "copy.raw"
    copy.write_bytes(b"")
    os.truncate(copy, 0)
    # copy sparsely (keep holes), then rewrite 1 % of the 64 KiB blocks
    with open(mixed_image, "rb") as src, open(copy, "wb") as dst:
        dst.truncate(TEST_IMAGE_SIZE)
        while block := src.read(1 << 16):
            if block.count(0) != len(block):
                dst.seek(src.tell() - len(block))
                dst.write(block)
    blocks = imagegen.rewrite_blocks(copy, 0.01, seed=5)
    touched = {b * (1 << 16) // CHUNK for b in blocks}
    res = backup_json(repo, copy, "--name", mixed_image.name)
    assert res["mode"] == "full" and res["parent"] is None  # files: always full
    d = res["disks"][0]
    added = repo_size(repo) - size1
    rewritten = len(blocks) * (1 << 16)
    assert d["chunks_new"] <= len(touched)
    # random data does not compress: at least the rewritten bytes are added ...
    assert added >= rewritten * 0.9, (added, rewritten)
    # ... and at most the chunks they fall into (plus index/manifest overhead)
    assert added <= len(touched) * (CHUNK + 4096) + 64 * 1024, (added, len(touched))
    restore_and_compare(repo, res["backup_id"], copy, tmp_path / "r.raw")
    restore_and_compare(repo, first["backup_id"], mixed_image, tmp_path / "r1.raw")


def test_all_hole_image(repo: Path, tmp_path: Path) -> None:
    image = tmp_path / "empty.raw"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    res = backup_json(repo, image)
    d = res["disks"][0]
    assert d["bytes_read"] == 0 and d["chunks_new"] == 0 and d["zero_chunks"] == 32
    out = tmp_path / "empty.out"
    restore_and_compare(repo, res["backup_id"], image, out)
    assert out.stat().st_blocks == 0


def test_huge_sparse_disk_costs_in_proportion_to_data(repo: Path, tmp_path: Path) -> None:
    """A 1 TiB sparse file with 3 MiB of data: only the data is read."""
    image = tmp_path / "huge.raw"
    with open(image, "wb") as f:
        f.truncate(1 << 40)
        for off in (0, 123 << 30, (1 << 40) - (1 << 20)):
            f.seek(off)
            f.write(os.urandom(1 << 20))
    res = backup_json(repo, image, "--verify", "quick")
    d = res["disks"][0]
    assert d["virtual_size"] == 1 << 40
    assert d["bytes_read"] == 3 << 20
    assert d["chunks_new"] == 3
    assert d["zero_chunks"] == (1 << 20) - 3
    assert res["verified"] == "quick"
    assert len(manifests(repo)) == 1
