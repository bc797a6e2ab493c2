"""verify_repo / repo_info: healthy repos pass; damage is found and traced to the restore
points it affects."""

from __future__ import annotations

from pathlib import Path

import pytest
from store_helpers import (
    backup_image,
    blob_location,
    chunks_of,
    flip_blob,
    make_mixed_image,
    overwrite_random,
)

from snapferry.engine.errors import RepositoryError
from snapferry.engine.store import Manifest, Repository
from snapferry.engine.verify import repo_info, verify_repo

MiB = 1 << 20


@pytest.fixture
def two_points(tmp_path: Path) -> tuple[Repository, Manifest, Manifest]:
    repo = Repository.init(tmp_path / "repo", chunk_size=128 << 10)
    img = tmp_path / "d.img"
    make_mixed_image(img, 8 * MiB)
    full = backup_image(repo, {"sda": img})
    offs = overwrite_random(img, 6)
    inc = backup_image(repo, {"sda": img}, parent=full,
                       changed={"sda": chunks_of(offs, 64 << 10, repo.chunk_size)})
    return repo, full, inc


def test_healthy_repo(two_points: tuple[Repository, Manifest, Manifest]) -> None:
    repo, full, inc = two_points
    for read_data in (False, True):
        rep = verify_repo(repo, None, read_data=read_data)
        assert rep.ok and rep.problems == [] and rep.bad_chunks == []
        assert sorted(rep.backups_checked) == sorted([full.backup_id, inc.backup_id])
        all_ids = repo.load_index(full.backup_id, "sda").unique_ids() | repo.load_index(
            inc.backup_id, "sda").unique_ids()
        pages = {p for m in (full, inc) for p in m.disks[0].pages if isinstance(p, str)}
        assert rep.chunks_checked == len(all_ids) + len(pages)  # chunks and index pages
    assert rep.bytes_read > 0
    j = rep.to_json()
    assert j["ok"] is True and j["read_data"] is True


def test_bad_chunk_traced_to_restore_points(
    two_points: tuple[Repository, Manifest, Manifest],
) -> None:
    repo, full, inc = two_points
    ids_full = repo.load_index(full.backup_id, "sda").unique_ids()
    ids_inc = repo.load_index(inc.backup_id, "sda").unique_ids()
    shared = sorted(ids_full & ids_inc)[0]
    only_inc = sorted(ids_inc - ids_full)[0]
    flip_blob(repo, shared)
    flip_blob(repo, only_inc)
    quick = verify_repo(repo, None, read_data=False)
    assert quick.ok, "a payload bit flip keeps the pack's structure valid: only read_data sees it"
    rep = verify_repo(repo, None, read_data=True)
    assert not rep.ok
    bad = {b.id: b.affects for b in rep.bad_chunks}
    assert bad == {
        shared.hex(): sorted([full.backup_id, inc.backup_id]),
        only_inc.hex(): [inc.backup_id],
    }
    assert rep.bad_backups == sorted([full.backup_id, inc.backup_id])
    assert any(shared.hex() in p and full.backup_id in p for p in rep.problems)
    one = verify_repo(repo, full.backup_id, read_data=True)
    assert [b.id for b in one.bad_chunks] == [shared.hex()]
    assert one.backups_checked == [full.backup_id]


def test_quick_verify_finds_missing_and_truncated_packs(
    two_points: tuple[Repository, Manifest, Manifest],
) -> None:
    repo, full, _inc = two_points
    ids = sorted(repo.load_index(full.backup_id, "sda").unique_ids())
    page = bytes.fromhex(str(full.disks[0].pages[0]))
    gone = blob_location(repo, ids[0])[0]  # the chunks' pack
    cut = blob_location(repo, page)[0]  # the index pages' pack
    assert gone != cut
    gone.unlink()
    cut.write_bytes(cut.read_bytes()[:-7])
    rep = verify_repo(repo, None, read_data=False)
    reasons = " ".join(b.reason for b in rep.bad_chunks)
    assert "missing" in reasons
    assert any("magic" in p or "torn" in p for p in rep.problems)
    assert full.backup_id in rep.bad_backups


def test_bad_manifest_and_index(two_points: tuple[Repository, Manifest, Manifest]) -> None:
    repo, full, inc = two_points
    (repo.path / "snapshots" / full.backup_id).write_text("{broken")
    idx_files = sorted((repo.path / "index").iterdir())
    for f in idx_files:
        f.write_bytes(f.read_bytes()[:-16])  # every index file torn: nothing is trusted
    rep = verify_repo(repo, None, read_data=False)
    assert not rep.ok
    assert rep.bad_backups == sorted([full.backup_id, inc.backup_id])
    assert any(full.backup_id in p and "JSON" in p for p in rep.problems)
    assert any("index file" in p and "torn" in p for p in rep.problems)
    assert any(inc.backup_id in p for p in rep.problems)
    with pytest.raises(RepositoryError, match="no restore point"):
        verify_repo(repo, "20000101T000000Z-dead", read_data=False)


def test_repo_info(two_points: tuple[Repository, Manifest, Manifest]) -> None:
    repo, full, inc = two_points
    info = repo_info(repo)
    assert info["chunks"] == len(list(repo.store.iterate()))
    assert info["logical_bytes"] == 2 * 8 * MiB
    assert [p["backup_id"] for p in info["restore_points"]] == [full.backup_id, inc.backup_id]
    # the incremental shares almost every chunk with the full: dedup well above 1.5
    assert info["dedup_ratio"] > 1.5
    assert info["compression_ratio"] > 1.0
    assert info["size_on_disk"] >= info["chunk_bytes_stored"]
