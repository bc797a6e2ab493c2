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
- this process is killed (SIGKILL) at any moment: the exports do not depend on it
  (nbdkit runs in its own session, not tied to this process, and holds the
  repository's shared lock itself), so the VM and a running copy carry on unharmed.
  ``instant`` again on the same lab dir finds the VM (``instant.json`` names the
  restore point, ``qemu.pid`` is alive) and takes over: it replaces the orphaned
  exports by its own on the same sockets (QEMU reconnects within
  ``RECONNECT_DELAY``), waits for the guest agent if the boot had not finished,
  adopts an unfinished copy job (``--live-restore``; without it the copy is
  cancelled), closes the overlays of disks already switched onto their copies, and
  says what it found.

The repository is only ever read.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapferry.engine import faults
from snapferry.engine.errors import SnapferryError, UsageError
from snapferry.engine.procs import process_alive, process_start
from snapferry.engine.qemu.qmp import Qmp, QmpCommandError
from snapferry.engine.serve.server import ExportOptions, NbdkitExport, drop_stale_locks
from snapferry.lab import vm as lab

RECONNECT_DELAY = 120  # a restart under heavy load can take tens of seconds
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

    def __init__(self, repo: Path | str, backup_id: str, lab_dir: Path,
                 say: Callable[[str], None] = lambda m: None, *,
                 password_file: str | None = None) -> None:
        from snapferry.engine.store.repo import Repository

        self.say = say
        self.lab_dir = lab_dir.absolute()
        self.backup_id = backup_id
        r = Repository.open(repo)
        loc = str(repo)
        self.repo = loc if loc.startswith("s3://") else str(Path(loc).absolute())
        manifest = r.load_manifest(backup_id)
        names = _disk_order(list(manifest.disk_names))
        if not names:
            raise UsageError(f"restore point {backup_id} holds no disks")
        self.vm_name = manifest.vm
        self.lab_dir.mkdir(parents=True, exist_ok=True)
        if len(str(self.lab_dir / "nbd-00.sock")) > 100:
            raise UsageError(f"lab dir {self.lab_dir} is too long a path for unix sockets")
        self.prev: dict[str, Any] = self._read_state()
        self.qemu_pid = lab._read_pid(self.lab_dir)
        self.reattach = self.qemu_pid is not None
        if self.reattach:
            self._check_reattach()
        else:
            self._check_state()
        self.notes: list[str] = []
        self.adopted: dict[int, Path] = {}  # disk index -> target of a running copy job
        self.disks: list[InstantDisk] = []
        for i, name in enumerate(names):
            sock = self.lab_dir / f"nbd-{i}.sock"
            exp = NbdkitExport(ExportOptions(repo=self.repo, backup_id=backup_id, disk=name,
                                             socket=sock, exit_with_parent=False,
                                             password_file=password_file))
            self.disks.append(InstantDisk(name, i, exp.size, sock,
                                          self.lab_dir / f"disk{i}.qcow2", exp))
        self.vm: lab.LabVm | None = None
        self.boot_seconds = 0.0

    def _read_state(self) -> dict[str, Any]:
        try:
            prev = json.loads((self.lab_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return prev if isinstance(prev, dict) else {}

    def _check_reattach(self) -> None:
        """A VM runs in the lab dir: it must be an instant boot of this restore point
        whose ``instant`` process is gone (then this one takes over)."""
        prev = self.prev
        if prev.get("backup_id") != self.backup_id or prev.get("repo") != str(self.repo):
            raise UsageError(f"a VM already runs in {self.lab_dir} (pid {self.qemu_pid}) that "
                             f"is not an instant boot of {self.backup_id} "
                             "(snapferry lab down first, or use another --lab-dir)")
        owner = prev.get("owner_pid")
        if isinstance(owner, int) and owner != os.getpid() and \
                process_alive(owner, prev.get("owner_start")):
            raise UsageError(f"the instant boot in {self.lab_dir} is still run by pid {owner}")
        if prev.get("local"):
            raise UsageError(f"the VM in {self.lab_dir} (pid {self.qemu_pid}) already runs on "
                             f"its local disks ({', '.join(prev['local'])}); nothing to do")

    def _check_state(self) -> None:
        """Overlays left in the lab dir belong to this restore point, or to none."""
        overlays = list(self.lab_dir.glob("disk*.qcow2"))
        if not overlays:
            return
        prev = self.prev
        if prev.get("backup_id") != self.backup_id or prev.get("repo") != str(self.repo):
            raise UsageError(
                f"{self.lab_dir} holds disks of another VM or restore point "
                f"({prev.get('backup_id', 'not an instant boot')}); use another --lab-dir"
            )
        if prev.get("local"):
            raise UsageError(f"{self.lab_dir} was already restored to local disks "
                             f"({', '.join(prev['local'])}); boot those instead")

    def _write_state(self, **extra: Any) -> None:
        """``instant.json``: what a later ``instant`` needs to take this boot over."""
        def disk(d: InstantDisk) -> dict[str, Any]:
            pid = d.export.pid if d.export.alive() else None
            return {"name": d.name, "socket": str(d.socket), "overlay": str(d.overlay),
                    "size": d.size, "nbdkit_pid": pid,
                    "nbdkit_start": process_start(pid) if pid else None,
                    "target": str(d.target) if d.target else None, "local": d.on_local}

        st = {"backup_id": self.backup_id, "repo": str(self.repo), "vm": self.vm_name,
              "owner_pid": os.getpid(), "owner_start": process_start(os.getpid()),
              "disks": [disk(d) for d in self.disks], **extra}
        tmp = self.lab_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(st, indent=2) + "\n")
        tmp.replace(self.lab_dir / STATE_FILE)

    # -- boot -------------------------------------------------------------------------
    def boot(self, *, workload: bool = True) -> lab.LabVm:
        if self.reattach:
            return self._take_over()
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

    def _take_over(self) -> lab.LabVm:
        """Take over the running VM of an earlier ``instant`` that was killed."""
        t0 = time.monotonic()
        assert self.qemu_pid is not None
        self.notes.append(f"found the VM of an earlier instant boot of {self.backup_id} still "
                          f"running (pid {self.qemu_pid}) without its instant process; "
                          "taking it over")
        vm = lab._vm(self.lab_dir, self.qemu_pid, "?")
        q = Qmp(vm.control_socket, timeout=30.0)
        try:
            self._inspect(q)
        finally:
            q.close()
        self._replace_orphan_exports()
        try:
            for d in self.disks:
                if not d.on_local:
                    d.export.start()
            self._write_state()
            lab._wait_agent(vm.agent_socket, vm.pid, lab.BOOT_TIMEOUT)
        except BaseException:
            self.stop_exports()
            raise
        for n in self.notes:
            self.say(n)
        self.vm = vm
        self.boot_seconds = time.monotonic() - t0
        return vm

    def _inspect(self, q: Qmp) -> None:
        """What the earlier run left: copy jobs (adopted or cleaned), switched disks."""
        prev_disks = {x.get("name"): x for x in self.prev.get("disks", [])
                      if isinstance(x, dict)}
        jobs = {j["device"]: j for j in q.cmd("query-block-jobs")}
        for d in self.disks:
            jid = f"{JOB_PREFIX}{d.index}"
            j = jobs.get(jid)
            target = (prev_disks.get(d.name) or {}).get("target")
            if j is None:
                continue
            if j.get("status") == "concluded":
                with contextlib.suppress(QmpCommandError):
                    q.cmd("job-dismiss", {"id": jid})
                if j.get("error"):
                    self.notes.append(f"the earlier copy of disk {d.name} had failed "
                                      f"({j['error']}); its target was removed")
                    with contextlib.suppress(QmpCommandError):
                        q.cmd("blockdev-del", {"node-name": jid})
                    if target:
                        Path(target).unlink(missing_ok=True)
                continue
            if target:
                self.adopted[d.index] = Path(target)
                self.notes.append(f"the copy of disk {d.name} into {target} is still running "
                                  f"in QEMU ({j.get('offset', 0)} of {j.get('len', 0)} bytes"
                                  f"{', ready to switch' if j.get('ready') else ''})")
        for d in self.disks:
            node = self._device_node(q, d)
            if node == f"{JOB_PREFIX}{d.index}":
                d.on_local = True
                for b in q.cmd("query-block"):
                    ins = b.get("inserted") or {}
                    if ins.get("node-name") == node:
                        d.target = Path(ins["file"])
                self._drop_overlay(q, d)
                self.notes.append(f"disk {d.name} already runs on its local copy {d.target}; "
                                  "its overlay was closed")

    def _replace_orphan_exports(self) -> None:
        """Stop the exports the killed run left serving (they kept the VM's disks
        readable meanwhile); this process serves the same sockets next.

        SIGKILL, not SIGTERM: a stopping nbdkit answers the requests in flight with an
        error, which QEMU hands to the guest as a failed write; a dropped connection
        is instead retried by QEMU once it has reconnected to the new export. The
        killed server's lock object is then stale; it is removed here."""
        killed: list[int] = []
        for x in self.prev.get("disks", []):
            pid = x.get("nbdkit_pid") if isinstance(x, dict) else None
            if not isinstance(pid, int) or not process_alive(pid, x.get("nbdkit_start")):
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if not cmdline or not cmdline[0].endswith(b"nbdkit"):
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            killed.append(pid)
            self.notes.append(f"the export of disk {x.get('name')} left by the earlier run "
                              f"(nbdkit pid {pid}) was stopped; serving it again")
        if killed:
            self._drop_stale_locks(killed)

    def _drop_stale_locks(self, pids: list[int]) -> None:
        drop_stale_locks(self.repo, pids)

    def all_local(self) -> bool:
        return all(d.on_local for d in self.disks)

    def finish_local(self) -> None:
        """Every disk already runs on its copy: stop serving, record it."""
        self.stop_exports()
        self._write_state(local=[str(d.target) for d in self.disks])

    def cancel_adopted(self) -> None:
        """Without ``--live-restore``: cancel a copy the earlier run left running."""
        if not self.adopted or self.vm is None:
            return
        q = Qmp(self.vm.control_socket, timeout=30.0)
        try:
            for d in self.disks:
                if d.index in self.adopted:
                    d.target = self.adopted[d.index]
                    self.say(f"cancelled the earlier copy of disk {d.name} into {d.target} "
                             "(give --live-restore DIR to copy again)")
            self._abandon(q, [d for d in self.disks if d.index in self.adopted])
        finally:
            q.close()
        self.adopted.clear()
        self._write_state()

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
                           "nbdkit_pid": d.export.pid,
                           "local": str(d.target) if d.on_local else None}
                          for d in self.disks]}

    # -- supervision ----------------------------------------------------------------------
    def supervise(self) -> None:
        """Restart any export that died (QEMU's NBD client reconnects to it)."""
        for d in self.disks:
            if d.on_local or d.export.proc is None or d.export.alive():
                continue
            d.restarts += 1
            dead = d.export.pid
            self.say(f"export of disk {d.name} (nbdkit pid {dead}) died; restarting "
                     f"it on {d.socket}")
            d.export.restart()
            if dead is not None:
                self._drop_stale_locks([dead])  # a killed nbdkit could not remove its own
            self._write_state()

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
            if d.index in self.adopted:
                d.target = self.adopted[d.index]
                continue
            d.target = target_dir / f"{d.name}.qcow2"
            if d.target.exists():
                raise UsageError(f"live-restore target {d.target} exists; not overwriting it")
        q = Qmp(self.vm.control_socket, timeout=30.0)
        t0 = time.monotonic()
        started: list[InstantDisk] = []
        try:
            for d in todo:
                assert d.target is not None
                if d.index in self.adopted:  # the earlier run's job, still copying
                    started.append(d)
                    q.cmd("block-job-set-speed", {"device": f"{JOB_PREFIX}{d.index}",
                                                  "speed": speed})
                    continue
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
            self._write_state()
            faults.instant_kill("copying")
            copied = self._run_jobs(q, todo, should_stop, t0 + timeout)
            faults.instant_kill("switched")
            for d in todo:
                self._drop_overlay(q, d)
        except BaseException:
            self._abandon(q, started)
            q.close()
            raise
        q.close()
        for d in self.disks:
            d.export.stop()
        self.adopted.clear()
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
