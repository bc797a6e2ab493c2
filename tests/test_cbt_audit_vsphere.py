"""The changed-block audit on the vSphere path: vCSim + the real VDDK binding on the
stand-in libvixDiskLib. vSphere CBT that "forgets" a changed area (the vSphere 6.x
failure) is the FAKE ``QueryChangedDiskAreas`` of test_vsphere_e2e answering with
fewer areas than were written; the audit catches it and the restore is byte-identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from test_vsphere_e2e import DISK_REL, RecordedCbtHypervisor, scribble
from vcsimserver import VM0, Vcsim

from snapferry.engine.coordinator import VmBackupOptions, backup_vm
from snapferry.engine.restore import restore
from snapferry.engine.store.repo import Repository
from snapferry.engine.vsphere.backend import VsphereOptions

if TYPE_CHECKING:
    from vddkstub import StubEnv

pytest_plugins = ["vcsimserver", "vddkstub"]

KiB = 1024


def test_cbt_forgetting_an_area_is_caught(
    vcsim: Vcsim,
    vddk_libdir: Path,
    vddk_stub_env: StubEnv,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VDDK_STUB_PASSWORD", vcsim.password)
    size = 1 << 20
    image = vddk_stub_env.diskdir / DISK_REL
    vddk_stub_env.make_image(DISK_REL, size, [(0, 64 * KiB), (512 * KiB, 128 * KiB)], seed=5)
    repo = Repository.init(tmp_path / "repo", chunk_size=64 * KiB)
    opts = VsphereOptions(vddk_libdir=str(vddk_libdir))

    def run(audit: float) -> str:
        hv = RecordedCbtHypervisor.from_uri(vcsim.uri(VM0), password=vcsim.password,
                                            options=opts)
        try:
            return backup_vm(hv, repo, VmBackupOptions(workers=2, audit=audit)).backup.backup_id
        finally:
            hv.close()

    run(0)
    written = [(64 * KiB, 4 * KiB), (300 * KiB, 40 * KiB), (size - 8 * KiB, 8 * KiB)]
    scribble(image, written, seed=9)
    RecordedCbtHypervisor.recorded = written[:2]  # CBT lost the last area
    RecordedCbtHypervisor.asked = []
    inc = run(100)  # 16 chunks: every clean chunk holding data is re-read
    m = repo.load_manifest(inc)
    (d,) = m.disks
    assert m.mode == "incremental"
    assert d.cbt_audit is not None and d.cbt_audit["mismatched"] == 1
    assert "audit" in (d.full_reason or "")
    restore(repo, inc, to=tmp_path / "inc.raw")
    assert (tmp_path / "inc.raw").read_bytes() == image.read_bytes()

    # the next backup of the disk is full (the parent's audit failed), and right
    RecordedCbtHypervisor.recorded = []
    nxt = repo.load_manifest(run(1))
    assert nxt.mode == "full" and "audit" in (nxt.disks[0].full_reason or "")
    restore(repo, nxt.backup_id, to=tmp_path / "nxt.raw")
    assert (tmp_path / "nxt.raw").read_bytes() == image.read_bytes()
