"""engine/planning.py: the parent choice, the per-disk rules and the run arithmetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from snapferry.engine.backup import BackupOptions, run_backup
from snapferry.engine.errors import UsageError
from snapferry.engine.planning import (
    DiskInput,
    SeriesRequest,
    chains,
    check_incremental,
    choose_parent,
    disk_full_reason,
    mask_runs,
    merge_runs,
    review_disks,
    runs_mask,
)
from snapferry.engine.sources.file import FileSource
from snapferry.engine.store.manifest import DiskEntry, Manifest
from snapferry.engine.store.repo import Repository

CS = 64 * 1024


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", chunk_size=CS)


def point(repo: Repository, tmp_path: Path, name: str, identity: str | None) -> str:
    img = tmp_path / f"{name}-{identity}.raw".replace("/", "_")
    img.write_bytes(b"x" * CS)
    with FileSource(img) as src:
        res = run_backup(repo, name, [DiskInput("disk", src)],
                         BackupOptions(workers=1, identity=identity), consistency="n/a")
    return res.backup_id


def test_parent_is_the_latest_of_the_series_with_the_same_identity(
    repo: Repository, tmp_path: Path
) -> None:
    a1 = point(repo, tmp_path, "s", "h:/a")
    assert choose_parent(repo, SeriesRequest("s", "h:/a")).parent.backup_id == a1  # type: ignore[union-attr]
    assert choose_parent(repo, SeriesRequest("other", "h:/a")).parent is None
    assert choose_parent(repo, SeriesRequest("s", "h:/a", mode="full")).parent is None
    moved = choose_parent(repo, SeriesRequest("s", "h:/b"))
    assert moved.parent is None
    assert moved.warnings == ["the source of 's' changed (was h:/a, now h:/b): full backup"]
    with pytest.raises(UsageError, match="same source"):
        choose_parent(repo, SeriesRequest("s", "h:/b", mode="incremental"))
    # no identity asked for (a library caller): no check
    assert choose_parent(repo, SeriesRequest("s")).parent is not None


def test_explicit_parent_must_be_of_the_series(repo: Repository, tmp_path: Path) -> None:
    a = point(repo, tmp_path, "s", "h:/a")
    point(repo, tmp_path, "t", "h:/t")
    assert choose_parent(repo, SeriesRequest("s", "h:/a", parent_id=a)).parent is not None
    with pytest.raises(UsageError, match="is a restore point of 's', not 't'"):
        choose_parent(repo, SeriesRequest("t", "h:/t", parent_id=a))
    # named by id from another source (two exports of one disk): taken, and said
    other = choose_parent(repo, SeriesRequest("s", "h:/a2", parent_id=a))
    assert other.parent is not None and other.parent.backup_id == a
    assert other.warnings == [f"--parent {a} was made from another source (h:/a, now "
                              "h:/a2): chaining to it as asked"]


def test_restore_points_without_an_identity_still_chain(
    repo: Repository, tmp_path: Path
) -> None:
    old = point(repo, tmp_path, "s", None)  # made before identities were recorded
    assert choose_parent(repo, SeriesRequest("s", "h:/a")).parent.backup_id == old  # type: ignore[union-attr]


def manifest(**disk: object) -> Manifest:
    entry = DiskEntry(name="d0", virtual_size=int(disk.pop("virtual_size", 4 * CS)),
                      **disk)  # type: ignore[arg-type]
    return Manifest(backup_id="20260101T000000Z-0001", vm="vm", chunk_size=CS, disks=[entry])


class _Src:
    def __init__(self, size: int) -> None:
        self.size = size


def test_disk_rules() -> None:
    assert disk_full_reason(None, "d0", 4 * CS) is None
    assert disk_full_reason(manifest(), "d0", 4 * CS) is None
    assert disk_full_reason(manifest(), "d1", 4 * CS) == "no earlier restore point of disk d1"
    assert "size changed" in (disk_full_reason(manifest(), "d0", 5 * CS) or "")
    bad = manifest(cbt_audit={"sampled": 9, "mismatched": 2, "population": 90})
    assert "audit" in (disk_full_reason(bad, "d0", 4 * CS) or "")
    ok = manifest(cbt_audit={"sampled": 9, "mismatched": 0, "population": 90})
    assert disk_full_reason(ok, "d0", 4 * CS) is None


def test_review_forces_full_and_says_it_once() -> None:
    bad = manifest(cbt_audit={"sampled": 9, "mismatched": 2, "population": 90})
    disks = [DiskInput("d0", _Src(4 * CS), [(0, 10)]),  # type: ignore[arg-type]
             DiskInput("d1", _Src(CS), None, full_reason="disk d1: bitmap gone: full")]  # type: ignore[arg-type]
    out, warnings = review_disks(bad, disks)
    assert out[0].changed is None and "audit" in (out[0].full_reason or "")
    assert warnings[0].startswith("disk d0: the changed-block audit")
    assert warnings[1] == "disk d1: bitmap gone: full"  # not "disk d1: disk d1: ..."
    assert chains(bad, out) is None  # every disk full: a full backup
    with pytest.raises(UsageError, match="cannot make an incremental"):
        check_incremental("incremental", out, bad)
    check_incremental("auto", out, bad)


def test_runs() -> None:
    assert merge_runs([(CS * 3 + 1, 10), (0, 1), (CS * 4 - 1, 2), (CS * 10, 0)], CS,
                      CS * 8) == [(0, 1), (3, 2)]
    runs = [(0, 2), (5, 1), (7, 3)]
    assert mask_runs(runs_mask(runs, 10)) == runs
    assert mask_runs(np.zeros(0, dtype=bool)) == []
