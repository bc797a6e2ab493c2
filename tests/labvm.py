"""The lab VM for tests: ONE real QEMU guest (TCG) with a real guest agent per session.

Use it from a test module with ``from labvm import lab_vm  # noqa: F401`` (the same
VM is shared by every module that imports the fixture: the boot is reference-counted,
so importing the fixture in several modules does not boot several VMs). The VM has two
32 MiB qcow2 data disks (``disk0`` with a write workload on /data0, ``disk1`` idle).

Also here: ``NbdinfoSource``, a stand-in ``DiskSource`` that answers ``extents()`` with
``nbdinfo --map`` (a real NBD client) for the backend tests, so they do not depend on
the project's own NBD client being finished; and ``assert_vm_clean``, the hard rule of
the lifecycle (VM running, thawed, on its base disks, no overlay, no export, no job).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapferry.engine.qemu.agent import GuestAgent
from snapferry.engine.qemu.backend import OVERLAY_SUFFIX
from snapferry.engine.qemu.qmp import Qmp
from snapferry.engine.source import Extent
from snapferry.lab.vm import LabVm, lab_down, lab_up

LAB_DISKS = 2
LAB_DISK_SIZE = "32M"

_TOOLS = ("qemu-system-x86_64", "qemu-img", "mkfs.ext4", "busybox", "nbdinfo", "nbdcopy",
          "debugfs", "e2fsck")


def lab_missing() -> str | None:
    """Why the lab VM cannot run here, or None."""
    for tool in _TOOLS:
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed"
    if not (shutil.which("qemu-ga") or Path("/usr/sbin/qemu-ga").exists()):
        return "qemu-ga (qemu-guest-agent) is not installed"
    if not list(Path("/boot").glob("vmlinuz-*")):
        return "no /boot/vmlinuz-* (linux-image-amd64) installed"
    return None


_shared: dict[str, Any] = {"vm": None, "users": 0, "dir": None}


@pytest.fixture(scope="session")
def lab_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabVm]:
    why = lab_missing()
    if why:
        pytest.skip(f"lab VM unavailable: {why}")
    if _shared["vm"] is None:
        lab_dir = tmp_path_factory.mktemp("lab")
        if len(str(lab_dir)) > 80:  # keep the unix socket paths short enough
            lab_dir = Path(tempfile.mkdtemp(prefix="sflab-"))
        _shared["dir"] = lab_dir
        _shared["vm"] = lab_up(lab_dir, disks=LAB_DISKS, disk_size=LAB_DISK_SIZE)
    _shared["users"] += 1
    try:
        yield _shared["vm"]
    finally:
        _shared["users"] -= 1
        if _shared["users"] == 0:
            vm, _shared["vm"] = _shared["vm"], None
            lab_down(vm.lab_dir, purge=True)
            if vm.lab_dir.name.startswith("sflab-"):
                shutil.rmtree(vm.lab_dir, ignore_errors=True)


class NbdinfoSource:
    """Test stand-in for the project's NbdSource: ``extents()`` from ``nbdinfo --map``.

    Mock boundary: only the client side of NBD is replaced (by libnbd's own nbdinfo),
    the server is QEMU's real NBD export.
    """

    def __init__(self, uri: str, bitmap: str | None) -> None:
        self.uri = uri
        self.bitmap = bitmap
        self.closed = False

    @property
    def size(self) -> int:
        out = subprocess.run(["nbdinfo", "--size", self.uri], capture_output=True, text=True,
                             check=True)
        return int(out.stdout.strip())

    def extents(self, offset: int = 0, length: int | None = None, *,
                dirty: bool = False) -> Iterator[Extent]:
        ctx = f"qemu:dirty-bitmap:{self.bitmap}" if dirty else "base:allocation"
        out = subprocess.run(["nbdinfo", "--json", f"--map={ctx}", self.uri],
                             capture_output=True, text=True, check=True).stdout
        end = offset + (length if length is not None else self.size)
        for e in json.loads(out):
            o, n, t = int(e["offset"]), int(e["length"]), int(e["type"])
            if o + n <= offset or o >= end:
                continue
            yield Extent(o, n, zero=bool(t & 2) and not dirty, dirty=bool(t & 1) if dirty
                         else True)

    def readinto(self, buf: memoryview, offset: int) -> None:
        raise NotImplementedError("tests read exports with nbdcopy")

    def spec(self) -> Any:
        raise NotImplementedError

    def clone(self) -> NbdinfoSource:
        return NbdinfoSource(self.uri, self.bitmap)

    def describe(self) -> dict[str, Any]:
        return {"kind": "nbdinfo-test", "uri": self.uri}

    def close(self) -> None:
        self.closed = True


def control(vm: LabVm) -> Qmp:
    """A QMP connection on the lab's own control socket (the backend uses qmp.sock)."""
    q = Qmp(vm.control_socket, timeout=30.0)
    q.connect()
    return q


def bitmaps(vm: LabVm, node: str = "lab-disk0") -> dict[str, dict[str, Any]]:
    q = control(vm)
    try:
        for n in q.cmd("query-named-block-nodes", {"flat": True}):
            if n.get("node-name") == node:
                return {b["name"]: b for b in n.get("dirty-bitmaps", []) if "name" in b}
        return {}
    finally:
        q.close()


def assert_vm_clean(vm: LabVm, work_dir: Path, *, unlocked: bool = False) -> None:
    """The lifecycle's hard rule: running, thawed, on the base disks, nothing left over
    (no overlay, export, job or ``sf-*`` node). With ``unlocked``, also no backup lock
    (once every backend object of the backup was closed)."""
    q = control(vm)
    try:
        assert q.cmd("query-status")["status"] == "running"
        blocks = [b for b in q.cmd("query-block") if b.get("inserted")]
        assert len(blocks) == len(vm.disks)
        for i, b in enumerate(blocks):
            ins = b["inserted"]
            assert ins["node-name"] == f"lab-disk{i}", ins["node-name"]
            assert ins["file"] == vm.disks[i]
            assert ins["ro"] is False
            assert "backing-image" not in ins["image"]
        assert q.cmd("query-block-exports") == []
        assert q.cmd("query-block-jobs") == []
        names = {n["node-name"] for n in q.cmd("query-named-block-nodes", {"flat": True})}
        assert not any(n.startswith("sf-") for n in names), names
        if unlocked:
            objects = {o["name"] for o in q.cmd("qom-list", {"path": "/objects"})}
            assert "sf-lock" not in objects, "the VM's backup lock was left held"
    finally:
        q.close()
    assert list(work_dir.glob(f"*{OVERLAY_SUFFIX}")) == []
    with GuestAgent(vm.agent_socket, timeout=30.0) as ga:
        assert ga.fsfreeze_status() == "thawed"


@pytest.fixture
def silent_agent(tmp_path: Path) -> Iterator[str]:
    """A socket that accepts connections and never answers (a hung guest agent)."""
    path = str(tmp_path / "silent.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield path
    finally:
        stop.set()
        t.join(5)
        for c in conns:
            c.close()
        srv.close()
