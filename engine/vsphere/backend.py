"""``VsphereHypervisor``: the lifecycle of DESIGN.md section 1 on vCenter/ESXi (pyvmomi).

On vSphere quiesce and snapshot are one call, ``CreateSnapshot_Task(quiesce=True)``
through VMware Tools: ``quiesce()`` only records that the coordinator wants a quiesced
snapshot (after checking that Tools run), ``snapshot()`` does the work and proves it by
the snapshot tree's ``quiesced`` flag (vSphere silently ignores the flag when Tools are
missing), and ``thaw()`` reports what the snapshot reported.

Our snapshot is named ``snapferry-<UTC stamp>``. A VM that still carries one from an
interrupted run is refused by ``inspect()`` (the user must look: a backup may be
running); other snapshots are allowed (CBT works across them) and named in a note.

Changed blocks: the snapshot's disk backings carry the changeId (``<uuid>/<seq>``),
recorded per disk as ``tracking["change_id"]``; the next backup asks
``QueryChangedDiskAreas`` against its own snapshot from that changeId. CBT not yet on,
just enabled, reset (uuid changed), unanswerable (``FileFault``, ``MethodNotFound`` as
the simulator answers) or inconsistent answers all mean a full backup, with the reason.

Reading the disks: ``transport=vddk`` opens ``snapferry.engine.sources.vddk.VddkSource`` on the
snapshot; ``transport=nbd`` opens ``snapferry.engine.sources.nbd.NbdSource`` on the URI the user's
nbdkit (vddk plugin, in front of the snapshot) serves (``VsphereOptions.nbd_uri``, a
template); tests plug a ``source_factory``.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Self

from pyVmomi import vim, vmodl

from snapferry.engine.errors import HypervisorError, QuiesceError, UsageError
from snapferry.engine.hypervisor import BackupMode, DiskPlan, ParentDisk, VmInfo
from snapferry.engine.procs import process_alive, process_start
from snapferry.engine.progress import NullProgress, Progress
from snapferry.engine.source import DiskSource
from snapferry.engine.vsphere.cbt import (
    ChangedAreasInvalid,
    cbt_reset_reason,
    collect_changed_areas,
)
from snapferry.engine.vsphere.connect import (
    VsphereConnection,
    connect,
    find_vm,
    get_password,
    read_properties,
)
from snapferry.engine.vsphere.uri import VsphereTarget, parse_vsphere_uri

SNAPSHOT_PREFIX = "snapferry-"
# the snapshot's description names its holder, so that cleanup can tell a live backup's
# snapshot (refused) from a killed one's (removed)
HOLDER_RE = re.compile(r"\(pid (\d+) started (\S+) on (\S+)\)")


def holder_text() -> str:
    """``(pid N started T on HOST)`` for this process (T: its /proc start time)."""
    return f"(pid {os.getpid()} started {process_start(os.getpid()) or '-'} on " \
           f"{socket.gethostname()})"


def live_holder(description: str | None) -> str | None:
    """The holder named in a snapshot description if it is a live process on this host
    (same pid and start time), else None (dead, another host, or no holder named)."""
    m = HOLDER_RE.search(description or "")
    if m is None or m.group(3) != socket.gethostname():
        return None
    pid, start = int(m.group(1)), m.group(2)
    if not process_alive(pid, None if start == "-" else start):
        return None
    return f"pid {pid} on {m.group(3)}"

# (disk_path, snapshot_moref, vm_moref) -> DiskSource
SourceFactory = Callable[[str, str, str], DiskSource]


@dataclass
class VsphereOptions:
    """Backend settings that are not part of the URI."""

    vddk_libdir: str | None = None
    vddk_transport_modes: str | None = None  # e.g. "hotadd:nbdssl"; None: VDDK's default
    # transport=nbd: URI template of the nbdkit export for each disk; may use {disk},
    # {index}, {file}, {snapshot}, {vm}: e.g. "nbd+unix:///?socket=/run/nbdkit-{disk}.sock"
    nbd_uri: str | None = None
    source_factory: SourceFactory | None = None  # overrides both transports (tests)
    enable_cbt: bool = True
    task_timeout: float = 3600.0
    connect_timeout: float = 60.0
    progress: Progress = field(default_factory=NullProgress)


@dataclass(frozen=True)
class VsphereDisk:
    name: str  # stable, file-name safe: <controller><bus>-<unit>, e.g. scsi0-0
    key: int  # deviceKey
    file: str  # backing fileName, "[datastore] dir/vm.vmdk"
    capacity: int
    change_id: str | None = None


class _TaskFailed(Exception):
    def __init__(self, fault: Any) -> None:
        self.fault = fault
        super().__init__(fault_text(fault))


def fault_text(fault: Any) -> str:
    """One line for a vmodl.MethodFault (its msg, else its type name)."""
    if fault is None:
        return "unknown error"
    msg = getattr(fault, "msg", None) or getattr(fault, "localizedMessage", None)
    name = type(fault).__name__.rsplit(".", 1)[-1]
    if msg:
        return f"{msg} ({name})" if name not in msg else str(msg)
    return name


def _controller_prefix(ctrl: Any) -> str:
    for cls, prefix in (
        (vim.vm.device.VirtualSCSIController, "scsi"),
        (vim.vm.device.VirtualSATAController, "sata"),
        (vim.vm.device.VirtualIDEController, "ide"),
        (vim.vm.device.VirtualNVMEController, "nvme"),
    ):
        if isinstance(ctrl, cls):
            return prefix
    return "ctrl"


def disks_of(devices: list[Any], note: Callable[[str], None] | None = None) -> list[VsphereDisk]:
    """The snapshot-able virtual disks among ``config.hardware.device``."""
    by_key = {d.key: d for d in devices}
    out: list[VsphereDisk] = []
    for dev in devices:
        if not isinstance(dev, vim.vm.device.VirtualDisk):
            continue
        ctrl = by_key.get(dev.controllerKey)
        if ctrl is not None and dev.unitNumber is not None:
            name = f"{_controller_prefix(ctrl)}{ctrl.busNumber}-{dev.unitNumber}"
        else:
            name = f"disk{dev.key}"
        backing = dev.backing
        mode = getattr(backing, "diskMode", None) or ""
        if mode.startswith("independent"):
            if note:
                note(f"disk {name} is {mode}: snapshots exclude it, so it is not backed up")
            continue
        if getattr(backing, "compatibilityMode", None) == "physicalMode":
            if note:
                note(f"disk {name} is a physical-mode RDM: it cannot be snapshotted, skipped")
            continue
        capacity = dev.capacityInBytes or (dev.capacityInKB or 0) * 1024
        out.append(
            VsphereDisk(
                name=name,
                key=int(dev.key),
                file=str(getattr(backing, "fileName", "") or ""),
                capacity=int(capacity),
                change_id=getattr(backing, "changeId", None) or None,
            )
        )
    return out


def walk_snapshots(nodes: list[Any] | None) -> Iterator[Any]:
    """Every node of a ``VirtualMachineSnapshotTree`` list, depth first."""
    for node in nodes or []:
        yield node
        yield from walk_snapshots(node.childSnapshotList)


class VsphereHypervisor:
    """One VM on vCenter/ESXi through its lifecycle (implements ``Hypervisor``)."""

    def __init__(
        self,
        target: VsphereTarget,
        *,
        password: str | None = None,
        options: VsphereOptions | None = None,
    ) -> None:
        self.target = target
        self.options = options or VsphereOptions()
        self._password = password
        self._conn: VsphereConnection | None = None
        self._vm: Any = None
        self._disks: list[VsphereDisk] = []
        self._cbt_enabled = False
        self._cbt_just_enabled = False
        self._reset_attempt()

    @classmethod
    def from_uri(
        cls, uri: str, *, password: str | None = None, options: VsphereOptions | None = None
    ) -> Self:
        return cls(parse_vsphere_uri(uri), password=password, options=options)

    def _reset_attempt(self) -> None:
        self._quiesce = False
        self._snap_name: str | None = None
        self._snap: Any = None
        self._snap_quiesced = False
        self._snap_disks: list[VsphereDisk] = []
        self._sources: list[DiskSource] = []

    # -- plumbing ---------------------------------------------------------------------

    @property
    def _note(self) -> Callable[[str], None]:
        return self.options.progress.note

    @property
    def vm(self) -> Any:
        if self._vm is None:
            raise HypervisorError("vSphere backend: inspect() has not found the VM yet")
        return self._vm

    @property
    def vm_moref(self) -> str:
        return str(self.vm._moId)

    @property
    def disks(self) -> list[VsphereDisk]:
        """The disks backed up: as in the snapshot once taken, else as found by inspect()."""
        return list(self._snap_disks or self._disks)

    @property
    def snapshot_moref(self) -> str | None:
        return None if self._snap is None else str(self._snap._moId)

    def _connect(self) -> None:
        if self._conn is not None:
            return
        password = self._password
        if password is None:
            password = get_password(self.target)
            self._password = password
        self._conn = connect(
            self.target,
            password,
            timeout=self.options.connect_timeout,
            progress=self.options.progress,
        )
        try:
            self._vm = find_vm(self._conn, self.target)
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    def _wait(self, task: Any, what: str) -> Any:
        """Wait for a vSphere task; returns its result, raises ``_TaskFailed``.

        Reads only info.state/result/error through the property collector (fewer bytes,
        and vCSim fills info.entity with a snapshot, which pyVmomi refuses to decode)."""
        conn = self._conn
        if conn is None:
            raise HypervisorError("vSphere backend: not connected")
        deadline = time.monotonic() + self.options.task_timeout
        delay = 0.05
        while True:
            info = read_properties(conn, task, ["info.state", "info.result", "info.error"])
            state = info["info.state"]
            if state == vim.TaskInfo.State.success:
                return info["info.result"]
            if state == vim.TaskInfo.State.error:
                raise _TaskFailed(info["info.error"])
            if time.monotonic() > deadline:
                try:
                    task.CancelTask()
                except Exception:
                    pass
                raise HypervisorError(
                    f"{what} did not finish within {self.options.task_timeout:.0f} s "
                    f"(task {task._moId})"
                )
            time.sleep(delay)
            delay = min(1.0, delay * 2)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a task-starting call and wait; every failure becomes a HypervisorError."""
        try:
            return self._wait(fn(), what)
        except _TaskFailed as e:
            raise HypervisorError(f"{what} failed: {e}") from None
        except vmodl.MethodFault as e:
            raise HypervisorError(f"{what} failed: {fault_text(e)}") from None

    def _snapshot_nodes(self) -> list[Any]:
        conn = self._conn
        if conn is None:
            raise HypervisorError("vSphere backend: not connected")
        roots = read_properties(conn, self.vm, ["snapshot.rootSnapshotList"])
        return list(walk_snapshots(roots["snapshot.rootSnapshotList"]))

    # -- lifecycle ------------------------------------------------------------------------

    def inspect(self) -> VmInfo:
        self._connect()
        vm = self.vm
        config = vm.config
        if config is None:
            raise HypervisorError(f"VM {self.target.vm}: no configuration (is it inaccessible?)")
        if config.template:
            raise HypervisorError(f"{config.name} is a template: templates cannot be snapshotted")
        leftovers = [n for n in self._snapshot_nodes() if n.name.startswith(SNAPSHOT_PREFIX)]
        if leftovers:
            ids = ", ".join(f"{n.name} ({n.snapshot._moId})" for n in leftovers)
            raise HypervisorError(
                f"VM {config.name} still carries snapferry snapshot(s) {ids} from an earlier "
                "run: `snapferry cleanup` the VM (it refuses while that backup runs), then retry"
            )
        foreign = [n.name for n in self._snapshot_nodes()]
        if foreign:
            self._note(
                f"note: VM {config.name} has {len(foreign)} other snapshot(s) "
                f"({', '.join(foreign)}); backing up from a new snapshot on top of them"
            )
        if vm.runtime.consolidationNeeded:
            self._note(f"note: VM {config.name} needs disk consolidation; commit will do it")
        self._disks = disks_of(list(config.hardware.device), self._note)
        if not self._disks:
            raise HypervisorError(f"VM {config.name} has no disk that can be backed up")
        self._setup_cbt(vm, config)
        return VmInfo(
            name=str(config.name),
            disks=[d.name for d in self._disks],
            meta={
                "hypervisor": "vsphere",
                "server": self.target.display(),
                "vm_moref": self.vm_moref,
                "instance_uuid": config.instanceUuid,
                "cbt": self._cbt_enabled,
                "cbt_just_enabled": self._cbt_just_enabled,
                "disk_files": {d.name: d.file for d in self._disks},
            },
        )

    def _setup_cbt(self, vm: Any, config: Any) -> None:
        if config.changeTrackingEnabled:
            self._cbt_enabled = True
            return
        supported = getattr(vm.capability, "changeTrackingSupported", None)
        if supported is False:
            self._note(
                f"warning: VM {config.name} does not support changed block tracking "
                "(virtual hardware < 7?): every backup is a full one"
            )
            return
        if not self.options.enable_cbt:
            self._note(f"warning: CBT is off on VM {config.name}: every backup is a full one")
            return
        self._call(
            f"enabling changed block tracking on {config.name}",
            lambda: vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)),
        )
        if not vm.config.changeTrackingEnabled:
            raise HypervisorError(f"enabling CBT on {config.name} did not take effect")
        self._cbt_enabled = True
        self._cbt_just_enabled = True
        self._note(
            f"enabled changed block tracking on VM {config.name}: this first backup is full, "
            "later ones are incremental"
        )

    def quiesce(self) -> int:
        vm = self.vm
        guest = vm.guest
        running = getattr(guest, "toolsRunningStatus", None) if guest is not None else None
        if running is not None and running != "guestToolsRunning":
            raise QuiesceError(
                f"VMware Tools are not running in {vm.name} ({running}): the guest cannot be "
                "quiesced"
            )
        self._quiesce = True
        return 1  # one quiesced snapshot asked for; thaw() says whether it was quiesced

    def snapshot(self, mode: BackupMode, parents: dict[str, ParentDisk]) -> None:
        vm = self.vm
        if self._snap is not None:
            raise HypervisorError("vSphere backend: a snapshot is already held")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{SNAPSHOT_PREFIX}{stamp}"
        self._snap_name = name  # known before the call: cleanup finds it even if we die
        try:
            snap = self._wait(
                vm.CreateSnapshot_Task(
                    name=name,
                    description="snapferry backup in progress (removed when it ends) "
                                + holder_text(),
                    memory=False,
                    quiesce=self._quiesce,
                ),
                "snapshot",
            )
        except _TaskFailed as e:
            quiesce_faults = (vim.fault.ApplicationQuiesceFault, vim.fault.FilesystemQuiesceFault)
            if isinstance(e.fault, quiesce_faults):
                raise QuiesceError(f"quiescing {vm.name} failed: {e}") from None
            raise HypervisorError(f"creating the snapshot of {vm.name} failed: {e}") from None
        except vmodl.MethodFault as e:
            raise HypervisorError(
                f"creating the snapshot of {vm.name} failed: {fault_text(e)}"
            ) from None
        if snap is None:
            raise HypervisorError(f"creating the snapshot of {vm.name} returned no snapshot")
        self._snap = snap
        node = next((n for n in self._snapshot_nodes() if n.snapshot._moId == snap._moId), None)
        if node is None:
            raise HypervisorError(f"snapshot {snap._moId} is missing from {vm.name}'s tree")
        self._snap_quiesced = bool(node.quiesced)
        if self._quiesce and not self._snap_quiesced:
            raise QuiesceError(
                f"vSphere made the snapshot of {vm.name} without quiescing the guest "
                "(VMware Tools missing or unable to quiesce)"
            )
        self._snap_disks = disks_of(list(snap.config.hardware.device))
        known = {d.name for d in self._disks}
        self._snap_disks = [d for d in self._snap_disks if d.name in known]

    def thaw(self) -> int:
        return 1 if self._snap_quiesced else 0

    def export(self, mode: BackupMode, parents: dict[str, ParentDisk]) -> list[DiskPlan]:
        if self._snap is None:
            raise HypervisorError("vSphere backend: export() before snapshot()")
        plans: list[DiskPlan] = []
        for index, disk in enumerate(self._snap_disks):
            changed, reason = self._changed(disk, mode, parents.get(disk.name))
            source = self._open_source(disk, index)
            plans.append(
                DiskPlan(
                    name=disk.name,
                    source=source,
                    changed=changed,
                    tracking={
                        "change_id": disk.change_id,
                        "device_key": disk.key,
                        "file": disk.file,
                    },
                    full_reason=reason,
                    meta={
                        "vm_moref": self.vm_moref,
                        "snapshot_moref": self.snapshot_moref,
                        "capacity": disk.capacity,
                        "transport": "custom"
                        if self.options.source_factory
                        else self.target.transport,
                    },
                )
            )
        return plans

    def _changed(
        self, disk: VsphereDisk, mode: BackupMode, parent: ParentDisk | None
    ) -> tuple[list[tuple[int, int]] | None, str | None]:
        """(changed areas, None) for an incremental, else (None, why full)."""
        if mode == "full":
            return None, None
        if parent is None:
            return None, "no earlier restore point of this disk"
        if self._cbt_just_enabled:
            return None, "changed block tracking was just enabled on this VM"
        if not self._cbt_enabled:
            return None, "changed block tracking is off on this VM"
        if parent.virtual_size != disk.capacity:
            return None, (
                f"the disk's size changed ({parent.virtual_size} -> {disk.capacity} bytes)"
            )
        parent_change_id = parent.tracking.get("change_id")
        reason = cbt_reset_reason(parent_change_id, disk.change_id)
        if reason is not None:
            return None, reason
        snap = self._snap

        def page(start: int) -> Any:
            return self.vm.QueryChangedDiskAreas(
                snapshot=snap, deviceKey=disk.key, startOffset=start, changeId=parent_change_id
            )

        try:
            return collect_changed_areas(page, disk.capacity), None
        except vim.fault.FileFault as e:
            return None, f"vSphere cannot answer the changed areas (CBT reset?): {fault_text(e)}"
        except vmodl.fault.MethodNotFound:
            return None, "this vSphere server does not implement QueryChangedDiskAreas"
        except vmodl.MethodFault as e:
            return None, f"QueryChangedDiskAreas failed: {fault_text(e)}"
        except ChangedAreasInvalid as e:
            return None, f"changed areas from vSphere are inconsistent: {e}"

    def _open_source(self, disk: VsphereDisk, index: int) -> DiskSource:
        snap_moref = self.snapshot_moref or ""
        if self.options.source_factory is not None:
            source = self.options.source_factory(disk.file, snap_moref, self.vm_moref)
        elif self.target.transport == "nbd":
            source = self._open_nbd(disk, index, snap_moref)
        else:
            source = self._open_vddk(disk, snap_moref)
        self._sources.append(source)
        return source

    def _open_nbd(self, disk: VsphereDisk, index: int, snap_moref: str) -> DiskSource:
        template = self.options.nbd_uri
        if not template:
            raise UsageError(
                "transport=nbd needs the NBD URI of the nbdkit vddk export for each disk "
                "(--nbd-uri TEMPLATE, may use {disk} {index} {file} {snapshot} {vm})"
            )
        try:
            uri = template.format(
                disk=disk.name, index=index, file=disk.file, snapshot=snap_moref, vm=self.vm_moref
            )
        except (KeyError, IndexError, ValueError) as e:
            raise UsageError(f"bad NBD URI template {template!r}: {e}") from None
        from snapferry.engine.sources.nbd import NbdSource

        source: DiskSource = NbdSource.open(uri)
        if source.size != disk.capacity:
            source.close()
            raise HypervisorError(
                f"disk {disk.name}: {uri} serves {source.size} bytes but the disk has "
                f"{disk.capacity}: is nbdkit in front of the right disk and snapshot?"
            )
        return source

    def _open_vddk(self, disk: VsphereDisk, snap_moref: str) -> DiskSource:
        try:
            from snapferry.engine.sources.vddk import VddkConnectParams, VddkSource
        except ImportError as e:
            raise HypervisorError(f"the VDDK source is not available: {e}") from None
        conn = self._conn
        assert conn is not None
        extra: dict[str, Any] = {}
        if self.options.vddk_libdir:
            extra["libdir"] = self.options.vddk_libdir
        if self.options.vddk_transport_modes:
            extra["transport_modes"] = self.options.vddk_transport_modes
        params = VddkConnectParams(
            server=self.target.host,
            thumbprint=conn.vddk_thumbprint() or None,
            user=self.target.user,
            password=self._password or "",
            vm_moref=self.vm_moref,
            snapshot_moref=snap_moref,
            port=self.target.port,
            **extra,
        )
        source: DiskSource = VddkSource.open(params, disk.file)
        return source

    def merge_overlay(self) -> None:
        snap = self._snap
        if snap is None:
            raise HypervisorError("vSphere backend: merge_overlay() without a snapshot")
        self._close_sources()
        self._call(
            f"removing snapshot {self._snap_name}",
            lambda: snap.RemoveSnapshot_Task(removeChildren=False, consolidate=True),
        )
        self._snap = None
        self._consolidate_if_needed()

    def _consolidate_if_needed(self) -> None:
        vm = self.vm
        if vm.runtime.consolidationNeeded:
            self._note(f"consolidating the disks of {vm.name}")
            self._call(f"consolidating the disks of {vm.name}", vm.ConsolidateVMDisks_Task)

    def check_on_base(self) -> None:
        vm = self.vm
        ours = [n for n in self._snapshot_nodes() if n.name.startswith(SNAPSHOT_PREFIX)]
        if ours:
            raise HypervisorError(
                f"snapshot {ours[0].name} is still on {vm.name} after the commit"
            )
        if vm.runtime.consolidationNeeded:
            raise HypervisorError(f"{vm.name} still needs disk consolidation after the commit")

    def finalize(self, success: bool) -> None:
        """Nothing to keep on vSphere: the changeIds live in the manifest, so a failed
        backup leaves the parent's changeId as the next starting point."""

    def _close_sources(self) -> None:
        sources, self._sources = self._sources, []
        for s in sources:
            try:
                s.close()
            except Exception:
                pass

    def cleanup(self) -> None:
        """Remove our snapshot if it still exists and consolidate; safe to call twice."""
        self._close_sources()
        self._quiesce = False
        errors: list[str] = []
        if self._vm is not None and (self._snap_name is not None or self._snap is not None):
            try:
                self._remove_ours(errors)
            except HypervisorError as e:
                errors.append(str(e))
            except vmodl.MethodFault as e:
                errors.append(fault_text(e))
            except OSError as e:  # connection lost: keep the state so a retry finds it
                errors.append(f"connection lost: {e}")
        if errors:
            raise HypervisorError(
                f"could not remove the backup snapshot of {self.target.vm}: {'; '.join(errors)}"
            )
        self._reset_attempt()

    def _remove_ours(self, errors: list[str]) -> None:
        ours = [
            n.snapshot
            for n in self._snapshot_nodes()
            if n.name == self._snap_name
            or (self._snap is not None and n.snapshot._moId == self._snap._moId)
        ]
        for snap in ours:
            remove: Callable[[], Any] = partial(
                snap.RemoveSnapshot_Task, removeChildren=False, consolidate=True
            )
            try:
                self._call(f"removing snapshot {snap._moId}", remove)
            except HypervisorError as e:
                errors.append(str(e))
        if not errors:
            self._snap = None
        self._consolidate_if_needed()

    def recover(self) -> list[str]:
        """``snapferry cleanup VM``: remove the ``snapferry-*`` snapshots a killed backup
        left (the ones ``inspect`` refuses to run beside) and consolidate the disks.
        A snapshot whose description names a live snapferry process on this host is a
        running backup's: refused. Other snapshots are never touched. vSphere keeps no
        other state of ours (the changeIds live in the manifests)."""
        self._connect()
        vm = self.vm
        done: list[str] = []
        ours = [n for n in self._snapshot_nodes() if n.name.startswith(SNAPSHOT_PREFIX)]
        for n in ours:
            holder = live_holder(getattr(n, "description", None))
            if holder is not None:
                raise HypervisorError(
                    f"snapshot {n.name} of {vm.name} belongs to a running snapferry backup "
                    f"({holder}): not removed")
        for n in ours:
            snap = n.snapshot
            self._call(f"removing snapshot {n.name} ({snap._moId})",
                       partial(snap.RemoveSnapshot_Task, removeChildren=False,
                               consolidate=True))
            done.append(f"removed snapshot {n.name} ({snap._moId}) left by an interrupted "
                        "backup")
        if vm.runtime.consolidationNeeded:
            self._consolidate_if_needed()
            done.append(f"consolidated the disks of {vm.name}")
        return done

    def close(self) -> None:
        self._close_sources()
        conn, self._conn = self._conn, None
        self._vm = None
        if conn is not None:
            conn.close()
