"""Instant boot of the lab VM from a restore point, and live restore onto local disks.

    repository (read-only) --> nbdkit export per disk (lab_dir/nbd-<i>.sock)
         ^ restarted by this process if it dies; QEMU reconnects (reconnect-delay)
    lab_dir/disk<i>.qcow2: a local qcow2 overlay whose backing file is the NBD export
         (json:{raw over nbd}); every guest write lands in the overlay
    QEMU (the lab VM: kernel + initramfs + qemu-ga) boots on the overlays

Live restore (``live_restore``), per disk, all disks at once::

    blockdev-add sf-lr<i> (new local qcow2 TARGET/disk<i>.qcow2)
    blockdev-mirror lab-disk<i> -> sf-lr<i>, sync=full   (overlay + backing = whole disk;
         guest writes during the copy are mirrored too)
    READY -> block-job-complete: the device switches onto sf-lr<i> (no pause)
    blockdev-del lab-disk<i>, lab-file<i>: the overlay and its NBD backing are closed
    the export stops; the VM runs on local disks only

Failure and interruption (the VM's state is always one of these, and said so):

- an nbdkit export dies: it is restarted on the same socket at once; QEMU's NBD client
  waits up to ``RECONNECT_DELAY`` s for it, so guest reads and the copy carry on;
- the copy fails (QEMU reports a job error): the job is dismissed, the half-written
  target is deleted, the VM keeps running on its overlays over the exports;
- this process is interrupted (SIGINT/SIGTERM) during the copy: the jobs are
  cancelled, targets deleted, then the VM is shut down (QMP ``quit``, its writes kept
  in the overlays) and the exports stop; running ``instant`` again on the same lab dir
  resumes from those overlays;
- this process is killed (SIGKILL): nbdkit exits with it (``--exit-with-parent``);
  the VM's reads of blocks not in the overlay then fail after ``RECONNECT_DELAY`` s,
  until ``snapferry serve BACKUP --disk NAME --socket lab_dir/nbd-<i>.sock`` serves
  them again (QEMU reconnects by itself).

The repository is only ever read.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapferry.engine.errors import SnapferryError, UsageError
from snapferry.engine.qemu.qmp import Qmp, QmpCommandError
from snapferry.engine.serve.server import ExportOptions, NbdkitExport
from snapferry.lab import vm as lab

RECONNECT_DELAY = 30
STATE_FILE = "instant.json"
JOB_PREFIX = "sf-lr"


class InstantError(SnapferryError):
    """Instant boot or live restore failed."""


@dataclass
class InstantDisk:
    name: str
    index: int
    size: int
    socket: Path
    overlay: Path
    export: NbdkitExport
    restarts: int = 0
    target: Path | None = None
    on_local: bool = False


@dataclass
class LiveRestoreResult:
    targets: list[str]
    seconds: float
    bytes_copied: int
    export_restarts: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"targets": self.targets, "seconds": round(self.seconds, 3),
                "bytes_copied": self.bytes_copied, "export_restarts": self.export_restarts,
                **self.extra}


def _disk_order(names: list[str]) -> list[str]:
    """``disk0, disk1, ...`` by number (the lab's device order), others as listed."""
    def key(n: str) -> tuple[int, int | str]:
        m = re.fullmatch(r"disk(\d+)", n)
        return (0, int(m.group(1))) if m else (1, names.index(n))

    return sorted(names, key=key)


def _backing_json(sock: Path) -> str:
    spec = {"driver": "raw", "file": {"driver": "nbd",
                                      "server": {"type": "unix", "path": str(sock)},
                                      "reconnect-delay": RECONNECT_DELAY}}
    return "json:" + json.dumps(spec, separators=(",", ":"))


class InstantVm:
    """The lab VM booted from restore point ``backup_id`` (see the module docstring)."""

    def __init__(self, repo: Path, backup_id: str, lab_dir: Path,
                 say: Callable[[str], None] = lambda m: None) -> None:
        from snapferry.engine.store.repo import Repository

        self.say = say
        self.lab_dir = lab_dir.absolute()
        self.backup_id = backup_id
        r = Repository.open(repo)
        self.repo = r.path.absolute()
        manifest = r.load_manifest(backup_id)
        names = _disk_order(list(manifest.disk_names))
        if not names:
            raise UsageError(f"restore point {backup_id} holds no disks")
        self.vm_name = manifest.vm
        self.lab_dir.mkdir(parents=True, exist_ok=True)
        if lab._read_pid(self.lab_dir) is not None:
            raise UsageError(f"a VM already runs in {self.lab_dir} (snapferry lab down first)")
        if len(str(self.lab_dir / "nbd-00.sock")) > 100:
            raise UsageError(f"lab dir {self.lab_dir} is too long a path for unix sockets")
        self._check_state()
        self.disks: list[InstantDisk] = []
        for i, name in enumerate(names):
            sock = self.lab_dir / f"nbd-{i}.sock"
            exp = NbdkitExport(ExportOptions(repo=self.repo, backup_id=backup_id, disk=name,
                                             socket=sock))
            self.disks.append(InstantDisk(name, i, exp.size, sock,
                                          self.lab_dir / f"disk{i}.qcow2", exp))
        self.vm: lab.LabVm | None = None
        self.boot_seconds = 0.0

    def _check_state(self) -> None:
        """Overlays left in the lab dir belong to this restore point, or to none."""
        st = self.lab_dir / STATE_FILE
        overlays = list(self.lab_dir.glob("disk*.qcow2"))
        if not overlays:
            return
        try:
            prev = json.loads(st.read_text())
        except (OSError, ValueError):
            prev = {}
        if prev.get("backup_id") != self.backup_id or prev.get("repo") != str(self.repo):
            raise UsageError(
                f"{self.lab_dir} holds disks of another VM or restore point "
                f"({prev.get('backup_id', 'not an instant boot')}); use another --lab-dir"
            )
        if prev.get("local"):
            raise UsageError(f"{self.lab_dir} was already restored to local disks "
                             f"({', '.join(prev['local'])}); boot those instead")

    def _write_state(self, **extra: Any) -> None:
        st = {"backup_id": self.backup_id, "repo": str(self.repo), "vm": self.vm_name,
              "disks": [{"name": d.name, "socket": str(d.socket), "overlay": str(d.overlay),
                         "size": d.size} for d in self.disks], **extra}
        (self.lab_dir / STATE_FILE).write_text(json.dumps(st, indent=2) + "\n")

    # -- boot -------------------------------------------------------------------------
    def boot(self, *, workload: bool = True) -> lab.LabVm:
        t0 = time.monotonic()
        self._reuse_initramfs()
        try:
            for d in self.disks:
                d.export.start()
            for d in self.disks:
                if d.overlay.exists():
                    self.say(f"reusing overlay {d.overlay} (the guest's earlier writes)")
                    continue
                r = subprocess.run(
                    ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                     "-b", _backing_json(d.socket), str(d.overlay), str(d.size)],
                    capture_output=True, text=True)
                if r.returncode != 0:
                    raise InstantError(f"qemu-img create {d.overlay}: {r.stderr.strip()}")
            self._write_state()
            self.vm = lab.lab_up(self.lab_dir, disks=len(self.disks), workload=workload)
        except BaseException:
            self.stop_exports()
            raise
        self.boot_seconds = time.monotonic() - t0
        return self.vm

    def _reuse_initramfs(self) -> None:
        """Copy the lab's cached initramfs (built from host packages, keyed by kernel and
        recipe) into this lab dir so the boot does not build it again."""
        mine = self.lab_dir / "build"
        if mine.is_dir():
            return
        for cached in sorted((lab.default_lab_dir() / "build").glob("initramfs-*.cpio.gz")):
            mine.mkdir(exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copy2(cached, mine / cached.name)

    def info(self) -> dict[str, Any]:
        assert self.vm is not None
        return {"backup_id": self.backup_id, "vm": self.vm_name, "lab_dir": str(self.lab_dir),
                "pid": self.vm.pid, "qmp": self.vm.qmp_socket, "agent": self.vm.agent_socket,
                "control": self.vm.control_socket, "uri": self.vm.uri,
                "boot_seconds": round(self.boot_seconds, 3),
                "disks": [{"name": d.name, "overlay": str(d.overlay), "export": d.export.uri,
                           "nbdkit_pid": d.export.proc.pid if d.export.proc else None,
                           "local": str(d.target) if d.on_local else None}
                          for d in self.disks]}

    # -- supervision ----------------------------------------------------------------------
    def supervise(self) -> None:
        """Restart any export that died (QEMU's NBD client reconnects to it)."""
        for d in self.disks:
            if d.on_local or d.export.proc is None or d.export.alive():
                continue
            code = d.export.proc.returncode
            d.restarts += 1
            self.say(f"export of disk {d.name} died (exit {code}); restarting it on {d.socket}")
            d.export.restart()

    # -- live restore -----------------------------------------------------------------------
    def live_restore(self, target_dir: Path, *, should_stop: Callable[[], bool] = lambda: False,
                     speed: int = 0, timeout: float = 3600.0) -> LiveRestoreResult:
        """Copy every disk into ``target_dir/<disk>.qcow2`` while the VM runs, then switch
        the VM onto the copies (``speed``: bytes/s per disk, 0 = unlimited)."""
        assert self.vm is not None
        target_dir = target_dir.absolute()
        if not target_dir.is_dir():
            raise UsageError(f"live-restore directory {target_dir} does not exist")
        todo = [d for d in self.disks if not d.on_local]
        for d in todo:
            d.target = target_dir / f"{d.name}.qcow2"
            if d.target.exists():
                raise UsageError(f"live-restore target {d.target} exists; not overwriting it")
        q = Qmp(self.vm.control_socket, timeout=30.0)
        t0 = time.monotonic()
        started: list[InstantDisk] = []
        try:
            for d in todo:
                assert d.target is not None
                r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d.target),
                                    str(d.size)], capture_output=True, text=True)
                if r.returncode != 0:
                    raise InstantError(f"qemu-img create {d.target}: {r.stderr.strip()}")
                started.append(d)
                q.cmd("blockdev-add", {"driver": "qcow2", "node-name": f"{JOB_PREFIX}{d.index}",
                                       "file": {"driver": "file", "filename": str(d.target)}})
                q.cmd("blockdev-mirror", {"job-id": f"{JOB_PREFIX}{d.index}",
                                          "device": f"lab-disk{d.index}",
                                          "target": f"{JOB_PREFIX}{d.index}", "sync": "full",
                                          "auto-dismiss": False, "speed": speed})
            copied = self._run_jobs(q, todo, should_stop, t0 + timeout)
            for d in todo:
                self._drop_overlay(q, d)
        except BaseException:
            self._abandon(q, started)
            q.close()
            raise
        q.close()
        for d in todo:
            d.export.stop()
        self._write_state(local=[str(d.target) for d in self.disks])
        return LiveRestoreResult(
            targets=[str(d.target) for d in todo], seconds=time.monotonic() - t0,
            bytes_copied=copied, export_restarts=sum(d.restarts for d in self.disks))

    def _run_jobs(self, q: Qmp, todo: list[InstantDisk], should_stop: Callable[[], bool],
                  deadline: float) -> int:
        completing: set[str] = set()
        done: dict[str, int] = {}
        while len(done) < len(todo):
            if should_stop():
                raise KeyboardInterrupt
            if time.monotonic() > deadline:
                raise InstantError("live restore did not finish in time")
            self.supervise()
            jobs = {j["device"]: j for j in q.cmd("query-block-jobs")}
            for d in todo:
                jid = f"{JOB_PREFIX}{d.index}"
                if jid in done:
                    continue
                j = jobs.get(jid)
                if j is None:
                    raise InstantError(f"live restore of disk {d.name}: the copy job vanished")
                if j.get("status") == "concluded":
                    if j.get("error"):
                        raise InstantError(
                            f"live restore of disk {d.name} failed: {j['error']}")
                    done[jid] = int(j.get("offset", 0))
                    q.cmd("job-dismiss", {"id": jid})
                    d.on_local = True
                elif j.get("ready") and jid not in completing:
                    q.cmd("block-job-complete", {"device": jid})
                    completing.add(jid)
            time.sleep(0.1)
        for d in todo:  # the device now reads and writes the local image
            node = self._device_node(q, d)
            if node != f"{JOB_PREFIX}{d.index}":
                raise InstantError(f"disk {d.name} is on node {node} after the switch")
        return sum(done.values())

    @staticmethod
    def _device_node(q: Qmp, d: InstantDisk) -> str | None:
        for b in q.cmd("query-block"):
            if b.get("qdev", "").endswith(f"disk{d.index}") or \
                    b.get("qdev") == f"/machine/peripheral/disk{d.index}/virtio-backend":
                ins = b.get("inserted") or {}
                return ins.get("node-name")
        return None

    @staticmethod
    def _drop_overlay(q: Qmp, d: InstantDisk) -> None:
        """Close the overlay and its NBD backing (no longer used by the device)."""
        for node in (f"lab-disk{d.index}", f"lab-file{d.index}"):
            with contextlib.suppress(QmpCommandError):
                q.cmd("blockdev-del", {"node-name": node})

    def _abandon(self, q: Qmp, started: list[InstantDisk]) -> None:
        """Cancel unfinished copies, delete their targets; the VM stays on overlays."""
        for d in started:
            if d.on_local:
                continue
            jid = f"{JOB_PREFIX}{d.index}"
            with contextlib.suppress(SnapferryError):
                q.cmd("block-job-cancel", {"device": jid, "force": True})
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    jobs = {j["device"]: j for j in q.cmd("query-block-jobs")}
                except SnapferryError:
                    break
                j = jobs.get(jid)
                if j is None:
                    break
                if j.get("status") == "concluded":
                    with contextlib.suppress(SnapferryError):
                        q.cmd("job-dismiss", {"id": jid})
                    break
                time.sleep(0.1)
            with contextlib.suppress(SnapferryError):
                q.cmd("blockdev-del", {"node-name": jid})
            if d.target is not None:
                d.target.unlink(missing_ok=True)
            d.target = None

    # -- stop ---------------------------------------------------------------------------
    def shutdown_vm(self) -> None:
        """QMP ``quit`` (QEMU flushes the overlays), then reap QEMU."""
        lab.lab_down(self.lab_dir)

    def stop_exports(self) -> None:
        for d in self.disks:
            d.export.stop()
