"""``QemuHypervisor``: the QEMU backend of the ``Hypervisor`` seam (QMP + guest agent).

Strategy (DESIGN.md section 3, the overlay path):

* snapshot: ONE QMP ``transaction`` over all disks: per disk a fresh persistent dirty
  bitmap ``snapferry-<stamp>`` on the BASE node, for an incremental the
  ``block-dirty-bitmap-disable`` of the parent's bitmap, and a
  ``blockdev-snapshot-sync`` to a qcow2 overlay in ``work_dir`` (node ``sf-ovl-<i>``).
  The guest writes into the overlay from then on; the base holds the point in time.
* export: QEMU's own NBD server (see ``_export_disk`` for why), read-only, with the
  parent's (now frozen) bitmap for an incremental.
* commit: active ``block-commit`` of each overlay into its base, ``block-job-complete``
  at READY. The writes made during the backup reach the base through the commit and
  are recorded by the fresh bitmap: it is the next incremental's parent bitmap.
* finalize: success drops the parent's bitmap; failure merges the fresh bitmap into
  the parent's and re-enables it, so the next incremental cannot miss a write.

Everything this backend creates in QEMU carries a recognisable name (``sf-ovl-*``
nodes, ``sf-exp-*`` exports, ``sf-commit-*`` jobs, ``snapferry-*`` bitmaps) and the
little state QEMU cannot tell (a freeze we issued, an NBD server we started) is kept in
``work_dir/qemu-state.json``, so ``cleanup()`` also works from a fresh process after a
crash.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapferry.engine.crash_state import nbd_socket_path, read_state, update_state
from snapferry.engine.errors import HypervisorError, QuiesceError, SnapferryError
from snapferry.engine.hypervisor import BackupMode, DiskPlan, ParentDisk, VmInfo
from snapferry.engine.procs import process_start
from snapferry.engine.progress import NullProgress, Progress
from snapferry.engine.qemu.agent import AgentError, AgentTimeout, GuestAgent
from snapferry.engine.qemu.qmp import Event, Qmp, QmpCommandError, QmpConnectionError
from snapferry.engine.source import DiskSource

BITMAP_PREFIX = "snapferry-"
OVERLAY_NODE_PREFIX = "sf-ovl-"
EXPORT_PREFIX = "sf-exp-"
JOB_PREFIX = "sf-commit-"
OVERLAY_SUFFIX = ".sf-overlay.qcow2"
LOCK_ID = "sf-lock"  # an authz-simple object in QEMU: the per-VM backup lock
FREEZE_LIMIT = 10.0  # seconds a guest may stay frozen before the watchdog thaws it
WATCHDOG_LOG = "thaw-watchdog.log"
RAW_FULL_REASON = ("disk {name} is raw: full backups only (incrementals need a qcow2 image "
                   "with a persistent dirty bitmap)")

# lock tokens of live QemuHypervisor objects of this process (a lock held under our own
# pid by an object that is gone is stale; one held by a live object is not)
_LIVE_LOCKS: weakref.WeakValueDictionary[str, QemuHypervisor] = weakref.WeakValueDictionary()

SourceOpener = Callable[[str, str | None], DiskSource]


def default_source_opener(uri: str, bitmap: str | None) -> DiskSource:
    """Open the project's NBD client on an export (``bitmap``: dirty-bitmap context)."""
    from snapferry.engine.sources.nbd import NbdSource

    src: DiskSource = NbdSource.open(uri, bitmap=bitmap)
    return src


@dataclass
class _Disk:
    name: str  # device id ("disk0"): the name restore points file the disk under
    index: int
    node: str  # base (format) node name
    file: str  # base image filename
    size: int
    raw: bool = False  # a raw image: no persistent dirty bitmap, so full backups only
    # per-round state
    overlay_node: str | None = None
    overlay_file: Path | None = None
    new_bitmap: str | None = None
    parent_bitmap: str | None = None  # parent's bitmap present on the node, if any
    incremental: bool = False
    full_reason: str | None = None
    export_id: str | None = None


def _disk_name(entry: dict[str, Any], node: str) -> str:
    if entry.get("device"):
        return str(entry["device"])
    qdev = str(entry.get("qdev", ""))
    if qdev.startswith("/machine/peripheral/"):
        return qdev.split("/")[3]
    return node



def overlay_holds_data(path: Path) -> bool | None:
    """True if the qcow2 overlay ``path`` has any cluster allocated in itself (guest
    writes not in its backing file), False if none, None if that cannot be told."""
    try:
        out = subprocess.run(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2",
                              str(path)], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    try:
        entries = json.loads(out.stdout)
    except ValueError:
        return None
    return any(e.get("depth") == 0 and (e.get("data") or e.get("zero")) for e in entries)


class _Watchdog:
    """The thaw watchdog process (``thaw_watchdog.py``) for one freeze window."""

    def __init__(self, agent_socket: str, limit: float, log: Path) -> None:
        script = Path(__file__).with_name("thaw_watchdog.py")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", str(script), agent_socket, f"{limit:g}", str(log)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True,
            )
        except OSError as e:
            raise HypervisorError(f"cannot start the thaw watchdog: {e}") from e

    def release(self) -> None:
        """The freeze window is over: the watchdog exits without touching the guest
        (not waited for here: its exit is reaped by ``reap``, outside the window)."""
        stdin = self.proc.stdin
        if stdin is not None:
            with contextlib.suppress(OSError):
                stdin.write(b"done\n")
                stdin.flush()
            with contextlib.suppress(OSError):
                stdin.close()

    def reap(self) -> None:
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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


class QemuHypervisor:
    def __init__(
        self,
        qmp_socket: str,
        agent_socket: str | None,
        *,
        work_dir: Path | str,
        name: str | None = None,
        agent_timeout: float = 10.0,
        progress: Progress | None = None,
        commit_timeout: float = 3600.0,
        source_opener: SourceOpener | None = None,
        freeze_limit: float = FREEZE_LIMIT,
    ) -> None:
        self.qmp_socket = qmp_socket
        self.agent_socket = agent_socket
        self.work_dir = Path(work_dir)
        self.name = name
        self.agent_timeout = agent_timeout
        self.progress: Progress = progress if progress is not None else NullProgress()
        self.commit_timeout = commit_timeout
        self._open_source = source_opener or default_source_opener
        self._qmp = Qmp(qmp_socket)
        self._agent: GuestAgent | None = None
        self._disks: list[_Disk] = []
        self._frozen_count: int | None = None
        self._freeze_t0: float | None = None
        self._sources: list[DiskSource] = []
        self._snapshotted = False
        self._finalized = False
        # interrupted rounds' bitmaps are put right at snapshot(), where the parent
        # restore points (and so the bitmaps a committed round left) are known
        self._bitmaps_deferred = False
        self.freeze_limit = freeze_limit
        self._watchdog: _Watchdog | None = None
        self._released_watchdogs: list[_Watchdog] = []
        self._log_size_at_freeze = 0
        self._lock_token: str | None = None
        self.actions: list[str] = []  # what cleanup found and did (for `snapferry cleanup`)
        self.stats: dict[str, float] = {}

    # -- persistent state (survives a crashed process) -------------------------------
    @property
    def _state_file(self) -> Path:
        return self.work_dir / "qemu-state.json"

    def _state(self) -> dict[str, Any]:
        return read_state(self._state_file)

    def _set_state(self, **kv: Any) -> None:
        update_state(self._state_file, **kv)

    @property
    def _nbd_socket(self) -> Path:
        return nbd_socket_path(self.work_dir, "snapferry-nbd")

    # -- the per-VM lock (held in QEMU, so every monitor and repository sees it) --------
    def _lock_holder(self) -> dict[str, Any] | None:
        try:
            text = self._qmp.cmd("qom-get", {"path": f"/objects/{LOCK_ID}",
                                             "property": "identity"})
        except QmpCommandError:
            return None
        try:
            holder = json.loads(str(text))
        except ValueError:
            holder = None
        return holder if isinstance(holder, dict) else {"raw": str(text)}

    @staticmethod
    def _holder_alive(h: dict[str, Any]) -> bool:
        if h.get("host") != socket.gethostname() or not isinstance(h.get("pid"), int):
            return True  # cannot tell from here: treat as held
        if h["pid"] == os.getpid():
            return h.get("token") in _LIVE_LOCKS
        start = process_start(h["pid"])
        return start is not None and start == h.get("start")

    def lock(self) -> None:
        """Take the VM's backup lock: an ``authz-simple`` object ``sf-lock`` in QEMU
        (``object-add`` of a fixed id is an atomic create-if-absent) whose identity
        names the holder. A holder that is gone (killed backup) is taken over; a live
        one makes this refuse. Released by ``close()``; dies with the QEMU process."""
        if self._lock_token is not None:
            return
        token = os.urandom(8).hex()
        me = {"pid": os.getpid(), "start": process_start(os.getpid()),
              "host": socket.gethostname(), "token": token, "tool": "snapferry"}
        for _ in range(3):
            try:
                self._qmp.cmd("object-add", {"qom-type": "authz-simple", "id": LOCK_ID,
                                             "identity": json.dumps(me)})
                self._lock_token = token
                _LIVE_LOCKS[token] = self
                return
            except QmpCommandError as e:
                if "duplicate" not in e.desc and "exists" not in e.desc:
                    raise HypervisorError(f"cannot take the VM's backup lock: {e.desc}") from e
            holder = self._lock_holder()
            if holder is None:
                continue  # released meanwhile
            if self._holder_alive(holder):
                who = f"pid {holder.get('pid')} on {holder.get('host')}" if "pid" in holder \
                    else "an unknown holder"
                raise HypervisorError(
                    f"the VM is being backed up or cleaned up by another snapferry process "
                    f"({who}; QEMU object {LOCK_ID}): refusing to run a second one at once"
                )
            self.actions.append(f"took over the backup lock of dead pid {holder.get('pid')}")
            with contextlib.suppress(QmpCommandError):
                self._qmp.cmd("object-del", {"id": LOCK_ID})
        raise HypervisorError("cannot take the VM's backup lock (it keeps changing hands)")

    def unlock(self) -> None:
        token, self._lock_token = self._lock_token, None
        if token is None:
            return
        _LIVE_LOCKS.pop(token, None)
        with contextlib.suppress(SnapferryError, OSError):
            holder = self._lock_holder()
            if holder is not None and holder.get("token") == token:
                self._qmp.cmd("object-del", {"id": LOCK_ID})

    # -- agent ----------------------------------------------------------------------
    def _agent_conn(self, timeout: float | None = None) -> GuestAgent:
        if self.agent_socket is None:
            raise QuiesceError("no guest agent socket configured for this VM")
        if self._agent is None:
            self._agent = GuestAgent(self.agent_socket, timeout=self.agent_timeout)
        self._agent.connect(timeout)
        return self._agent

    def _agent_close(self) -> None:
        if self._agent is not None:
            self._agent.close()

    # -- inspect ----------------------------------------------------------------------
    def _nodes(self) -> dict[str, dict[str, Any]]:
        nodes = self._qmp.cmd("query-named-block-nodes", {"flat": True})
        return {n["node-name"]: n for n in nodes if n.get("node-name")}

    def _bitmaps(self, node: str) -> dict[str, dict[str, Any]]:
        n = self._nodes().get(node, {})
        return {b["name"]: b for b in n.get("dirty-bitmaps", []) if "name" in b}

    def inspect(self) -> VmInfo:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._qmp.connect()
        self.lock()
        # Holding the lock, whatever snapferry state QEMU shows is an interrupted
        # backup's: put it right first (merge overlays, drop exports). Its bitmaps wait
        # for snapshot(): whether its round committed a restore point decides which
        # bitmap to keep (a kill between the commit and finalize() left the parent's
        # disabled and the new one recording — the one the new restore point names).
        errs: list[str] = []
        self._bitmaps_deferred = True
        self._cleanup_qemu(errs)
        if errs:
            raise HypervisorError("cannot clear an interrupted backup's leftovers: "
                                  + "; ".join(errs))
        for a in self.actions:
            self.progress.note(f"leftover of an interrupted backup: {a}")
        blocks = self._qmp.cmd("query-block")
        jobs = self._qmp.cmd("query-block-jobs")
        disks: list[_Disk] = []
        for entry in blocks:
            ins = entry.get("inserted")
            if not ins or entry.get("removable"):
                continue  # empty drive, CD-ROM
            node = str(ins.get("node-name", ""))
            name = _disk_name(entry, node)
            image = ins.get("image", {})
            if "backing-image" in image:
                raise HypervisorError(
                    f"disk {name} runs on an overlay ({image.get('filename')} over "
                    f"{image['backing-image'].get('filename')}): snapferry needs the VM on "
                    "its base image; commit or remove that snapshot first"
                )
            if ins.get("drv") not in ("qcow2", "raw"):
                raise HypervisorError(
                    f"disk {name} is {ins.get('drv')}: snapferry backs up qcow2 images "
                    "(full and incremental) and raw ones (full only)"
                )
            if ins.get("ro"):
                raise HypervisorError(f"disk {name} is attached read-only")
            for j in jobs:
                if j:
                    raise HypervisorError(
                        f"block job {j.get('device')} ({j.get('type')}) is running on the VM; "
                        "wait for it or cancel it first"
                    )
            disks.append(_Disk(name=name, index=len(disks), node=node,
                               file=str(ins.get("file") or image.get("filename")),
                               size=int(image.get("virtual-size", 0)),
                               raw=ins.get("drv") == "raw"))
        if not disks:
            raise HypervisorError("the VM has no disk to back up")
        self._disks = disks
        vm_name = self.name or self._qmp.cmd("query-name").get("name") \
            or Path(self.qmp_socket).parent.name
        self.name = vm_name
        meta: dict[str, Any] = {
            "hypervisor": "qemu",
            "qemu": self._qmp.cmd("query-version").get("package", "").strip()
            or str(self._qmp.cmd("query-version").get("qemu")),
            "disks": {d.name: {"node": d.node, "file": d.file, "size": d.size} for d in disks},
            # the VM's identity (engine/planning.vm_identity): its -uuid, else the QMP path
            "uuid": str(self._qmp.cmd("query-uuid").get("UUID", "")),
            "qmp_socket": str(Path(self.qmp_socket).absolute()),
        }
        meta["agent"] = self._probe_agent()
        return VmInfo(name=vm_name, disks=[d.name for d in disks], meta=meta)

    def _probe_agent(self) -> str:
        """'ok', or why not; refuses a guest that is already frozen."""
        if self.agent_socket is None:
            return "none"
        try:
            status = self._agent_conn(timeout=min(self.agent_timeout, 5.0)).fsfreeze_status()
        except AgentError as e:
            return f"unresponsive: {e}"
        finally:
            self._agent_close()
        if status == "frozen" and self._state().get("frozen"):
            self.progress.note("the guest is still frozen by an interrupted backup: thawing")
            self._try_thaw()
        elif status == "frozen":
            raise HypervisorError(
                "the guest's filesystems are already frozen (by someone else?): "
                "refusing to back up; thaw them first (guest-fsfreeze-thaw)"
            )
        return "ok"

    def _ensure_inspected(self) -> None:
        if not self._disks:
            self.inspect()

    # -- quiesce / thaw ------------------------------------------------------------
    def agent_status(self) -> str:
        """``guest-fsfreeze-status`` ("frozen"/"thawed"), on a connection of its own
        (the agent socket takes one client: it is never held across a freeze window)."""
        try:
            return self._agent_conn().fsfreeze_status()
        finally:
            self._agent_close()

    def _watchdog_log(self) -> Path:
        return self.work_dir / WATCHDOG_LOG

    def _release_watchdog(self) -> None:
        wd, self._watchdog = self._watchdog, None
        if wd is not None:
            wd.release()
            self._released_watchdogs.append(wd)

    def _reap_watchdogs(self) -> None:
        for wd in self._released_watchdogs:
            wd.reap()
        self._released_watchdogs = []

    def quiesce(self) -> int:
        """Freeze, proven by ``guest-fsfreeze-status``. A thaw watchdog (a process of its
        own, see ``thaw_watchdog.py``) is armed first: if this process dies, or the
        freeze window passes ``freeze_limit`` seconds, it thaws the guest."""
        try:
            ga = self._agent_conn()
        except AgentError as e:
            raise QuiesceError(f"guest agent did not answer: {e}") from e
        assert self.agent_socket is not None  # _agent_conn() checked it
        self._set_state(frozen=True)
        log = self._watchdog_log()
        self._log_size_at_freeze = log.stat().st_size if log.exists() else 0
        self._watchdog = _Watchdog(self.agent_socket, self.freeze_limit, log)
        self._freeze_t0 = time.monotonic()
        try:
            count = ga.fsfreeze_freeze()
            status = ga.fsfreeze_status()
        except AgentError as e:
            self._try_thaw()
            raise QuiesceError(f"guest freeze failed: {e}") from e
        finally:
            self._agent_close()  # free the agent socket for the watchdog
        if status != "frozen" or count < 1:
            self._try_thaw()
            raise QuiesceError(
                f"guest freeze not proven: {count} filesystem(s) frozen, status {status!r}"
            )
        self._frozen_count = count
        return count

    def _try_thaw(self) -> None:
        try:
            ga = self._agent_conn()
            ga.fsfreeze_thaw()
            if ga.fsfreeze_status() == "thawed":
                self._set_state(frozen=False)
        except AgentError as e:
            self.progress.note(f"thaw after a failed freeze: {e}")
        finally:
            self._agent_close()
            self._freeze_t0 = None
            self._release_watchdog()

    def thaw(self) -> int:
        log = self._watchdog_log()
        log_before = self._log_size_at_freeze
        try:
            try:
                count = self._agent_conn().fsfreeze_thaw()
            except AgentTimeout:
                self._agent_close()  # the connection broke: once more on a fresh one
                count = self._agent_conn().fsfreeze_thaw()
        except AgentError as e:
            raise QuiesceError(f"guest thaw failed: {e}") from e
        finally:
            if self._freeze_t0 is not None:
                self.stats["freeze_ms"] = (time.monotonic() - self._freeze_t0) * 1000
                self._freeze_t0 = None
            self._agent_close()
            self._release_watchdog()
        self._set_state(frozen=False)
        frozen, self._frozen_count = self._frozen_count, None
        if frozen is not None and count != frozen and log.exists() \
                and log.stat().st_size > log_before:
            with contextlib.suppress(OSError):
                last = log.read_text().strip().splitlines()[-1].split(": ", 1)[-1]
                raise QuiesceError(f"the thaw watchdog thawed the guest first ({last})")
        return count

    # -- snapshot --------------------------------------------------------------------
    def _plan_disk(self, d: _Disk, mode: BackupMode, parent: ParentDisk | None,
                   bitmaps: dict[str, dict[str, Any]]) -> None:
        d.incremental = False
        d.full_reason = None
        pb = parent.tracking.get("bitmap") if parent is not None else None
        d.parent_bitmap = pb if pb in bitmaps else None
        if d.raw:
            d.parent_bitmap = None
            d.full_reason = RAW_FULL_REASON.format(name=d.name)
            return
        if mode == "full":
            return
        why: str | None = None
        if parent is None:
            why = "no parent restore point for this disk" if mode == "incremental" else None
        elif not pb:
            why = "the parent restore point recorded no dirty bitmap"
        elif pb not in bitmaps:
            why = (f"bitmap {pb} missing on {d.node} (VM restarted uncleanly or bitmap "
                   "removed?)")
        elif bitmaps[pb].get("inconsistent"):
            why = f"bitmap {pb} is inconsistent (VM crashed while it was in use?)"
        elif not bitmaps[pb].get("recording", True):
            why = f"bitmap {pb} is disabled (left over from an interrupted backup?)"
        elif bitmaps[pb].get("busy"):
            why = f"bitmap {pb} is in use by another operation"
        elif parent.virtual_size != d.size:
            why = f"disk size changed from {parent.virtual_size} to {d.size}"
        if parent is not None and why is None:
            d.incremental = True
        elif why is not None:
            d.full_reason = f"disk {d.name}: {why}: full backup"

    def snapshot(self, mode: BackupMode, parents: dict[str, ParentDisk]) -> None:
        self._ensure_inspected()
        now = dt.datetime.now(dt.UTC)
        stamp = now.strftime("%Y%m%dT%H%M%S") + f"-{now.microsecond:06d}"
        if self._bitmaps_deferred:
            self._bitmaps_deferred = False
            tracked = {str(p.tracking["bitmap"]) for p in parents.values()
                       if p.tracking.get("bitmap")}
            before = len(self.actions)
            self._restore_orphaned_bitmaps(committed=tracked)
            for a in self.actions[before:]:
                self.progress.note(f"leftover of an interrupted backup: {a}")
        nodes = self._nodes()
        actions: list[dict[str, Any]] = []
        for d in self._disks:
            bitmaps = {b["name"]: b for b in nodes.get(d.node, {}).get("dirty-bitmaps", [])
                       if "name" in b}  # a block job's own bitmaps are anonymous
            self._plan_disk(d, mode, parents.get(d.name), bitmaps)
            if d.full_reason and not parents:  # with a parent, the coordinator warns
                self.progress.note(f"warning: {d.full_reason}")
            d.new_bitmap = None if d.raw else BITMAP_PREFIX + stamp
            d.overlay_node = f"{OVERLAY_NODE_PREFIX}{d.index}"
            d.overlay_file = self.work_dir / f"{d.name}-{stamp}{OVERLAY_SUFFIX}"
            if d.new_bitmap is not None:  # a raw disk has no bitmap: full backups only
                actions.append({"type": "block-dirty-bitmap-add",
                                "data": {"node": d.node, "name": d.new_bitmap,
                                         "persistent": True}})
            if d.incremental:
                actions.append({"type": "block-dirty-bitmap-disable",
                                "data": {"node": d.node, "name": d.parent_bitmap}})
            actions.append({"type": "blockdev-snapshot-sync",
                            "data": {"node-name": d.node, "snapshot-file": str(d.overlay_file),
                                     "snapshot-node-name": d.overlay_node, "format": "qcow2",
                                     "mode": "absolute-paths"}})
        self._finalized = False
        try:
            self._qmp.cmd("transaction", {"actions": actions})
        except QmpCommandError as e:
            for d in self._disks:
                if d.overlay_file is not None:
                    d.overlay_file.unlink(missing_ok=True)
                d.overlay_node = d.overlay_file = d.new_bitmap = None
            raise HypervisorError(f"snapshot failed: {e.desc}") from e
        self._snapshotted = True

    # -- export ----------------------------------------------------------------------
    def export(self, mode: BackupMode, parents: dict[str, ParentDisk]) -> list[DiskPlan]:
        """Export each disk's base node through QEMU's own NBD server.

        Why QEMU's server rather than ``qemu-nbd -r`` on the base file: the exported
        dirty bitmap is the live, in-memory one (a separate qemu-nbd would only see what
        was last flushed into the qcow2), there is no second process to start, watch and
        kill, no image-locking question, and ``query-block-exports`` lets a later
        ``cleanup()`` find and remove what was left behind.
        """
        if not self._snapshotted:
            raise HypervisorError("export() before snapshot()")
        self._reap_watchdogs()  # released at the thaw; gone by now
        self._start_nbd_server()
        plans = []
        for d in self._disks:
            plans.append(self._export_disk(d))
        return plans

    def _start_nbd_server(self) -> None:
        """Start QEMU's NBD server on our socket. The state file is only a hint: QEMU
        says whether a server runs ("already running"); one started by an interrupted
        backup of ours (the state file says so, and we hold the VM lock) is restarted,
        anyone else's is left alone and the backup refuses."""
        addr = {"type": "unix", "data": {"path": str(self._nbd_socket)}}
        for attempt in range(2):
            if not self._nbd_socket.exists() or attempt:
                self._nbd_socket.unlink(missing_ok=True)
            try:
                self._qmp.cmd("nbd-server-start", {"addr": addr})
                self._set_state(nbd_server=True)
                return
            except QmpCommandError as e:
                if "already running" not in e.desc or attempt:
                    raise HypervisorError(f"cannot start QEMU's NBD server: {e.desc}") from e
                if not self._state().get("nbd_server"):
                    raise HypervisorError(
                        "QEMU's NBD server is already running and was not started by "
                        "snapferry: refusing to stop it (stop it first: nbd-server-stop)"
                    ) from e
            self._stop_nbd_server()

    def _stop_nbd_server(self) -> None:
        try:
            self._qmp.cmd("nbd-server-stop")
        except QmpCommandError as e:
            if "not running" not in e.desc:
                raise
        self._set_state(nbd_server=False)
        self._nbd_socket.unlink(missing_ok=True)

    def _export_node(self, d: _Disk) -> tuple[str, dict[str, Any]]:
        """The node holding the point-in-time image of ``d`` and facts for the manifest
        (the overlay path exports the base node itself)."""
        return d.node, {"overlay": str(d.overlay_file)}

    def _export_disk(self, d: _Disk) -> DiskPlan:
        node, meta = self._export_node(d)
        d.export_id = f"{EXPORT_PREFIX}{d.index}"
        export_name = f"sf-{d.name}"
        args: dict[str, Any] = {"type": "nbd", "id": d.export_id, "node-name": node,
                                "name": export_name, "writable": False}
        if d.incremental:
            args["bitmaps"] = [d.parent_bitmap]
        try:
            self._qmp.cmd("block-export-add", args)
        except QmpCommandError as e:
            raise HypervisorError(f"cannot export disk {d.name}: {e.desc}") from e
        uri = f"nbd+unix:///{export_name}?socket={self._nbd_socket}"
        source = self._open_source(uri, d.parent_bitmap if d.incremental else None)
        self._sources.append(source)
        changed: list[tuple[int, int]] | None = None
        if d.incremental:
            changed = _merge_ranges(
                (e.offset, e.length) for e in source.extents(0, d.size, dirty=True) if e.dirty
            )
        return DiskPlan(
            name=d.name,
            source=source,
            changed=changed,
            tracking={"bitmap": d.new_bitmap, "node": d.node, "file": d.file},
            full_reason=d.full_reason,
            meta={"export": uri, **meta,
                  "parent_bitmap": d.parent_bitmap if d.incremental else None},
        )

    def _close_sources(self) -> None:
        for s in self._sources:
            with contextlib.suppress(Exception):
                s.close()
        self._sources = []

    @staticmethod
    def _export_deleted(eid: str) -> Callable[[Event], bool]:
        def match(ev: Event) -> bool:
            return ev.get("event") == "BLOCK_EXPORT_DELETED" and ev.get("data", {}).get("id") == eid
        return match

    def _remove_exports(self) -> None:
        self._close_sources()
        ours = [e["id"] for e in self._qmp.cmd("query-block-exports")
                if str(e.get("id", "")).startswith(EXPORT_PREFIX)]
        self._qmp.clear_events()
        for eid in ours:
            try:
                self._qmp.cmd("block-export-del", {"id": eid, "mode": "hard"})
            except QmpCommandError as e:
                if "not found" not in e.desc:  # already going away
                    raise
        for eid in ours:
            if any(e.get("id") == eid for e in self._qmp.cmd("query-block-exports")):
                self._qmp.wait_event(self._export_deleted(eid), timeout=60.0)
        if ours:
            self.actions.append(f"removed NBD export(s) {', '.join(ours)}")
        if self._state().get("nbd_server"):
            self._stop_nbd_server()
        for d in self._disks:
            d.export_id = None

    # -- merge_overlay / check_on_base -------------------------------------------------------------
    def merge_overlay(self) -> None:
        self._remove_exports()
        t0 = time.monotonic()
        for d in self._disks:
            if d.overlay_node is not None:
                self._commit_overlay(d.overlay_node, d.node, d.name, d.index)
                if d.overlay_file is not None:
                    d.overlay_file.unlink(missing_ok=True)
                d.overlay_node = d.overlay_file = None
        self._snapshotted = False
        self.stats["commit_s"] = time.monotonic() - t0

    def _job_event(self, job: str, *names: str) -> Callable[[Event], bool]:
        def match(ev: Event) -> bool:
            return ev.get("event") in names and ev.get("data", {}).get("device") == job
        return match

    def _commit_overlay(self, top: str, base: str, disk: str, index: int) -> None:
        """Active commit of ``top`` into ``base``; the VM ends up on ``base``."""
        job = f"{JOB_PREFIX}{index}"
        self._qmp.clear_events()
        try:
            existing = {j["device"]: j for j in self._qmp.cmd("query-block-jobs")}
            if job not in existing:
                self._qmp.cmd("block-commit", {"job-id": job, "device": top, "base-node": base})
            elif existing[job].get("ready"):
                self._qmp.cmd("block-job-complete", {"device": job})
        except QmpCommandError as e:
            raise HypervisorError(f"commit of disk {disk} failed to start: {e.desc}") from e
        ev = self._qmp.wait_event(
            self._job_event(job, "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"),
            timeout=self.commit_timeout,
        )
        if ev["event"] == "BLOCK_JOB_READY":
            try:
                self._qmp.cmd("block-job-complete", {"device": job})
            except QmpCommandError as e:
                raise HypervisorError(f"commit of disk {disk}: {e.desc}") from e
            ev = self._qmp.wait_event(
                self._job_event(job, "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"),
                timeout=self.commit_timeout,
            )
        data = ev.get("data", {})
        if ev["event"] == "BLOCK_JOB_CANCELLED":
            raise HypervisorError(f"commit of disk {disk} was cancelled")
        if data.get("error"):
            raise HypervisorError(f"commit of disk {disk} failed: {data['error']}")
        # An overlay made by blockdev-snapshot-sync goes away with the commit; one that
        # was blockdev-add'ed (monitor-owned) must be deleted.
        if top in self._nodes():
            with contextlib.suppress(QmpCommandError):
                self._qmp.cmd("blockdev-del", {"node-name": top})

    def check_on_base(self) -> None:
        by_name = {_disk_name(b, str(b.get("inserted", {}).get("node-name", ""))): b
                   for b in self._qmp.cmd("query-block") if b.get("inserted")}
        for d in self._disks:
            b = by_name.get(d.name)
            if b is None:
                raise HypervisorError(f"disk {d.name} is gone from the VM")
            ins = b["inserted"]
            if ins.get("node-name") != d.node or "backing-image" in ins.get("image", {}):
                raise HypervisorError(
                    f"disk {d.name} is not back on its base node {d.node} "
                    f"(active node {ins.get('node-name')})"
                )
            if ins.get("ro"):
                raise HypervisorError(f"disk {d.name} is still read-only after the commit")
            if ins.get("file") != d.file:
                raise HypervisorError(f"disk {d.name} runs on {ins.get('file')}, not {d.file}")

    # -- changed-block bookkeeping ------------------------------------------------------
    def finalize(self, success: bool) -> None:
        if self._finalized or not self._disks:
            return
        if not success and self._snapshotted:
            # The guest still runs on the overlays, so the base nodes (and their bitmaps)
            # are read-only: cleanup() commits the overlays first, then calls this again.
            return
        self._remove_exports()
        actions: list[dict[str, Any]] = []
        nodes = self._nodes()
        for d in self._disks:
            have = {b["name"] for b in nodes.get(d.node, {}).get("dirty-bitmaps", [])
                    if "name" in b}
            if d.new_bitmap is None or d.new_bitmap not in have:
                continue
            if success:
                # The parent's bitmap is done with; an inconsistent snapferry bitmap (left
                # by a crash) can never be used again: drop those too.
                drop = {d.parent_bitmap} if d.parent_bitmap and d.parent_bitmap in have \
                    else set[str]()
                drop |= {b["name"] for b in nodes.get(d.node, {}).get("dirty-bitmaps", [])
                         if b.get("inconsistent")
                         and str(b.get("name", "")).startswith(BITMAP_PREFIX)}
                actions += [{"type": "block-dirty-bitmap-remove",
                             "data": {"node": d.node, "name": b}} for b in sorted(drop)]
            elif d.incremental and d.parent_bitmap in have:
                actions += [
                    {"type": "block-dirty-bitmap-merge",
                     "data": {"node": d.node, "target": d.parent_bitmap,
                              "bitmaps": [d.new_bitmap]}},
                    {"type": "block-dirty-bitmap-enable",
                     "data": {"node": d.node, "name": d.parent_bitmap}},
                    {"type": "block-dirty-bitmap-remove",
                     "data": {"node": d.node, "name": d.new_bitmap}},
                ]
            else:
                actions.append({"type": "block-dirty-bitmap-remove",
                                "data": {"node": d.node, "name": d.new_bitmap}})
        if actions:
            try:
                self._qmp.cmd("transaction", {"actions": actions})
            except QmpCommandError as e:
                raise HypervisorError(f"dirty bitmap bookkeeping failed: {e.desc}") from e
        self._finalized = True

    def _restore_orphaned_bitmaps(self, committed: set[str] | frozenset[str] = frozenset()
                                  ) -> None:
        """Stateless failure bookkeeping (a crashed or unfinalized backup): a disabled
        ``snapferry-*`` bitmap is a parent whose backup never finished its bookkeeping.
        If a newer bitmap is in ``committed`` (a restore point names it: the round was
        committed, then killed before ``finalize``), the disabled parent is dropped, as
        ``finalize(True)`` would have done, and the next backup stays incremental.
        Otherwise every newer ``snapferry-*`` bitmap is merged into it, it is re-enabled
        and the newer ones dropped. Safe: at worst the next backup of that disk is full,
        it can never miss a write."""
        actions: list[dict[str, Any]] = []
        done: list[str] = []
        for node, n in self._nodes().items():
            bms = {b["name"]: b for b in n.get("dirty-bitmaps", [])
                   if str(b.get("name", "")).startswith(BITMAP_PREFIX)}
            for name, b in sorted(bms.items()):
                if b.get("recording", True) or b.get("busy") or b.get("inconsistent"):
                    continue
                newer = [x for x in sorted(bms) if x > name]
                kept = [x for x in newer if x in committed and bms[x].get("recording", True)]
                if kept:
                    actions.append({"type": "block-dirty-bitmap-remove",
                                    "data": {"node": node, "name": name}})
                    done.append(f"dropped bitmap {name} on {node} (its backup was "
                                f"committed; {kept[0]} tracks the writes since)")
                    break
                if not newer:
                    # nothing recorded the writes since it was disabled: it can only
                    # mislead an incremental; dropping it makes the next backup full
                    actions.append({"type": "block-dirty-bitmap-remove",
                                    "data": {"node": node, "name": name}})
                    done.append(f"dropped disabled bitmap {name} on {node}")
                    break
                actions.append({"type": "block-dirty-bitmap-merge",
                                "data": {"node": node, "target": name, "bitmaps": newer}})
                actions.append({"type": "block-dirty-bitmap-enable",
                                "data": {"node": node, "name": name}})
                actions += [{"type": "block-dirty-bitmap-remove",
                             "data": {"node": node, "name": x}} for x in newer]
                done.append(f"restored bitmap {name} on {node} (merged {', '.join(newer)})")
                break
        if actions:
            self._qmp.cmd("transaction", {"actions": actions})
            self.actions += done

    # -- cleanup -----------------------------------------------------------------------
    def cleanup(self) -> None:
        """Thaw, drop exports and the NBD server, commit any overlay of ours, put the
        changed-block state back, delete overlay files. Idempotent; reconnects to QMP
        once if the connection was lost. Raises HypervisorError (one line) only when
        the VM could not be brought back to its base disks thawed."""
        errors: list[str] = []
        if self._state().get("frozen") or self._freeze_t0 is not None:
            try:
                n = self._agent_conn().fsfreeze_thaw()
                self._set_state(frozen=False)
                self._freeze_t0 = None
                if n:
                    self.actions.append(f"thawed {n} guest filesystem(s)")
            except AgentError as e:
                errors.append(f"guest may still be frozen: {e}")
            finally:
                self._agent_close()
                self._release_watchdog()
        for attempt in range(2):
            found: list[str] = []
            try:
                self._cleanup_qemu(found)
            except QmpConnectionError as e:
                self._qmp.close()  # reconnect once: the connection may just have been lost
                if attempt:
                    errors.append(str(e))
                continue
            except SnapferryError as e:
                found.append(str(e))
            errors += found
            break
        if errors:
            raise HypervisorError("cleanup incomplete: " + "; ".join(errors))

    def _release_point_in_time(self, errors: list[str]) -> None:
        """Cleanup hook, after the exports are gone and before overlays are committed:
        a strategy that holds the point-in-time image elsewhere (fleecing) drops it here.
        The overlay path has nothing to do: its overlays are committed below."""

    def _cleanup_qemu(self, errors: list[str]) -> None:
        self._qmp.connect()
        try:
            self._remove_exports()
        except QmpConnectionError:
            raise
        except SnapferryError as e:
            errors.append(f"removing the NBD export: {e}")
        self._release_point_in_time(errors)
        # Commit any overlay of ours still active (the writes in it are the guest's).
        for i, entry in enumerate(self._qmp.cmd("query-block")):
            ins = entry.get("inserted") or {}
            top = str(ins.get("node-name", ""))
            if not top.startswith(OVERLAY_NODE_PREFIX):
                continue
            backing = ins.get("image", {}).get("backing-image", {})
            name = _disk_name(entry, top)
            try:
                base = self._base_node_of(top, backing.get("filename"))
                self._commit_overlay(top, base, name, int(top.removeprefix(OVERLAY_NODE_PREFIX)
                                                          or i))
                self.actions.append(f"merged overlay {ins.get('file')} back into disk {name}")
                merged = Path(str(ins.get("file", "")))
                if merged.name.endswith(OVERLAY_SUFFIX) \
                        and merged.parent.resolve() == self.work_dir.resolve():
                    merged.unlink(missing_ok=True)  # its writes are in the base now
            except QmpConnectionError:
                raise
            except SnapferryError as e:
                errors.append(f"disk {name} still runs on overlay {ins.get('file')} over "
                              f"{backing.get('filename')}: {e}")
        self._snapshotted = False
        for d in self._disks:
            d.overlay_node = d.overlay_file = None
        if not self._finalized:
            try:
                if any(d.new_bitmap for d in self._disks):
                    self.finalize(False)  # this process's round: it knows its bitmaps
                elif not self._bitmaps_deferred:  # deferred: the next snapshot() decides
                    self._restore_orphaned_bitmaps()
                self._finalized = True
            except QmpConnectionError:
                raise
            except QmpCommandError as e:
                errors.append(f"dirty bitmap bookkeeping: {e.desc}")
            except SnapferryError as e:
                errors.append(f"dirty bitmap bookkeeping: {e}")
        self._reap_overlay_files()

    def _reap_overlay_files(self) -> None:
        """Delete overlay files QEMU no longer uses, but only those proven empty: an
        overlay the VM is no longer attached to (QEMU restarted after a killed backup)
        may hold guest writes that exist nowhere else. Those are kept, and said."""
        in_use = {str(n.get("file", "")) for n in self._nodes().values()}
        for f in sorted(self.work_dir.glob(f"*{OVERLAY_SUFFIX}")):
            if str(f) in in_use:
                continue
            holds = overlay_holds_data(f)
            if holds is False:
                f.unlink(missing_ok=True)
                self.actions.append(f"removed empty overlay {f.name}")
                continue
            why = "holds guest writes" if holds else "may hold guest writes (unreadable)"
            msg = (f"kept overlay {f} : it {why} made after an interrupted backup that "
                   "the VM no longer runs on (QEMU was restarted on the base image); "
                   "inspect it (qemu-img map) and merge it (qemu-img commit) with the VM "
                   "shut down, or delete it")
            self.actions.append(msg)
            self.progress.note(msg)

    def _base_node_of(self, top: str, backing_file: str | None) -> str:
        """Node name of the base (format) node whose image is ``backing_file``."""
        for d in self._disks:
            if d.overlay_node == top:
                return d.node
        for m in self._nodes().values():
            if m.get("file") == backing_file and m.get("drv") != "file" \
                    and m.get("node-name") != top:
                return str(m["node-name"])
        raise HypervisorError(f"cannot find the base node under overlay {top}")

    def recover(self) -> list[str]:
        """``snapferry cleanup VM``: from whatever an interrupted backup left (any crash
        point), bring the VM back to its base disks, thawed, with no export, no block
        job of ours and no stray ``snapferry-*`` bitmap (interrupted rounds' bitmaps
        merged back, inconsistent ones dropped); overlay files holding guest writes are
        kept and reported. Takes the VM lock (refuses while a backup runs). Returns
        what was found and done, one line each."""
        self.actions = []
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._qmp.connect()
        self.lock()
        if self.agent_socket is not None:
            try:
                if self.agent_status() == "frozen":
                    self._set_state(frozen=True)  # cleanup() thaws it
            except AgentError as e:
                self.actions.append(f"guest agent not answering ({e}): freeze state unknown")
        self.cleanup()
        actions: list[dict[str, Any]] = []
        for node, n in self._nodes().items():
            for b in n.get("dirty-bitmaps", []):
                name = str(b.get("name", ""))
                if name.startswith(BITMAP_PREFIX) and b.get("inconsistent"):
                    actions.append({"type": "block-dirty-bitmap-remove",
                                    "data": {"node": node, "name": name}})
                    self.actions.append(f"dropped inconsistent bitmap {name} on {node}")
        if actions:
            try:
                self._qmp.cmd("transaction", {"actions": actions})
            except QmpCommandError as e:
                raise HypervisorError(f"dropping inconsistent bitmaps: {e.desc}") from e
        return list(self.actions)

    def close(self) -> None:
        self._close_sources()
        self._agent_close()
        self._release_watchdog()
        self._reap_watchdogs()
        with contextlib.suppress(SnapferryError, OSError):
            if self._lock_token is not None:
                self._qmp.connect()
                self.unlock()
        self._qmp.close()
