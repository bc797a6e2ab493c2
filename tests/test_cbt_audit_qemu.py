"""The changed-block audit on the real lab VM: a QEMU dirty bitmap cleared behind
snapferry's back (``block-dirty-bitmap-clear`` over QMP) drops the guest's writes from
the change set; the audit notices, the backup reads that disk fully, the restore point
holds the files, and the next backup starts the disk on a fresh bitmap.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from coordvm import (  # LabVm through coordvm: wherever the lab package keeps it
    LabVm,
    check_restore_point,
    make_hv,
    new_repo,
    vm_work_dir,
    write_known,
)
from labvm import assert_vm_clean, bitmaps, control, lab_vm

from snapferry.engine.coordinator import VmBackupOptions, VmBackupResult, backup_vm
from snapferry.engine.store.repo import Repository

pytestmark = pytest.mark.vm
__all__ = ["lab_vm"]


def run(vm: LabVm, work: Path, repo: Repository, audit: float) -> VmBackupResult:
    hv = make_hv(vm, work)
    try:
        return backup_vm(hv, repo, VmBackupOptions(quiesce="required", workers=2,
                                                   audit=audit))
    finally:
        hv.close()


def test_bitmap_cleared_behind_our_back_is_caught(
    lab_vm: LabVm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = vm_work_dir(lab_vm, tmp_path, monkeypatch)
    repo = new_repo(tmp_path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    before = write_known(lab_vm, "audit-before", 2)
    first = run(lab_vm, work, repo, audit=100)
    bitmap = repo.load_manifest(first.backup.backup_id).disk("disk0").tracking["bitmap"]

    # The guest writes files; then the recording bitmap forgets them (the lie).
    files = {**before, **write_known(lab_vm, "audit-lost", 4)}
    q = control(lab_vm)
    try:
        q.cmd("block-dirty-bitmap-clear", {"node": "lab-disk0", "name": bitmap})
    finally:
        q.close()

    # 32 MiB disks in 64 KiB chunks, audit 100 %: every clean chunk holding data is
    # re-read, so a chunk the bitmap lost cannot be missed (miss chance 0).
    r = run(lab_vm, work, repo, audit=100)
    assert_vm_clean(lab_vm, work)
    m = repo.load_manifest(r.backup.backup_id)
    d0, d1 = m.disk("disk0"), m.disk("disk1")
    assert d0.cbt_audit is not None and d0.cbt_audit["mismatched"] > 0
    assert "audit" in (d0.full_reason or "")
    assert d1.cbt_audit is not None and d1.cbt_audit["mismatched"] == 0  # honest disk
    assert d1.full_reason is None
    full0 = next(d for d in first.backup.disks if d.name == "disk0")
    got0 = next(d for d in r.backup.disks if d.name == "disk0")
    assert got0.bytes_read >= full0.bytes_read  # read fully
    check_restore_point(repo, r.backup.backup_id, files, scratch)

    # Next: disk0 full on a fresh bitmap (the old one dropped), disk1 incremental.
    nxt = run(lab_vm, work, repo, audit=1)
    assert_vm_clean(lab_vm, work)
    m2 = repo.load_manifest(nxt.backup.backup_id)
    assert m2.mode == "incremental"
    assert "audit" in (m2.disk("disk0").full_reason or "")
    assert m2.disk("disk1").full_reason is None
    bm = bitmaps(lab_vm)
    assert m2.disk("disk0").tracking["bitmap"] in bm
    assert m.disk("disk0").tracking["bitmap"] not in bm
    check_restore_point(repo, nxt.backup.backup_id, files, scratch)
