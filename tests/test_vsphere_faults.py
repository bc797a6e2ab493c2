"""What vCSim cannot do, faked at the pyvmomi call boundary, the rest real.

vCSim answers QueryChangedDiskAreas with MethodNotFound, never fails a snapshot with
a quiesce fault, and cannot be made to hand out a failed Task (TaskManager.CreateTask
is not implemented). So these tests run the backend against a real vCSim VM but swap
the VM managed object for ``RecordedVm``: a FAKE, a subclass of pyVmomi's
``vim.VirtualMachine`` bound to the same simulator object, that overrides only
``QueryChangedDiskAreas`` (recorded DiskChangeInfo answers or faults, built from
pyVmomi's own types) or ``CreateSnapshot_Task`` (a ``FakeTask`` ending in a fault, or
the real call with quiesce dropped: what vSphere does when Tools are missing). Every
other call, and every check of the outcome, goes to the simulator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pyVmomi import vim
from test_vsphere_lifecycle import DISK, StandInSource
from vcsimserver import VM0, Vcsim, observe_vm

import snapferry.engine.vsphere.backend as backend_mod
from snapferry.engine.errors import HypervisorError, QuiesceError
from snapferry.engine.hypervisor import ParentDisk
from snapferry.engine.vsphere.backend import VsphereHypervisor, VsphereOptions

Info = vim.VirtualMachine.DiskChangeInfo
Area = vim.VirtualMachine.DiskChangeInfo.DiskChangeExtent

pytest_plugins = ["vcsimserver"]  # the vcsim / vcsim_tls fixtures


class FakeTask:
    """FAKE Task that has already ended with ``error`` (see the module doc)."""

    _moId = "task-fake"

    def __init__(self, error: Any) -> None:
        self.error = error


def recorded_vm(real: Any, **overrides: Callable[..., Any]) -> Any:
    """FAKE VM: the real managed object's class with some methods replaced."""
    cls = type("RecordedVm", (vim.VirtualMachine,), dict(overrides))
    return cls(real._moId, real._stub)


@pytest.fixture
def fake_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the backend read FakeTask state; real tasks still go to the simulator."""
    real = backend_mod.read_properties

    def read(conn: Any, obj: Any, paths: list[str]) -> dict[str, Any]:
        if isinstance(obj, FakeTask):
            return {
                "info.state": vim.TaskInfo.State.error,
                "info.result": None,
                "info.error": obj.error,
            }
        return real(conn, obj, paths)

    monkeypatch.setattr(backend_mod, "read_properties", read)


def cbt_backend(sim: Vcsim) -> VsphereHypervisor:
    """A backend on VM0 with CBT already on (enabled by an earlier run)."""
    first = VsphereHypervisor.from_uri(sim.uri(VM0), password=sim.password)
    first.inspect()
    first.close()
    hv = VsphereHypervisor.from_uri(
        sim.uri(VM0),
        password=sim.password,
        options=VsphereOptions(source_factory=StandInSource),
    )
    hv.inspect()
    return hv


@pytest.fixture
def snapped(vcsim: Vcsim) -> Iterator[VsphereHypervisor]:
    hv = cbt_backend(vcsim)
    try:
        hv.snapshot("incremental", {})
        yield hv
    finally:
        hv.cleanup()
        hv.close()
    assert observe_vm(vcsim)["snapshots"] == []


def parent_of(hv: VsphereHypervisor) -> dict[str, ParentDisk]:
    (disk,) = hv.disks
    assert disk.change_id is not None
    uuid = disk.change_id.rsplit("/", 1)[0]
    return {DISK: ParentDisk(DISK, disk.capacity, {"change_id": f"{uuid}/3"})}


def with_pages(hv: VsphereHypervisor, pages: Callable[[int, int], Any]) -> list[dict[str, Any]]:
    """Swap in a RecordedVm answering QueryChangedDiskAreas from ``pages(start, cap)``."""
    calls: list[dict[str, Any]] = []
    capacity = hv.disks[0].capacity

    def query(self: Any, **kw: Any) -> Any:
        calls.append(kw)
        return pages(kw["startOffset"], capacity)

    hv._vm = recorded_vm(hv.vm, QueryChangedDiskAreas=query)
    return calls


def test_paged_answers_become_the_changed_list(snapped: VsphereHypervisor) -> None:
    hv = snapped
    cap = hv.disks[0].capacity
    assert cap >= 1 << 20  # the simulator's 1 MiB disk holds three pages of 64 KiB+
    third = cap // 3 // 4096 * 4096

    def pages(start: int, capacity: int) -> Any:
        if start == 0:
            return Info(startOffset=0, length=third,
                        changedArea=[Area(start=0, length=4096), Area(start=8192, length=4096)])
        if start == third:
            return Info(startOffset=third, length=third,
                        changedArea=[Area(start=third, length=65536)])
        return Info(startOffset=start, length=capacity - start,
                    changedArea=[Area(start=capacity - 4096, length=4096)])

    calls = with_pages(hv, pages)
    parents = parent_of(hv)
    (plan,) = hv.export("incremental", parents)
    assert plan.full_reason is None
    assert plan.changed == [(0, 4096), (8192, 4096), (third, 65536), (cap - 4096, 4096)]
    assert [c["startOffset"] for c in calls] == [0, third, 2 * third]
    first = calls[0]
    assert first["changeId"] == parents[DISK].tracking["change_id"]
    assert first["deviceKey"] == hv.disks[0].key
    assert first["snapshot"]._moId == hv.snapshot_moref


@pytest.mark.parametrize(
    ("pages", "needle"),
    [
        (lambda s, cap: Info(startOffset=s, length=0), "does not advance"),
        (lambda s, cap: Info(startOffset=0, length=cap,
                             changedArea=[Area(start=cap - 4096, length=8192)]),
         "past the disk's capacity"),
        (lambda s, cap: Info(startOffset=0, length=cap, changedArea=[
            Area(start=0, length=8192), Area(start=4096, length=8192)]),
         "overlaps"),
    ],
    ids=["no-progress", "past-capacity", "overlap"],
)
def test_inconsistent_answers_mean_full_with_reason(
    snapped: VsphereHypervisor, pages: Callable[[int, int], Any], needle: str
) -> None:
    with_pages(snapped, pages)
    (plan,) = snapped.export("incremental", parent_of(snapped))
    assert plan.changed is None
    assert plan.full_reason is not None
    assert "inconsistent" in plan.full_reason and needle in plan.full_reason


def test_file_fault_means_cbt_reset_full(snapped: VsphereHypervisor) -> None:
    def pages(start: int, capacity: int) -> Any:
        raise vim.fault.FileFault(msg="Error caused by file /vmfs/volumes/ds/vm/disk1.vmdk")

    with_pages(snapped, pages)
    (plan,) = snapped.export("incremental", parent_of(snapped))
    assert plan.changed is None
    assert "CBT reset" in (plan.full_reason or "") and "disk1.vmdk" in (plan.full_reason or "")


@pytest.mark.usefixtures("fake_tasks")
@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (vim.fault.ApplicationQuiesceFault(msg="VSS writer failed"), QuiesceError),
        (vim.fault.FilesystemQuiesceFault(msg="fsfreeze timed out"), QuiesceError),
        (vim.fault.InvalidState(msg="VM is busy"), HypervisorError),
    ],
    ids=["application", "filesystem", "other"],
)
def test_snapshot_task_faults(vcsim: Vcsim, fault: Any, expected: type[Exception]) -> None:
    hv = cbt_backend(vcsim)
    try:
        hv._vm = recorded_vm(hv.vm, CreateSnapshot_Task=lambda self, **kw: FakeTask(fault))
        hv.quiesce()
        with pytest.raises(expected) as info:
            hv.snapshot("auto", {})
        assert fault.msg in str(info.value)
        if expected is HypervisorError:
            assert not isinstance(info.value, QuiesceError)
    finally:
        hv.cleanup()
        hv.close()
    assert observe_vm(vcsim)["snapshots"] == []


def test_tools_missing_silently_unquiesced_is_a_quiesce_error(vcsim: Vcsim) -> None:
    hv = cbt_backend(vcsim)
    real = hv.vm

    def create(self: Any, **kw: Any) -> Any:
        # what vSphere does when Tools cannot quiesce: the flag is ignored, no fault
        return real.CreateSnapshot_Task(**dict(kw, quiesce=False))

    try:
        hv._vm = recorded_vm(real, CreateSnapshot_Task=create)
        assert hv.quiesce() == 1
        with pytest.raises(QuiesceError, match="without quiescing"):
            hv.snapshot("auto", {})
        assert observe_vm(vcsim)["quiesced"] == [False]  # the snapshot exists, unquiesced
    finally:
        hv.cleanup()
        hv.close()
    assert observe_vm(vcsim)["snapshots"] == []
