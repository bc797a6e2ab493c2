"""``QemuFleecingHypervisor``: the QEMU backend's fleecing strategy (no commit phase).

The classic image-fleecing recipe, which QEMU 7.2 supports without ``blockdev-replace``:

* before the freeze (in ``quiesce``/``snapshot``): per disk an empty qcow2 "fleece"
  image in ``work_dir`` is ``blockdev-add``-ed as node ``sf-fleece-<i>`` with the disk's
  own format node as its backing. Done outside the freeze window.
* snapshot: ONE QMP ``transaction`` over all disks: the fresh persistent bitmap
  ``snapferry-<stamp>`` on the disk node, for an incremental the
  ``block-dirty-bitmap-disable`` of the parent's bitmap (exactly as the overlay path),
  and ``blockdev-backup sync=none`` from the disk node to the fleece node (job
  ``sf-fleece-<i>``). The job puts a copy-before-write filter above the disk: before
  the guest overwrites a cluster, the old data is copied into the fleece image. Reads
  of the fleece node therefore see the point in time: copied clusters from the fleece
  image, untouched ones from the live disk through the backing link.
* export: the fleece node through QEMU's NBD server, read-only, with the parent's
  (disabled) bitmap, which the export finds on the disk node through the backing chain.
* commit: nothing to merge. The guest wrote to its disk all along (and the fresh
  bitmap recorded those writes directly). "Commit" is: drop the export, cancel the
  backup job (which removes its filter), ``blockdev-del`` the fleece node, delete the
  fleece image.
* finalize / bitmap bookkeeping: inherited unchanged, so restore points made with either
  strategy chain into each other's incrementals (same bitmap on the same node).

Everything created carries a recognisable name (``sf-fleece-*`` nodes and jobs,
``*.sf-fleece.qcow2`` files), so ``cleanup()`` (and ``inspect()`` of a later run) also
clears the leftovers of a crashed process.
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from snapferry.engine.errors import HypervisorError, SnapferryError
from snapferry.engine.hypervisor import BackupMode, ParentDisk, VmInfo
from snapferry.engine.qemu.backend import BITMAP_PREFIX, QemuHypervisor, _Disk
from snapferry.engine.qemu.qmp import Event, QmpCommandError, QmpConnectionError

FLEECE_NODE_PREFIX = "sf-fleece-"
FLEECE_JOB_PREFIX = "sf-fleece-"
FLEECE_SUFFIX = ".sf-fleece.qcow2"
STRATEGY = "fleecing"


class QemuFleecingHypervisor(QemuHypervisor):
    """The QEMU backend with the fleecing strategy; same constructor as
    ``QemuHypervisor``. Overrides inspect, quiesce, snapshot, export, merge_overlay,
    check_on_base and cleanup."""

    strategy = STRATEGY

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fleece: dict[str, tuple[str, Path]] = {}  # disk name -> (node, image file)

    # -- leftovers -------------------------------------------------------------------
    def _fleece_jobs(self) -> list[str]:
        return [str(j["device"]) for j in self._qmp.cmd("query-block-jobs")
                if str(j.get("device", "")).startswith(FLEECE_JOB_PREFIX)]

    def _fleece_nodes(self) -> list[str]:
        return [n for n in self._nodes() if n.startswith(FLEECE_NODE_PREFIX)]

    def inspect(self) -> VmInfo:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._qmp.connect()
        self.lock()  # before touching anything: leftovers are ours only under the lock
        if self._fleece_jobs() or self._fleece_nodes():
            self.progress.note("leftover snapferry fleecing job from an interrupted backup: "
                               "stopping it first")
            errs: list[str] = []
            self._cleanup_qemu(errs)
            if errs:
                raise HypervisorError("cannot clear an interrupted backup's leftovers: "
                                      + "; ".join(errs))
        return super().inspect()

    # -- fleece targets (made before the freeze) ---------------------------------------
    def _prepare_targets(self) -> None:
        """Create and attach an empty fleece image per disk (idempotent)."""
        self._ensure_inspected()
        t0 = time.monotonic()
        have = set(self._nodes())
        qemu_img = shutil.which("qemu-img")
        if qemu_img is None:
            raise HypervisorError("qemu-img (qemu-utils) is needed for the fleecing strategy")
        for d in self._disks:
            node = f"{FLEECE_NODE_PREFIX}{d.index}"
            if d.name in self._fleece and node in have:
                continue
            image = self.work_dir / f"{d.name}{FLEECE_SUFFIX}"
            if node in have:
                raise HypervisorError(f"fleece node {node} already exists (another backup?)")
            image.unlink(missing_ok=True)
            proc = subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(image),
                                   str(d.size)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise HypervisorError(f"cannot create fleece image {image}: "
                                      f"{proc.stderr.strip() or proc.returncode}")
            try:
                self._qmp.cmd("blockdev-add", {
                    "driver": "qcow2", "node-name": node, "discard": "unmap",
                    "file": {"driver": "file", "filename": str(image)},
                    "backing": d.node,
                })
            except QmpCommandError as e:
                image.unlink(missing_ok=True)
                raise HypervisorError(f"cannot attach fleece image for disk {d.name}: "
                                      f"{e.desc}") from e
            self._fleece[d.name] = (node, image)
        self.stats["prepare_s"] = self.stats.get("prepare_s", 0.0) + time.monotonic() - t0

    # -- quiesce / snapshot ------------------------------------------------------------
    def quiesce(self) -> int:
        self._prepare_targets()  # keep file creation and blockdev-add out of the freeze
        return super().quiesce()

    def snapshot(self, mode: BackupMode, parents: dict[str, ParentDisk]) -> None:
        self._prepare_targets()  # no-op after quiesce(); needed when quiesce is off
        now = dt.datetime.now(dt.UTC)
        stamp = now.strftime("%Y%m%dT%H%M%S") + f"-{now.microsecond:06d}"
        nodes = self._nodes()
        actions: list[dict[str, Any]] = []
        for d in self._disks:
            bitmaps = {b["name"]: b for b in nodes.get(d.node, {}).get("dirty-bitmaps", [])
                       if "name" in b}
            self._plan_disk(d, mode, parents.get(d.name), bitmaps)
            if d.full_reason and not parents:  # with a parent, the coordinator warns
                self.progress.note(f"warning: {d.full_reason}")
            d.new_bitmap = None if d.raw else BITMAP_PREFIX + stamp
            if d.new_bitmap is not None:  # a raw disk has no bitmap: full backups only
                actions.append({"type": "block-dirty-bitmap-add",
                                "data": {"node": d.node, "name": d.new_bitmap,
                                         "persistent": True}})
            if d.incremental:
                actions.append({"type": "block-dirty-bitmap-disable",
                                "data": {"node": d.node, "name": d.parent_bitmap}})
            actions.append({"type": "blockdev-backup",
                            "data": {"job-id": f"{FLEECE_JOB_PREFIX}{d.index}",
                                     "device": d.node, "target": self._fleece[d.name][0],
                                     "sync": "none", "auto-dismiss": True}})
        self._finalized = False
        try:
            self._qmp.cmd("transaction", {"actions": actions})
        except QmpCommandError as e:
            for d in self._disks:
                d.new_bitmap = None
            raise HypervisorError(f"snapshot (fleecing) failed: {e.desc}") from e
        self._snapshotted = True

    # -- export ------------------------------------------------------------------------
    def _export_node(self, d: _Disk) -> tuple[str, dict[str, Any]]:
        # the fleece node; the parent bitmap is found on d.node via the backing link
        node, image = self._fleece[d.name]
        return node, {"strategy": STRATEGY, "fleece": str(image)}

    # -- merge_overlay (= stop fleecing) / check_on_base ---------------------------------
    def merge_overlay(self) -> None:
        self._remove_exports()
        t0 = time.monotonic()
        errors: list[str] = []
        self._drop_fleecing(errors)
        if errors:
            raise HypervisorError("stopping the fleecing failed: " + "; ".join(errors))
        self._snapshotted = False
        self.stats["commit_s"] = time.monotonic() - t0

    @staticmethod
    def _job_gone(job: str) -> Callable[[Event], bool]:
        def match(ev: Event) -> bool:
            return ev.get("event") in ("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED") \
                and ev.get("data", {}).get("device") == job
        return match

    def _drop_fleecing(self, errors: list[str]) -> None:
        """Cancel our backup jobs (removes their copy-before-write filters), delete the
        fleece nodes and images. Per-item failures go to ``errors``; a lost QMP
        connection propagates."""
        self._qmp.clear_events()
        jobs = self._fleece_jobs()
        for job in jobs:
            try:
                self._qmp.cmd("block-job-cancel", {"device": job, "force": True})
            except QmpCommandError as e:
                if "not found" not in e.desc.lower():
                    errors.append(f"cancelling fleecing job {job}: {e.desc}")
        for job in jobs:
            if job in self._fleece_jobs():
                try:
                    self._qmp.wait_event(self._job_gone(job), timeout=self.commit_timeout)
                except QmpConnectionError:
                    raise
                except SnapferryError as e:
                    errors.append(f"fleecing job {job} did not stop: {e}")
        for node in self._fleece_nodes():
            try:
                self._qmp.cmd("blockdev-del", {"node-name": node})
            except QmpCommandError as e:
                errors.append(f"deleting fleece node {node}: {e.desc}")
        self._fleece = {}
        in_use = {str(n.get("file", "")) for n in self._nodes().values()}
        for f in self.work_dir.glob(f"*{FLEECE_SUFFIX}"):
            if str(f) not in in_use:
                f.unlink(missing_ok=True)

    def check_on_base(self) -> None:
        super().check_on_base()
        left = self._fleece_jobs() + self._fleece_nodes()
        if left:
            raise HypervisorError(f"fleecing still attached to the VM: {', '.join(left)}")

    # -- cleanup -------------------------------------------------------------------------
    def _release_point_in_time(self, errors: list[str]) -> None:
        try:
            self._drop_fleecing(errors)
        except QmpConnectionError:
            raise
        except SnapferryError as e:
            errors.append(f"stopping the fleecing: {e}")
        self._snapshotted = False  # the base nodes were writable all along
