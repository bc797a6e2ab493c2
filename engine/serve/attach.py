"""Attach a restore point's disks to an arbitrary running QEMU, given its QMP socket.

    snapferry instant BACKUP_ID --qmp SOCKET [--lab-dir DIR]

Per disk: a detached nbdkit export (DIR/nbd-<i>.sock), a local qcow2 overlay
(DIR/<disk>.qcow2) whose backing file is that export, and ``blockdev-add`` of the
overlay as node ``sf-inst-<disk>`` in that QEMU. The node names are reported; the
user attaches them to devices (``device_add virtio-blk-pci,drive=sf-inst-vda``, or a
``-device`` at the next start): snapferry cannot know the guest's machine, buses or
boot order. Guest writes go to the overlay; the repository is only read.

On stop (SIGINT/SIGTERM), each node is ``blockdev-del``-ed and its export stopped (the
overlay file stays: it holds the guest's writes); a node still used by a device is left
in place with its export serving (detached, so it outlives this process), and that is
said on stderr with the nbdkit pid. No live restore in this form (the lab form has it).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapferry.engine.errors import SnapferryError, UsageError
from snapferry.engine.qemu.qmp import Qmp, QmpCommandError
from snapferry.engine.serve.server import ExportOptions, NbdkitExport

NODE_PREFIX = "sf-inst-"
RECONNECT_DELAY = 120  # a restart under heavy load can take tens of seconds


class AttachError(SnapferryError):
    """The disks could not be attached to that QEMU."""


@dataclass
class AttachedDisk:
    name: str
    node: str
    overlay: Path
    export: NbdkitExport
    added: bool = False


def _node_name(disk: str) -> str:
    return NODE_PREFIX + re.sub(r"[^A-Za-z0-9_.-]", "-", disk)


class QmpAttach:
    def __init__(self, repo: Path | str, backup_id: str, qmp_socket: Path, work_dir: Path,
                 *, password_file: str | None = None) -> None:
        from snapferry.engine.store.repo import Repository

        if not qmp_socket.exists():
            raise UsageError(f"QMP socket {qmp_socket} does not exist")
        self.qmp_socket = qmp_socket
        self.work_dir = work_dir.absolute()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        manifest = Repository.open(repo).load_manifest(backup_id)
        self.backup_id = backup_id
        self.disks: list[AttachedDisk] = []
        for i, name in enumerate(sorted(manifest.disk_names)):
            overlay = self.work_dir / f"{name}.qcow2"
            if overlay.exists():
                raise UsageError(f"{overlay} exists; not overwriting it (another --lab-dir?)")
            exp = NbdkitExport(ExportOptions(
                repo=repo, backup_id=backup_id, disk=name, socket=self.work_dir / f"nbd-{i}.sock",
                exit_with_parent=False, password_file=password_file))
            self.disks.append(AttachedDisk(name, _node_name(name), overlay, exp))

    def attach(self) -> list[dict[str, Any]]:
        q = Qmp(str(self.qmp_socket), timeout=30.0)
        try:
            have = {n.get("node-name") for n in q.cmd("query-named-block-nodes", {"flat": True})}
            for d in self.disks:
                if d.node in have:
                    raise UsageError(f"that QEMU already has a block node {d.node}")
            for d in self.disks:
                d.export.start()
                spec = {"driver": "raw", "file": {
                    "driver": "nbd", "reconnect-delay": RECONNECT_DELAY,
                    "server": {"type": "unix", "path": str(d.export.opts.socket)}}}
                r = subprocess.run(
                    ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                     "json:" + json.dumps(spec, separators=(",", ":")), str(d.overlay),
                     str(d.export.size)], capture_output=True, text=True)
                if r.returncode != 0:
                    raise AttachError(f"qemu-img create {d.overlay}: {r.stderr.strip()}")
                try:
                    q.cmd("blockdev-add", {"driver": "qcow2", "node-name": d.node,
                                           "file": {"driver": "file",
                                                    "filename": str(d.overlay)}})
                except QmpCommandError as e:
                    raise AttachError(f"blockdev-add {d.node}: {e}") from None
                d.added = True
        except BaseException:
            q.close()
            self.detach()
            raise
        q.close()
        return [{"disk": d.name, "node": d.node, "overlay": str(d.overlay),
                 "export": d.export.uri, "nbdkit_pid": d.export.pid} for d in self.disks]

    def detach(self) -> list[str]:
        """Remove the nodes and stop their exports; returns one line per node that a
        device still uses (left in place, still served)."""
        kept: list[str] = []
        q: Qmp | None = None
        with contextlib.suppress(SnapferryError):
            q = Qmp(str(self.qmp_socket), timeout=30.0)
        try:
            for d in self.disks:
                if d.added and q is not None:
                    try:
                        q.cmd("blockdev-del", {"node-name": d.node})
                        d.added = False
                    except QmpCommandError as e:
                        kept.append(f"node {d.node} stays in QEMU ({e}); its export keeps "
                                    f"serving (nbdkit pid {d.export.pid}): detach the "
                                    "device, blockdev-del the node, then kill that pid")
                        continue
                d.export.stop()  # the overlay stays: it holds whatever the guest wrote
        finally:
            if q is not None:
                q.close()
        return kept
