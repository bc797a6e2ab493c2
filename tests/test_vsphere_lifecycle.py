"""VsphereHypervisor through the lifecycle against vCSim (real pyvmomi over loopback).

vCSim (tests/vcsim/main.go) runs the stock VPX inventory; our main gives its VMs
running Tools, CBT support and a fixed changeId per disk (the stock simulator has none
of these), except NO_TOOLS_VM (Tools not running) and NO_CBT_VM (no CBT support).
Every check of the VM's state afterwards goes through an independent pyvmomi session
(``observe_vm``), not through the code under test.

Disk reads are not exercised here: ``source_factory`` plugs a stand-in source (the
VDDK/NBD data path is another engineer's and is tested end to end elsewhere).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vcsimserver import NO_CBT_VM, NO_TOOLS_VM, VM0, Vcsim, add_foreign_snapshot, observe_vm

from snapferry.engine.errors import HypervisorError, QuiesceError, UsageError
from snapferry.engine.hypervisor import ParentDisk
from snapferry.engine.source import DiskSource, Extent
from snapferry.engine.vsphere.backend import SNAPSHOT_PREFIX, VsphereHypervisor, VsphereOptions

DISK = "scsi0-0"  # the one disk of the simulator's VMs, on ParaVirtualSCSI bus 0 unit 0

pytest_plugins = ["vcsimserver"]  # the vcsim / vcsim_tls fixtures


class Notes:
    """A Progress that keeps the notes the backend gives the user."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def start(self, label: str, total_bytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def note(self, message: str) -> None:
        self.notes.append(message)

    def finish(self) -> None:
        pass


class StandInSource:
    """Stands in for the VDDK source of a snapshot disk (not read in these tests)."""

    def __init__(self, disk_path: str, snapshot_moref: str, vm_moref: str) -> None:
        self.opened_with = (disk_path, snapshot_moref, vm_moref)
        self.closed = False

    @property
    def size(self) -> int:
        return 0

    def extents(
        self, offset: int = 0, length: int | None = None, *, dirty: bool = False
    ) -> Iterator[Extent]:
        return iter(())

    def readinto(self, buf: memoryview, offset: int) -> None:
        raise AssertionError("not read in these tests")

    def spec(self) -> Any:
        raise AssertionError("not cloned in these tests")

    def clone(self) -> DiskSource:
        raise AssertionError("not cloned in these tests")

    def describe(self) -> dict[str, Any]:
        return {"kind": "stand-in"}

    def close(self) -> None:
        self.closed = True


def backend(sim: Vcsim, vm: str = VM0, **params: str) -> tuple[VsphereHypervisor, Notes]:
    notes = Notes()
    opts = VsphereOptions(source_factory=StandInSource, progress=notes)
    hv = VsphereHypervisor.from_uri(sim.uri(vm, **params), password=sim.password, options=opts)
    return hv, notes


def test_first_backup_enables_cbt_takes_quiesced_snapshot_and_removes_it(vcsim: Vcsim) -> None:
    assert observe_vm(vcsim)["cbt"] is False
    hv, notes = backend(vcsim)
    try:
        info = hv.inspect()
        assert info.name == VM0 and info.disks == [DISK]
        assert info.meta["cbt_just_enabled"] is True
        assert observe_vm(vcsim)["cbt"] is True  # ReconfigVM_Task really ran
        assert any("enabled changed block tracking" in n and "full" in n for n in notes.notes)

        assert hv.quiesce() == 1
        assert observe_vm(vcsim)["snapshots"] == []  # quiesce alone takes nothing
        hv.snapshot("auto", {})
        seen = observe_vm(vcsim)
        assert len(seen["snapshots"]) == 1  # type: ignore[arg-type]
        assert seen["snapshots"][0].startswith(SNAPSHOT_PREFIX)  # type: ignore[index]
        assert seen["quiesced"] == [True]
        assert hv.thaw() == 1

        parent = {DISK: ParentDisk(DISK, 1 << 30, {"change_id": "x/1"})}
        (plan,) = hv.export("auto", parent)
        assert plan.name == DISK and plan.changed is None
        assert plan.full_reason is not None and "just enabled" in plan.full_reason
        assert plan.tracking["change_id"].endswith("/7")  # the disk backing's changeId
        assert plan.tracking["file"].endswith("disk1.vmdk")
        assert isinstance(plan.source, StandInSource)
        assert plan.source.opened_with == (
            plan.tracking["file"],
            hv.snapshot_moref,
            observe_vm(vcsim)["moref"],
        )

        hv.merge_overlay()
        assert observe_vm(vcsim)["snapshots"] == []
        assert plan.source.closed
        hv.check_on_base()
        hv.finalize(True)
        hv.cleanup()
        hv.cleanup()  # idempotent
        assert observe_vm(vcsim)["snapshots"] == []
    finally:
        hv.close()


def test_incremental_on_vcsim_falls_back_to_full_because_method_not_found(
    vcsim: Vcsim,
) -> None:
    first, _ = backend(vcsim)
    first.inspect()  # enables CBT
    first.close()
    hv, _ = backend(vcsim)
    try:
        info = hv.inspect()
        assert info.meta["cbt"] is True and info.meta["cbt_just_enabled"] is False
        hv.snapshot("auto", {})  # quiesce() not called: crash-consistent snapshot
        assert observe_vm(vcsim)["quiesced"] == [False]
        assert hv.thaw() == 0
        (plan,) = hv.export("full", {})
        change_id = plan.tracking["change_id"]
        size = plan.meta["capacity"]
        assert plan.changed is None and plan.full_reason is None  # asked for a full

        same = {DISK: ParentDisk(DISK, size, {"change_id": change_id.replace("/7", "/3")})}
        (plan,) = hv.export("incremental", same)
        # vCSim answers QueryChangedDiskAreas with MethodNotFound: full, said why
        assert plan.changed is None
        assert "does not implement QueryChangedDiskAreas" in (plan.full_reason or "")

        reset = {DISK: ParentDisk(DISK, size, {"change_id": "52 00 11-22 33/9"})}
        (plan,) = hv.export("incremental", reset)
        assert plan.changed is None and "CBT was reset" in (plan.full_reason or "")

        grown = {DISK: ParentDisk(DISK, size - 4096, {"change_id": change_id})}
        (plan,) = hv.export("incremental", grown)
        assert plan.changed is None and "size changed" in (plan.full_reason or "")

        (plan,) = hv.export("incremental", {})
        assert plan.changed is None and "no earlier restore point" in (plan.full_reason or "")
    finally:
        hv.cleanup()
        hv.close()
    assert observe_vm(vcsim)["snapshots"] == []


def test_vm_without_cbt_support_is_backed_up_full(vcsim: Vcsim) -> None:
    hv, notes = backend(vcsim, NO_CBT_VM)
    try:
        info = hv.inspect()
        assert info.meta["cbt"] is False
        assert any("does not support changed block tracking" in n for n in notes.notes)
        assert observe_vm(vcsim, NO_CBT_VM)["cbt"] is False  # not switched on
        hv.snapshot("auto", {})
        (plan,) = hv.export("auto", {DISK: ParentDisk(DISK, 1, {"change_id": "a/1"})})
        assert plan.changed is None and "off" in (plan.full_reason or "")
    finally:
        hv.cleanup()
        hv.close()
    assert observe_vm(vcsim, NO_CBT_VM)["snapshots"] == []


def test_tools_not_running_refuses_quiesce_before_any_snapshot(vcsim: Vcsim) -> None:
    hv, _ = backend(vcsim, NO_TOOLS_VM)
    try:
        hv.inspect()
        with pytest.raises(QuiesceError, match="VMware Tools are not running"):
            hv.quiesce()
        assert observe_vm(vcsim, NO_TOOLS_VM)["snapshots"] == []
        # the coordinator's "preferred" fallback: no quiesce() this time
        hv.cleanup()
        hv.snapshot("auto", {})
        assert observe_vm(vcsim, NO_TOOLS_VM)["quiesced"] == [False]
    finally:
        hv.cleanup()
        hv.close()
    assert observe_vm(vcsim, NO_TOOLS_VM)["snapshots"] == []


def test_leftover_snapferry_snapshot_is_refused(vcsim: Vcsim) -> None:
    add_foreign_snapshot(vcsim, f"{SNAPSHOT_PREFIX}20240101T000000Z")
    hv, _ = backend(vcsim)
    try:
        with pytest.raises(HypervisorError, match="still carries snapferry snapshot"):
            hv.inspect()
        hv.cleanup()  # must not touch a snapshot this run did not take
    finally:
        hv.close()
    assert observe_vm(vcsim)["snapshots"] == [f"{SNAPSHOT_PREFIX}20240101T000000Z"]


def test_cleanup_removes_a_killed_backups_snapshot_and_nothing_else(vcsim: Vcsim) -> None:
    """``snapferry cleanup VM`` for vSphere (it was QEMU-only): the snapferry snapshot of a
    dead backup (its description names a pid that is gone) is removed, a foreign one kept;
    the next backup is no longer refused; a second cleanup finds nothing."""
    import json
    import subprocess
    import sys

    add_foreign_snapshot(vcsim, "before-upgrade")
    dead = f"snapferry backup in progress (removed when it ends) (pid {2**22 + 7} started 1 " \
           f"on {socket.gethostname()})"
    add_foreign_snapshot(vcsim, f"{SNAPSHOT_PREFIX}20240101T000000Z", description=dead)
    env = {**os.environ, "SNAPFERRY_VSPHERE_PASSWORD": vcsim.password}
    exe = str(Path(sys.executable).parent / "snapferry")

    def cleanup() -> list[str]:
        p = subprocess.run([exe, "cleanup", vcsim.uri(VM0), "--json"], capture_output=True,
                           text=True, env=env, timeout=120)
        assert p.returncode == 0, p.stderr
        return list(json.loads(p.stdout)["actions"])

    actions = cleanup()
    assert any(f"removed snapshot {SNAPSHOT_PREFIX}20240101T000000Z" in a for a in actions), \
        actions
    assert observe_vm(vcsim)["snapshots"] == ["before-upgrade"]
    assert cleanup() == []
    hv, _ = backend(vcsim)
    try:
        hv.inspect()  # refused before the cleanup ("still carries snapferry snapshot")
    finally:
        hv.cleanup()
        hv.close()


def test_cleanup_refuses_a_running_backups_snapshot(vcsim: Vcsim) -> None:
    """The snapshot of a backup still running on this host (its description names a live
    pid with its start time) is not removed."""
    from snapferry.engine.vsphere.backend import holder_text

    name = f"{SNAPSHOT_PREFIX}20240101T000001Z"
    add_foreign_snapshot(vcsim, name, description="snapferry backup in progress "
                                                  "(removed when it ends) " + holder_text())
    hv, _ = backend(vcsim)
    try:
        with pytest.raises(HypervisorError, match="belongs to a running snapferry backup"):
            hv.recover()
    finally:
        hv.close()
    assert observe_vm(vcsim)["snapshots"] == [name]


def test_foreign_snapshot_is_allowed_said_and_kept(vcsim: Vcsim) -> None:
    add_foreign_snapshot(vcsim, "before-upgrade")
    hv, notes = backend(vcsim)
    try:
        hv.inspect()
        assert any("before-upgrade" in n for n in notes.notes)
        hv.snapshot("auto", {})
        names = observe_vm(vcsim)["snapshots"]
        assert names[0] == "before-upgrade"  # type: ignore[index]
        assert names[1].startswith(SNAPSHOT_PREFIX)  # type: ignore[index]
        hv.export("auto", {})
        hv.merge_overlay()
        hv.check_on_base()
    finally:
        hv.cleanup()
        hv.close()
    assert observe_vm(vcsim)["snapshots"] == ["before-upgrade"]


STEPS = ["inspect", "quiesce", "snapshot", "thaw", "export", "merge", "check_on_base"]


@pytest.mark.parametrize("fail_after", STEPS)
def test_cleanup_after_a_failure_at_each_step_leaves_no_snapshot(
    vcsim: Vcsim, fail_after: str
) -> None:
    """The coordinator's contract, driven by hand: a failure after any step, then
    finalize(False) + cleanup() in ``finally``, leaves the VM without our snapshot."""
    hv, _ = backend(vcsim)

    class Boom(Exception):
        pass

    def step(name: str) -> None:
        if name == fail_after:
            raise Boom(name)

    try:
        with pytest.raises(Boom):
            try:
                hv.inspect()
                step("inspect")
                hv.quiesce()
                step("quiesce")
                hv.snapshot("auto", {})
                step("snapshot")
                hv.thaw()
                step("thaw")
                hv.export("auto", {})
                step("export")
                hv.merge_overlay()
                step("merge")
                hv.check_on_base()
                step("check_on_base")
            finally:
                hv.finalize(False)
                hv.cleanup()
        assert observe_vm(vcsim)["snapshots"] == []
        hv.cleanup()  # again: nothing left to do, no error
    finally:
        hv.close()


def test_failing_export_is_cleaned_up(vcsim: Vcsim) -> None:
    """A real failure inside a step: transport=nbd without the NBD URI of the export."""
    hv = VsphereHypervisor.from_uri(vcsim.uri(VM0, transport="nbd"), password=vcsim.password)
    try:
        hv.inspect()
        hv.snapshot("auto", {})
        assert len(observe_vm(vcsim)["snapshots"]) == 1  # type: ignore[arg-type]
        with pytest.raises(UsageError, match="transport=nbd needs"):
            hv.export("auto", {})
    finally:
        hv.cleanup()
        hv.close()
    assert observe_vm(vcsim)["snapshots"] == []


def test_unknown_vm_is_one_clear_error(vcsim: Vcsim) -> None:
    hv, _ = backend(vcsim, "no-such-vm")
    try:
        with pytest.raises(HypervisorError, match="no VM named 'no-such-vm'"):
            hv.inspect()
        hv.cleanup()
    finally:
        hv.close()
