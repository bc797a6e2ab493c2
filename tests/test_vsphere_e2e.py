"""vSphere end to end: the coordinator drives VsphereHypervisor against vCSim, the
disks are read through the real VDDK binding (snapferry.engine.sources.vddk) loaded on the
project's stand-in libvixDiskLib (tests/vddk_stub), into a real repository; then the
restore points are restored and compared byte for byte.

The stand-in VDDK serves "[LocalDS_0] DC0_H0_VM0/disk1.vmdk" (the simulator VM's disk
backing) from a local sparse file; writes to that file between backups stand in for
the guest's writes. vCSim cannot answer QueryChangedDiskAreas (MethodNotFound), so for
the incremental the VM managed object is swapped, after inspect(), for a FAKE subclass
of vim.VirtualMachine (see test_vsphere_faults.py) answering with the areas this test
wrote, as recorded DiskChangeInfo pages.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pyVmomi import vim
from test_vsphere_faults import recorded_vm
from vcsimserver import NO_TOOLS_VM, VM0, Vcsim, observe_vm

from snapferry.engine.coordinator import VmBackupOptions, backup_vm
from snapferry.engine.errors import QuiesceError, SnapferryError
from snapferry.engine.hypervisor import VmInfo
from snapferry.engine.restore import restore
from snapferry.engine.store.repo import Repository
from snapferry.engine.vsphere.backend import VsphereHypervisor, VsphereOptions

if TYPE_CHECKING:  # imported by pytest_plugins (importing it here too upsets pytest)
    from vddkstub import StubEnv

pytest_plugins = ["vcsimserver", "vddkstub"]

KiB = 1024
DISK_REL = "LocalDS_0/DC0_H0_VM0/disk1.vmdk"  # "[LocalDS_0] DC0_H0_VM0/disk1.vmdk"
Info = vim.VirtualMachine.DiskChangeInfo
Area = vim.VirtualMachine.DiskChangeInfo.DiskChangeExtent


class RecordedCbtHypervisor(VsphereHypervisor):
    """The real backend; after inspect() its VM object answers QueryChangedDiskAreas
    from ``self.recorded`` (one page per call of at most 256 KiB) - the FAKE part."""

    recorded: list[tuple[int, int]] = []
    asked: list[str] = []

    def inspect(self) -> VmInfo:
        info = super().inspect()
        recorded, asked = self.recorded, self.asked

        def query(vm: Any, *, snapshot: Any, deviceKey: int, startOffset: int,
                  changeId: str) -> Any:
            asked.append(changeId)
            end = startOffset + 256 * KiB
            areas = [
                Area(start=max(s, startOffset), length=min(s + n, end) - max(s, startOffset))
                for s, n in recorded
                if s < end and s + n > startOffset
            ]
            return Info(startOffset=startOffset, length=256 * KiB, changedArea=areas)

        self._vm = recorded_vm(self.vm, QueryChangedDiskAreas=query)
        return info


def scribble(path: Path, areas: list[tuple[int, int]], seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for off, n in areas:
            f.seek(off)
            f.write(rng.randbytes(n))


def test_full_then_incremental_restore_byte_identical(
    vcsim: Vcsim,
    vddk_libdir: Path,
    vddk_stub_env: StubEnv,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VDDK_STUB_PASSWORD", vcsim.password)  # VDDK gets the password too
    size = 1 << 20  # the simulator's disk capacity
    image = vddk_stub_env.diskdir / DISK_REL
    vddk_stub_env.make_image(DISK_REL, size, [(0, 64 * KiB), (512 * KiB, 128 * KiB)], seed=5)
    repo = Repository.init(tmp_path / "repo", chunk_size=64 * KiB, zstd_level=3)
    opts = VsphereOptions(vddk_libdir=str(vddk_libdir))

    def backend() -> RecordedCbtHypervisor:
        return RecordedCbtHypervisor.from_uri(
            vcsim.uri(VM0), password=vcsim.password, options=opts
        )

    hv = backend()
    try:
        first = backup_vm(hv, repo, VmBackupOptions(mode="auto", quiesce="required", workers=2))
    finally:
        hv.close()
    assert first.backup.mode == "full" and first.consistency == "filesystem"
    assert observe_vm(vcsim)["snapshots"] == []  # committed: snapshot removed
    full_copy = image.read_bytes()
    # VDDK was opened on our snapshot of our VM, read-only
    connects = vddk_stub_env.events("connect")
    assert connects and all(f"vmx=moref={observe_vm(vcsim)['moref']}" in c for c in connects)
    assert all(any(w.startswith("snapshot=snapshot-") for w in c) for c in connects)

    changed = [(64 * KiB, 4 * KiB), (300 * KiB, 40 * KiB), (size - 8 * KiB, 8 * KiB)]
    scribble(image, changed, seed=9)  # the guest writes between the backups
    RecordedCbtHypervisor.recorded = changed
    RecordedCbtHypervisor.asked = []
    hv = backend()
    try:
        second = backup_vm(hv, repo, VmBackupOptions(mode="incremental", workers=2))
    finally:
        hv.close()
    assert second.backup.mode == "incremental"
    assert second.backup.parent == first.backup.backup_id
    # asked from the changeId the full backup recorded, one page per 256 KiB
    parent_change_id = repo.load_manifest(first.backup.backup_id).disks[0].tracking["change_id"]
    assert RecordedCbtHypervisor.asked == [parent_change_id] * 4
    # only the chunks holding changed bytes were read: 4 of the 16 chunks
    assert second.backup.bytes_read == 4 * 64 * KiB
    assert observe_vm(vcsim)["snapshots"] == []

    restore(repo, first.backup.backup_id, to=tmp_path / "full.raw")
    restore(repo, second.backup.backup_id, to=tmp_path / "inc.raw")
    assert (tmp_path / "full.raw").read_bytes() == full_copy
    assert (tmp_path / "inc.raw").read_bytes() == image.read_bytes()
    assert full_copy != image.read_bytes()


def test_copy_failure_rolls_back_and_leaves_no_snapshot(
    vcsim: Vcsim,
    vddk_libdir: Path,
    vddk_stub_env: StubEnv,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vddk_stub_env.make_image(DISK_REL, 1 << 20, [(0, 256 * KiB)], seed=3)
    monkeypatch.setenv("VDDK_STUB_FAIL_SECTOR", "300")  # inside the data: every try fails
    repo = Repository.init(tmp_path / "repo", chunk_size=64 * KiB, zstd_level=3)
    hv = VsphereHypervisor.from_uri(
        vcsim.uri(VM0), password=vcsim.password,
        options=VsphereOptions(vddk_libdir=str(vddk_libdir)),
    )
    try:
        with pytest.raises(SnapferryError):
            backup_vm(hv, repo, VmBackupOptions(mode="auto", workers=1))
    finally:
        hv.close()
    assert vddk_stub_env.events("read-fail")  # it got as far as reading our snapshot
    assert observe_vm(vcsim)["snapshots"] == []
    assert repo.list_backups() == []


def test_vm_without_tools_required_fails_preferred_falls_back(
    vcsim: Vcsim, vddk_libdir: Path, vddk_stub_env: StubEnv, tmp_path: Path
) -> None:
    vm = NO_TOOLS_VM
    vddk_stub_env.make_image(f"LocalDS_0/{vm}/disk1.vmdk", 1 << 20, [(0, 64 * KiB)], seed=4)
    repo = Repository.init(tmp_path / "repo", chunk_size=64 * KiB, zstd_level=3)
    opts = VsphereOptions(vddk_libdir=str(vddk_libdir))
    hv = VsphereHypervisor.from_uri(vcsim.uri(vm), password=vcsim.password, options=opts)
    try:
        with pytest.raises(QuiesceError, match="VMware Tools are not running"):
            backup_vm(hv, repo, VmBackupOptions(quiesce="required", retries=0, workers=1))
        assert observe_vm(vcsim, vm)["snapshots"] == []
        res = backup_vm(hv, repo, VmBackupOptions(quiesce="preferred", retries=0, workers=1))
    finally:
        hv.close()
    assert res.consistency == "crash" and not res.quiesced
    assert any("crash-consistent" in w for w in res.warnings)
    assert observe_vm(vcsim, vm)["snapshots"] == []
    assert [m.backup_id for m in repo.list_backups()] == [res.backup.backup_id]
