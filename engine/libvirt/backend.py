"""``LibvirtHypervisor``: libvirt domains through libvirt's own backup API (pull mode).

Lifecycle (the coordinator drives it and owns the policy):

* inspect: find the domain and its disks (``<disk device='disk'>`` with a file or block
  source; the disk target, ``vda``, is the name restore points file it under); clear a
  stale backup job of ours left by a killed run; refuse a backup job that is not ours.
* quiesce / thaw: ``virDomainFSFreeze`` / ``virDomainFSThaw`` through libvirt's guest
  agent (libvirt 9.0 has no quiesce flag for ``backupBegin``); the freeze is proven by
  its count of frozen filesystems and, by the coordinator, by the thaw's count.
* snapshot: ``virDomainBackupBegin`` in pull mode with a NEW checkpoint
  ``snapferry-<stamp>`` (a persistent dirty bitmap in each qcow2); each qcow2 disk whose
  parent restore point recorded a checkpoint libvirt still has (same domain, same
  creation time) is backed up ``backupmode='incremental'`` from it, every other disk in
  full. Raw disks cannot carry a checkpoint: always full.
* export: libvirt's QEMU serves every disk over NBD on a unix socket in the per-VM work
  dir (export name = target); the project's ``NbdSource`` reads it; an incremental's
  changed ranges come from ``qemu:dirty-bitmap:backup-<target>``.
* commit: ``abortJob`` (a pull job ends that way), wait until ``backupGetXMLDesc`` says
  ``VIR_ERR_NO_DOMAIN_BACKUP``; libvirt deletes the scratch files itself.
* finalize: success: delete every older ``snapferry-*`` checkpoint (so the qcow2 does not
  pile up bitmaps); failure: delete the new checkpoint (libvirt keeps the parent's bitmap
  recording every write, so the next incremental cannot miss one).

A shut-off domain is read directly: ``qemu-nbd -r`` on each image (a full backup, said
so); its read lock keeps the domain from starting meanwhile.

What libvirt cannot tell (a freeze we issued, a job we began, the checkpoint we made) is
kept in ``work_dir/libvirt-state.json``, so ``cleanup()`` works from a fresh process after
a crash; the job is recognised as ours by its NBD socket (in our work dir).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from snapferry.engine.crash_state import nbd_socket_path, read_state, update_state
from snapferry.engine.errors import HypervisorError, QuiesceError, SnapferryError
from snapferry.engine.hypervisor import BackupMode, DiskPlan, ParentDisk, VmInfo
from snapferry.engine.libvirt.uri import LibvirtTarget
from snapferry.engine.procs import process_alive
from snapferry.engine.progress import NullProgress, Progress
from snapferry.engine.source import DiskSource

CHECKPOINT_PREFIX = "snapferry-"
SCRATCH_SUFFIX = ".scratch"
STATE_FILE = "libvirt-state.json"

SourceOpener = Callable[[str, str | None], DiskSource]


def default_source_opener(uri: str, bitmap: str | None) -> DiskSource:
    from snapferry.engine.sources.nbd import NbdSource

    src: DiskSource = NbdSource.open(uri, bitmap=bitmap)
    return src


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError as e:
        raise HypervisorError(
            "libvirt domains need the libvirt Python binding: pip install 'snapferry[libvirt]' "
            "(or libvirt-python; it builds against libvirt-dev and pkg-config)"
        ) from e
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # no stderr noise
    return libvirt


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


@dataclass
class _Disk:
    name: str  # target dev ("vda")
    fmt: str  # qcow2 | raw | ...
    path: str  # image file (or block device)
    size: int = 0
    incremental: bool = False
    parent_checkpoint: str | None = None
    full_reason: str | None = None
    bitmap: str | None = None  # exported dirty-bitmap for an incremental


def _merge_ranges(ranges: Iterator[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, length in ranges:
        if length <= 0:
            continue
        if out and out[-1][0] + out[-1][1] >= off:
            start = out[-1][0]
            out[-1] = (start, max(out[-1][0] + out[-1][1], off + length) - start)
        else:
            out.append((off, length))
    return out



class LibvirtHypervisor:
    def __init__(
        self,
        target: LibvirtTarget,
        *,
        work_dir: Path | str,
        name: str | None = None,
        progress: Progress | None = None,
        source_opener: SourceOpener | None = None,
        reconnect_timeout: float = 60.0,
        job_timeout: float = 120.0,
    ) -> None:
        self.target = target
        self.work_dir = Path(work_dir)
        self.name = name or target.domain
        self.progress: Progress = progress if progress is not None else NullProgress()
        self._open_source = source_opener or default_source_opener
        self.reconnect_timeout = reconnect_timeout
        self.job_timeout = job_timeout
        self._lv = _libvirt()
        self._conn: Any = None
        self._disks: list[_Disk] = []
        self._offline = False
        self._uuid = ""
        self._sources: list[DiskSource] = []
        self._new_checkpoint: str | None = None
        self._stale_checkpoint: str | None = None  # a killed run's, settled at snapshot()
        self._job = False
        self._finalized = True
        self._freeze_t0: float | None = None
        self.stats: dict[str, float] = {}

    # -- persistent state (survives a crashed process) ---------------------------------
    @property
    def _state_file(self) -> Path:
        return self.work_dir / STATE_FILE

    def _refuse_another_backup(self) -> dict[str, Any]:
        """This domain's crash state, refused while another live snapferry process
        backs the domain up (its pid is in that state)."""
        st = self._state()
        other = int(st.get("pid", 0))
        if other and other != os.getpid() and process_alive(other):
            raise HypervisorError(
                f"another snapferry backup of domain {self.target.domain} is running "
                f"(pid {other})"
            )
        return st

    def _state(self) -> dict[str, Any]:
        return read_state(self._state_file)

    def _set_state(self, **kv: Any) -> None:
        update_state(self._state_file, **kv)

    @property
    def nbd_socket(self) -> Path:
        return nbd_socket_path(self.work_dir, "snapferry-lv")

    def _offline_socket(self, d: _Disk) -> Path:
        return self.nbd_socket.with_name(f"{self.nbd_socket.stem}-{d.name}.sock")

    # -- connection ----------------------------------------------------------------------
    def _err(self, e: Exception) -> str:
        return _one_line(e)

    def _dom(self) -> Any:
        """The domain on a live connection; reconnects (waiting for a restarting
        libvirtd up to ``reconnect_timeout``) when the connection was lost."""
        lv = self._lv
        if self._conn is not None:
            try:
                if self._conn.isAlive():
                    return self._conn.lookupByName(self.target.domain)
            except lv.libvirtError as e:
                if e.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
                    raise HypervisorError(f"libvirt domain {self.target.domain!r} is gone") from e
            with contextlib.suppress(lv.libvirtError):
                self._conn.close()
            self._conn = None
        deadline = time.monotonic() + self.reconnect_timeout
        last = ""
        while True:
            try:
                self._conn = lv.open(self.target.conn_uri)
                break
            except lv.libvirtError as e:
                last = self._err(e)
                if time.monotonic() > deadline or (not self._job and not self._disks):
                    raise HypervisorError(
                        f"cannot connect to libvirt at {self.target.conn_uri}: {last}"
                    ) from e
                time.sleep(0.5)
        try:
            return self._conn.lookupByName(self.target.domain)
        except lv.libvirtError as e:
            raise HypervisorError(
                f"no libvirt domain {self.target.domain!r} at {self.target.conn_uri}"
            ) from e

    def _backup_xml(self) -> str | None:
        lv = self._lv
        try:
            return str(self._dom().backupGetXMLDesc(0))
        except lv.libvirtError as e:
            if e.get_error_code() == lv.VIR_ERR_NO_DOMAIN_BACKUP:
                return None
            if e.get_error_code() == lv.VIR_ERR_OPERATION_INVALID:  # domain not running
                return None
            raise HypervisorError(f"cannot query the backup job: {self._err(e)}") from e

    def _job_is_ours(self, xml: str) -> bool:
        try:
            server = ET.fromstring(xml).find("server")
        except ET.ParseError:
            return False
        return server is not None and server.get("socket") == str(self.nbd_socket)

    # -- inspect ----------------------------------------------------------------------
    def inspect(self) -> VmInfo:
        lv = self._lv
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.target.remote:
            raise HypervisorError(
                f"{self.target.conn_uri}: backing up a domain on another host needs its NBD "
                "export over TCP, which snapferry does not do yet; run snapferry on that host "
                "with libvirt:///system/" + self.target.domain
            )
        st = self._refuse_another_backup()
        dom = self._dom()
        self._uuid = str(dom.UUIDString())
        state, _reason = dom.state()
        self._offline = state == lv.VIR_DOMAIN_SHUTOFF
        if state not in (lv.VIR_DOMAIN_RUNNING, lv.VIR_DOMAIN_SHUTOFF):
            raise HypervisorError(
                f"domain {self.target.domain} is neither running nor shut off (state {state}): "
                "resume or stop it first"
            )
        self._set_state(pid=os.getpid())
        if not self._offline:
            self._clear_stale(st)
        self._disks = self._read_disks(dom)
        if not self._disks:
            raise HypervisorError(f"domain {self.target.domain} has no disk to back up")
        raw = [d.name for d in self._disks if d.fmt != "qcow2"]
        meta: dict[str, Any] = {
            "hypervisor": "libvirt",
            "libvirt": self._conn.getLibVersion(),
            "connection": self.target.conn_uri,
            "domain": self.target.domain,
            "uuid": self._uuid,
            "state": "shut off" if self._offline else "running",
            "disks": {d.name: {"file": d.path, "format": d.fmt, "size": d.size}
                      for d in self._disks},
        }
        if raw:
            meta["raw_disks"] = raw
        meta["agent"] = "domain shut off" if self._offline else self._probe_agent(st)
        return VmInfo(name=self.name, disks=[d.name for d in self._disks], meta=meta)

    def _read_disks(self, dom: Any) -> list[_Disk]:
        root = ET.fromstring(dom.XMLDesc(0))
        disks: list[_Disk] = []
        for el in root.findall("./devices/disk"):
            if el.get("device", "disk") != "disk":
                continue  # cdrom, floppy, lun
            target = el.find("target")
            source = el.find("source")
            driver = el.find("driver")
            if target is None or target.get("dev") is None:
                continue
            name = str(target.get("dev"))
            if el.find("readonly") is not None:
                continue
            if el.get("type") not in ("file", "block") or source is None:
                raise HypervisorError(
                    f"disk {name} of domain {self.target.domain} is a {el.get('type')} disk: "
                    "only file and block disks can be backed up"
                )
            if el.find("./source/dataStore") is not None or source.find("dataStore") is not None:
                raise HypervisorError(f"disk {name} has an external data file: not supported")
            path = source.get("file") or source.get("dev") or ""
            fmt = driver.get("type", "raw") if driver is not None else "raw"
            if el.find("backingStore/source") is not None:
                raise HypervisorError(
                    f"disk {name} runs on an overlay over a backing image: snapferry needs the "
                    "domain on its base images; block-commit that snapshot first"
                )
            d = _Disk(name=name, fmt=fmt, path=path)
            with contextlib.suppress(self._lv.libvirtError):
                d.size = int(dom.blockInfo(name, 0)[0])
            disks.append(d)
        return disks

    def _probe_agent(self, st: dict[str, Any]) -> str:
        """'ok' or why not; thaws a freeze of ours left by a killed run; refuses a guest
        frozen by someone else."""
        lv = self._lv
        try:
            self._dom().fsInfo(0)
            return "ok"
        except lv.libvirtError as e:
            msg = self._err(e)
        if "frozen" in msg:
            if st.get("frozen"):
                self.progress.note("the guest is still frozen by an interrupted backup: thawing")
                self._try_thaw()
                return "ok"
            raise HypervisorError(
                f"the guest's filesystems of domain {self.target.domain} are already frozen "
                "(by someone else?): refusing to back up; thaw them first "
                f"(virsh domfsthaw {self.target.domain})"
            )
        return f"unresponsive: {msg}"

    def _clear_stale(self, st: dict[str, Any]) -> None:
        """A backup job of ours left by a killed run is aborted (and its checkpoint, never
        backed by a restore point, deleted); anyone else's job is refused."""
        xml = self._backup_xml()
        if xml is not None:
            if not self._job_is_ours(xml):
                raise HypervisorError(
                    f"domain {self.target.domain} already has a backup job that snapferry did "
                    "not start: refusing to touch it; wait for it or end it "
                    f"(virsh domjobabort {self.target.domain})"
                )
            self.progress.note("ending the backup job of an interrupted snapferry run")
            self._job = True
            self._end_job()
        if st.get("frozen"):
            self._try_thaw()
        # The checkpoint a killed run created waits for snapshot(): if that run committed
        # its restore point (killed between the manifest and finalize), the restore
        # point names it and it must stay, or the next backup would be full.
        self._stale_checkpoint = str(st["new_checkpoint"]) if st.get("new_checkpoint") \
            else None
        self._remove_leftovers()

    def _settle_stale_checkpoint(self, parents: dict[str, ParentDisk]) -> None:
        stale, self._stale_checkpoint = self._stale_checkpoint, None
        if stale is None:
            return
        if any(p.tracking.get("checkpoint") == stale for p in parents.values()):
            self.progress.note(f"kept checkpoint {stale} of an interrupted run: its restore "
                               "point was committed")
        else:
            self._delete_checkpoint(stale)
        self._set_state(new_checkpoint=None)

    # -- quiesce / thaw ----------------------------------------------------------------
    def quiesce(self) -> int:
        lv = self._lv
        if self._offline:
            self.progress.note(
                f"domain {self.target.domain} is shut off: nothing to freeze, its disks are "
                "read as they are"
            )
            return 0
        self._set_state(frozen=True)
        self._freeze_t0 = time.monotonic()
        try:
            count = int(self._dom().fsFreeze(None, 0))
        except lv.libvirtError as e:
            self._try_thaw()
            raise QuiesceError(f"guest freeze failed: {self._err(e)}") from e
        except SnapferryError as e:
            self._try_thaw()
            raise QuiesceError(f"guest freeze failed: {e}") from e
        if count < 1:
            self._try_thaw()
            raise QuiesceError(f"guest freeze not proven: {count} filesystem(s) frozen")
        return count

    def _no_agent(self, e: Any) -> bool:
        """The domain has no guest-agent channel (not merely a silent agent)."""
        return bool(e.get_error_code() == self._lv.VIR_ERR_ARGUMENT_UNSUPPORTED
                    and "not configured" in str(e))

    def _try_thaw(self) -> None:
        lv = self._lv
        try:
            self._dom().fsThaw(None, 0)
            self._set_state(frozen=False)
        except lv.libvirtError as e:
            msg = self._err(e)
            if self._no_agent(e) or "not frozen" in msg or "thawed" in msg:
                self._set_state(frozen=False)
            else:
                self.progress.note(f"thaw: {msg}")
        except SnapferryError as e:
            self.progress.note(f"thaw: {e}")
        finally:
            self._freeze_t0 = None

    def thaw(self) -> int:
        lv = self._lv
        if self._offline:
            return 0
        try:
            count = int(self._dom().fsThaw(None, 0))
        except lv.libvirtError as e:
            raise QuiesceError(f"guest thaw failed: {self._err(e)}") from e
        finally:
            if self._freeze_t0 is not None:
                self.stats["freeze_ms"] = (time.monotonic() - self._freeze_t0) * 1000
                self._freeze_t0 = None
        self._set_state(frozen=False)
        return count

    # -- checkpoints --------------------------------------------------------------------
    def _checkpoint_facts(self, name: str) -> dict[str, Any] | None:
        """{"created": int, "disks": {target: mode}} of a checkpoint, or None."""
        lv = self._lv
        try:
            cp = self._dom().checkpointLookupByName(name, 0)
            root = ET.fromstring(cp.getXMLDesc(lv.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
        except lv.libvirtError:
            return None
        disks = {str(d.get("name")): str(d.get("checkpoint", "bitmap"))
                 for d in root.findall("./disks/disk")}
        return {"created": int(root.findtext("creationTime") or 0), "disks": disks}

    def _our_checkpoints(self) -> list[tuple[int, str]]:
        """(creation time, name) of every snapferry checkpoint, oldest first."""
        out = []
        for cp in self._dom().listAllCheckpoints(0):
            name = str(cp.getName())
            if name.startswith(CHECKPOINT_PREFIX):
                facts = self._checkpoint_facts(name)
                out.append((facts["created"] if facts else 0, name))
        return sorted(out)

    def _delete_checkpoint(self, name: str) -> None:
        lv = self._lv
        try:
            self._dom().checkpointLookupByName(name, 0).delete(0)
        except lv.libvirtError as e:
            if e.get_error_code() == lv.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                return
            if "not found" not in str(e):
                raise HypervisorError(f"cannot delete checkpoint {name}: {self._err(e)}") from e
            # Its bitmap is already gone from the image (removed behind libvirt's back):
            # only libvirt's record of it is left to drop.
            try:
                self._dom().checkpointLookupByName(name, 0).delete(
                    lv.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            except lv.libvirtError as e2:
                raise HypervisorError(
                    f"cannot delete checkpoint {name}: {self._err(e)}; {self._err(e2)}") from e2
            self.progress.note(f"checkpoint {name} had lost its bitmap: dropped libvirt's "
                               "record of it")

    def _plan_disk(self, d: _Disk, mode: BackupMode, parent: ParentDisk | None) -> None:
        d.incremental = False
        d.parent_checkpoint = None
        d.full_reason = None
        if d.fmt != "qcow2":
            d.full_reason = (f"{d.fmt} image: libvirt checkpoints need qcow2, so this disk is "
                             "always backed up in full")
            return
        if mode == "full":
            return
        if self._offline:
            d.full_reason = (f"domain {self.target.domain} is shut off: its image is read "
                             "directly in full (qemu-nbd -r)")
            return
        why: str | None = None
        cp = parent.tracking.get("checkpoint") if parent is not None else None
        facts = self._checkpoint_facts(str(cp)) if cp else None
        if parent is None:
            why = "no parent restore point for this disk" if mode == "incremental" else None
        elif not cp:
            why = "the parent restore point recorded no libvirt checkpoint"
        elif parent.tracking.get("domain_uuid") not in (None, self._uuid):
            why = ("the parent restore point was made of another domain (uuid "
                   f"{parent.tracking.get('domain_uuid')})")
        elif facts is None:
            why = f"checkpoint {cp} is gone (deleted outside snapferry?)"
        elif parent.tracking.get("checkpoint_created") not in (None, facts["created"]):
            why = (f"checkpoint {cp} is not the one the parent restore point recorded "
                   "(recreated with the same name?)")
        elif facts["disks"].get(d.name, "no") != "bitmap":
            why = f"checkpoint {cp} does not track this disk"
        elif parent.virtual_size != d.size:
            why = f"disk size changed from {parent.virtual_size} to {d.size}"
        if parent is not None and why is None:
            d.incremental = True
            d.parent_checkpoint = str(cp)
        elif why is not None:
            d.full_reason = f"{why}: full backup"

    def _backup_xmls(self, name: str) -> tuple[str, str | None]:
        disks_xml = []
        cp_disks = []
        for d in self._disks:
            scratch = self.work_dir.resolve() / f"{d.name}{SCRATCH_SUFFIX}"
            mode = (f" backupmode='incremental' incremental={quoteattr(str(d.parent_checkpoint))}"
                    if d.incremental else " backupmode='full'")
            disks_xml.append(f"<disk name={quoteattr(d.name)} backup='yes' type='file'{mode}>"
                             f"<scratch file={quoteattr(str(scratch))}/></disk>")
            cp_disks.append(f"<disk name={quoteattr(d.name)} checkpoint="
                            f"'{'bitmap' if d.fmt == 'qcow2' else 'no'}'/>")
        backup = (f"<domainbackup mode='pull'><server transport='unix' "
                  f"socket={quoteattr(str(self.nbd_socket))}/><disks>{''.join(disks_xml)}"
                  "</disks></domainbackup>")
        if not any(d.fmt == "qcow2" for d in self._disks):
            return backup, None
        checkpoint = (f"<domaincheckpoint><name>{name}</name><description>snapferry backup"
                      f"</description><disks>{''.join(cp_disks)}</disks></domaincheckpoint>")
        return backup, checkpoint

    # -- snapshot (backupBegin) -----------------------------------------------------
    def snapshot(self, mode: BackupMode, parents: dict[str, ParentDisk]) -> None:
        if not self._disks:
            self.inspect()
        self._finalized = False
        if self._offline:
            for d in self._disks:
                self._plan_disk(d, mode, parents.get(d.name))
            self._start_offline()
            return
        self._settle_stale_checkpoint(parents)
        said_raw = False
        for d in self._disks:
            self._plan_disk(d, mode, parents.get(d.name))
            if d.full_reason and (d.fmt == "qcow2" or not said_raw):
                self.progress.note(f"disk {d.name}: {d.full_reason}")
                said_raw = said_raw or d.fmt != "qcow2"
        now = dt.datetime.now(dt.UTC)
        name = CHECKPOINT_PREFIX + now.strftime("%Y%m%dT%H%M%S") + f"-{now.microsecond:06d}"
        self.nbd_socket.unlink(missing_ok=True)
        try:
            self._begin(name)
        except HypervisorError as e:
            broken = [d for d in self._disks if d.incremental]
            if not broken:
                raise
            # A checkpoint libvirt lists but cannot use (bitmap missing or inconsistent in
            # the qcow2): never a wrong incremental, a full backup instead.
            for d in broken:
                d.incremental = False
                d.full_reason = (f"checkpoint {d.parent_checkpoint} is broken ({e}): "
                                 "full backup")
                self.progress.note(f"disk {d.name}: {d.full_reason}")
                d.parent_checkpoint = None
            self._begin(name)

    def _begin(self, name: str) -> None:
        lv = self._lv
        backup, checkpoint = self._backup_xmls(name)
        self._set_state(job=True, new_checkpoint=name if checkpoint else None)
        self._job = True
        try:
            self._dom().backupBegin(backup, checkpoint, 0)
        except lv.libvirtError as e:
            self._job = False
            self._set_state(job=False, new_checkpoint=None)
            # a checkpoint may be left if libvirt failed half-way
            with contextlib.suppress(SnapferryError):
                self._delete_checkpoint(name)
            raise HypervisorError(f"libvirt backup begin failed: {self._err(e)}") from e
        self._new_checkpoint = name if checkpoint else None

    def _start_offline(self) -> None:
        """qemu-nbd -r on every image of the shut-off domain."""
        exe = shutil.which("qemu-nbd")
        if exe is None:
            raise HypervisorError("qemu-nbd not found (qemu-utils): needed for a shut-off domain")
        pids = []
        for d in self._disks:
            sock = self._offline_socket(d)
            sock.unlink(missing_ok=True)
            p = subprocess.Popen(
                [exe, "-r", "-f", d.fmt, "-k", str(sock), "-x", d.name, "-t", "-e", "16",
                 "--cache=none", "--aio=threads", d.path],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                start_new_session=True,
            )
            pids.append(p.pid)
            self._set_state(qemu_nbd=pids)
            deadline = time.monotonic() + 30
            while not sock.exists():
                if p.poll() is not None:
                    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
                    raise HypervisorError(
                        f"qemu-nbd could not open disk {d.name} ({d.path}): {_one_line(err)}"
                    )
                if time.monotonic() > deadline:
                    raise HypervisorError(f"qemu-nbd did not serve disk {d.name} within 30 s")
                time.sleep(0.05)

    # -- export -----------------------------------------------------------------------
    def export(self, mode: BackupMode, parents: dict[str, ParentDisk]) -> list[DiskPlan]:
        if self._offline:
            return [self._plan(d, f"nbd+unix:///{d.name}?socket={self._offline_socket(d)}", None)
                    for d in self._disks]
        xml = self._backup_xml()
        if xml is None or not self._job:
            raise HypervisorError("export() without a running backup job")
        exported = {str(el.get("name")): el for el in ET.fromstring(xml).findall("./disks/disk")}
        plans = []
        for d in self._disks:
            el = exported.get(d.name)
            if el is None:
                raise HypervisorError(f"libvirt's backup job does not export disk {d.name}")
            export_name = el.get("exportname") or d.name
            d.bitmap = el.get("exportbitmap") if d.incremental else None
            if d.incremental and not d.bitmap:
                raise HypervisorError(f"libvirt exported no dirty bitmap for disk {d.name}")
            plans.append(self._plan(d, f"nbd+unix:///{export_name}?socket={self.nbd_socket}",
                                    d.bitmap))
        return plans

    def _plan(self, d: _Disk, uri: str, bitmap: str | None) -> DiskPlan:
        source = self._open_source(uri, bitmap)
        self._sources.append(source)
        if not d.size:
            d.size = source.size
        changed: list[tuple[int, int]] | None = None
        if d.incremental:
            changed = _merge_ranges(
                (e.offset, e.length) for e in source.extents(0, source.size, dirty=True)
                if e.dirty
            )
        tracking: dict[str, Any] = {
            "checkpoint": self._new_checkpoint if d.fmt == "qcow2" else None,
            "domain_uuid": self._uuid,
            "format": d.fmt,
        }
        if tracking["checkpoint"]:
            facts = self._checkpoint_facts(str(self._new_checkpoint))
            tracking["checkpoint_created"] = facts["created"] if facts else None
        return DiskPlan(
            name=d.name,
            source=source,
            changed=changed,
            tracking=tracking,
            full_reason=d.full_reason,
            meta={"export": uri, "file": d.path, "format": d.fmt,
                  "parent_checkpoint": d.parent_checkpoint if d.incremental else None,
                  "offline": self._offline},
        )

    def _close_sources(self) -> None:
        for s in self._sources:
            with contextlib.suppress(Exception):
                s.close()
        self._sources = []

    # -- merge_overlay (= end the backup job) / check_on_base -----------------------------
    def _end_job(self) -> None:
        """abortJob and wait until libvirt has no backup job (ours) any more."""
        lv = self._lv
        self._close_sources()
        if self._offline:
            self._stop_qemu_nbd()
            return
        deadline = time.monotonic() + self.job_timeout
        aborted = False
        while True:
            xml = self._backup_xml()
            if xml is None:
                break
            if not self._job_is_ours(xml):
                break  # someone else's job (began after ours ended): not ours to end
            if not aborted:
                try:
                    self._dom().abortJob()
                    aborted = True
                except lv.libvirtError as e:
                    if time.monotonic() > deadline:
                        raise HypervisorError(
                            f"cannot end the backup job: {self._err(e)}") from e
            if time.monotonic() > deadline:
                raise HypervisorError(f"the backup job did not end within {self.job_timeout:.0f} s")
            time.sleep(0.1)
        self._job = False
        self._set_state(job=False)
        self._remove_leftovers()

    def _stop_qemu_nbd(self) -> None:
        for pid in self._state().get("qemu_nbd", []):
            if process_alive(int(pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGTERM)
                deadline = time.monotonic() + 10
                while process_alive(int(pid)) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if process_alive(int(pid)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(int(pid), os.WNOHANG)
        self._set_state(qemu_nbd=None)
        for d in self._disks:
            self._offline_socket(d).unlink(missing_ok=True)

    def _remove_leftovers(self) -> None:
        for f in self.work_dir.glob(f"*{SCRATCH_SUFFIX}"):
            f.unlink(missing_ok=True)
        self.nbd_socket.unlink(missing_ok=True)

    def merge_overlay(self) -> None:
        t0 = time.monotonic()
        self._end_job()
        self.stats["commit_s"] = time.monotonic() - t0

    def check_on_base(self) -> None:
        lv = self._lv
        dom = self._dom()
        state = dom.state()[0]
        want = lv.VIR_DOMAIN_SHUTOFF if self._offline else lv.VIR_DOMAIN_RUNNING
        if state != want:
            raise HypervisorError(f"domain {self.target.domain} changed state during the backup "
                                  f"(now {state})")
        if not self._offline and self._backup_xml() is not None:
            raise HypervisorError("a backup job is still running on the domain")
        now = {d.name: d.path for d in self._read_disks(dom)}
        for d in self._disks:
            if now.get(d.name) != d.path:
                raise HypervisorError(f"disk {d.name} runs on {now.get(d.name)}, not {d.path}")

    # -- changed-block bookkeeping ----------------------------------------------------
    def finalize(self, success: bool) -> None:
        if self._finalized:
            return
        if self._offline:
            self._finalized = True
            return
        if self._job:
            self._end_job()  # a checkpoint in use by the job cannot be deleted
        new = self._new_checkpoint
        if success:
            for _created, name in self._our_checkpoints():
                if name != new:
                    self._delete_checkpoint(name)
        elif new is not None:
            # Never backed by a restore point: drop it. libvirt keeps the parent's bitmap
            # recording, so the next incremental from it still sees every write.
            self._delete_checkpoint(new)
            self._new_checkpoint = None
        self._set_state(new_checkpoint=None)
        self._finalized = True

    # -- cleanup ----------------------------------------------------------------------
    def cleanup(self) -> None:
        """Thaw, end our backup job, drop our uncommitted checkpoint, remove scratch files
        and sockets. Idempotent; waits for a restarting libvirtd. Raises one line when the
        domain could not be left thawed without a job of ours."""
        errors: list[str] = []
        self._close_sources()
        st = self._state()
        if not self._offline and (st.get("frozen") or self._freeze_t0 is not None):
            try:
                self._dom().fsThaw(None, 0)
                self._set_state(frozen=False)
            except self._lv.libvirtError as e:
                if self._no_agent(e):  # no agent channel at all: nothing can be frozen
                    self._set_state(frozen=False)
                else:
                    errors.append(f"guest may still be frozen: {self._err(e)}")
            except SnapferryError as e:
                errors.append(f"guest may still be frozen: {e}")
            self._freeze_t0 = None
        try:
            if self._offline:
                self._stop_qemu_nbd()
            elif self._job or st.get("job"):
                self._job = True
                self._end_job()
        except (SnapferryError, self._lv.libvirtError) as e:
            errors.append(f"ending the backup job: {e}")
        if not self._finalized:
            try:
                self.finalize(False)
            except (SnapferryError, self._lv.libvirtError) as e:
                errors.append(f"checkpoint bookkeeping: {e}")
        if not errors:
            self._remove_leftovers()
            self._set_state(pid=None)
        if errors:
            raise HypervisorError("cleanup incomplete: " + "; ".join(errors))

    def recover(self) -> list[str]:
        """``snapferry cleanup DOMAIN``: from whatever a killed backup left (its state
        file is the hint, libvirt's answers decide): thaw a freeze of ours, end our backup
        job (recognised by its NBD socket), delete the checkpoint a killed run created
        but never finished, stop the qemu-nbd of an offline run, remove scratch files
        and sockets. Refuses while another snapferry process backs the domain up; leaves
        anyone else's job or freeze alone (and says so). One line per action."""
        lv = self._lv
        done: list[str] = []
        self.work_dir.mkdir(parents=True, exist_ok=True)
        st = self._refuse_another_backup()
        dom = self._dom()
        state, _reason = dom.state()
        self._offline = state == lv.VIR_DOMAIN_SHUTOFF
        with contextlib.suppress(HypervisorError):
            self._disks = self._read_disks(dom)
        if st.get("qemu_nbd"):
            self._stop_qemu_nbd()
            done.append("stopped the qemu-nbd of an interrupted offline backup")
        if not self._offline:
            frozen = False
            try:
                dom.fsInfo(0)
            except lv.libvirtError as e:
                frozen = "frozen" in self._err(e)
            if frozen and st.get("frozen"):
                self._try_thaw()
                done.append("thawed the guest's filesystems (frozen by an interrupted backup)")
            elif frozen:
                done.append("the guest is frozen, not by snapferry: left alone "
                            f"(virsh domfsthaw {self.target.domain})")
            xml = self._backup_xml()
            if xml is not None and self._job_is_ours(xml):
                self._job = True
                self._end_job()
                done.append("ended the backup job of an interrupted backup")
            elif xml is not None:
                done.append("a backup job snapferry did not start is running: left alone")
            stale = st.get("new_checkpoint")
            if stale:
                self._delete_checkpoint(str(stale))
                done.append(f"deleted checkpoint {stale} (created by an interrupted backup)")
        leftovers = [*self.work_dir.glob(f"*{SCRATCH_SUFFIX}")]
        if self.nbd_socket.exists():
            leftovers.append(self.nbd_socket)
        self._remove_leftovers()
        if leftovers:
            done.append(f"removed {len(leftovers)} scratch file(s)/socket(s) in {self.work_dir}")
        self._set_state(pid=None, frozen=False, job=False, new_checkpoint=None)
        return done

    def close(self) -> None:
        self._close_sources()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
