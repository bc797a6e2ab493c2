"""The ``Hypervisor`` seam: one class per backend (QEMU, vSphere).

The coordinator (``snapferry.engine.coordinator``) drives these methods in the order of the
lifecycle (DESIGN.md section 1). Backends own no policy: retries, quiesce policy and
the restore point's consistency label are decided by the coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from snapferry.engine.source import DiskSource

BackupMode = Literal["auto", "full", "incremental"]


@dataclass(frozen=True)
class ParentDisk:
    """What the parent restore point recorded for one disk, to chain an incremental."""

    name: str
    virtual_size: int
    tracking: dict[str, Any]  # backend-specific: {"bitmap": ...} or {"change_id": ...}


@dataclass
class DiskPlan:
    """One disk ready to be copied, produced by ``Hypervisor.export``.

    ``changed`` is None for a full backup (the pipeline reads every allocated, non-zero
    extent of ``source``); otherwise the byte ranges changed since the parent's tracking
    point (the pipeline reads them rounded out to chunks and takes the rest from the
    parent's index). ``tracking`` is recorded in the manifest for the next incremental.
    ``full_reason`` says why a full backup is made where an incremental was possible or
    asked for (missing/inconsistent bitmap, CBT reset, size change, ...).
    """

    name: str
    source: DiskSource
    changed: list[tuple[int, int]] | None
    tracking: dict[str, Any] = field(default_factory=dict)
    full_reason: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VmInfo:
    name: str  # name restore points are filed under in the repository
    disks: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


class Hypervisor(Protocol):
    """Lifecycle operations of one VM. Every method may raise ``HypervisorError``."""

    def inspect(self) -> VmInfo:
        """Connect, find the VM and its disks; refuse a VM that is already frozen or
        carries a foreign snapshot/overlay (raise ``HypervisorError``)."""
        ...

    def quiesce(self) -> int:
        """Freeze guest writes and prove the freeze holds. Returns the number of
        filesystems frozen; raises ``QuiesceError`` when not frozen."""
        ...

    def snapshot(self, mode: BackupMode, parents: dict[str, ParentDisk]) -> None:
        """Start recording new writes outside the base disks (all disks at once) and do
        the changed-block bookkeeping for ``mode`` given the parent's disks."""
        ...

    def thaw(self) -> int:
        """Resume guest writes; returns the number of filesystems thawed."""
        ...

    def export(self, mode: BackupMode, parents: dict[str, ParentDisk]) -> list[DiskPlan]:
        """Make the point-in-time disks readable from outside; say what to copy."""
        ...

    def merge_overlay(self) -> None:
        """Merge the writes recorded during the backup (the overlay, the vSphere
        snapshot's delta) back into the base disks. Not the writing of a restore point:
        that is ``BackupSession.commit``."""
        ...

    def check_on_base(self) -> None:
        """Check (it locks nothing) that the VM runs read-write on its base disks again;
        raise ``HypervisorError`` if not."""
        ...

    def finalize(self, success: bool) -> None:
        """Changed-block bookkeeping after the restore point is (or is not) committed:
        on success drop the old tracking state; on failure make sure the next backup
        cannot miss a write (keep the old state or force a full)."""
        ...

    def cleanup(self) -> None:
        """Idempotent: thaw, drop exports, commit or discard overlays/snapshots so the VM
        runs thawed on its base disks. Called in ``finally`` whatever happened."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Recoverable(Protocol):
    """A backend that can clear what an interrupted backup left on a VM from a fresh
    process (``snapferry cleanup VM``)."""

    def recover(self) -> list[str]:
        """Bring the VM back to its base disks, thawed, with nothing of snapferry's left
        attached; return what was found and done, one line each."""
        ...
