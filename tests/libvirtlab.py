"""The lab guest as a libvirt domain, for the libvirt backend's tests.

One libvirtd (``scripts/libvirt-lab.sh up``; stopped at the end only if this fixture
started it) and ONE persistent domain ``sf-lab-<pid>`` for the module that uses it (one
module does: module scope frees the CPU for the rest of the session):
the lab kernel + initramfs (the same builder as the QEMU lab VM, with its qemu-ga, its
fsfreeze hook that a test can make fail, and its write workload on /data0), two disks on
virtio: ``vda`` qcow2 (ext4, the workload) and ``vdb`` raw (ext4, idle), a virtio-serial
guest-agent channel. The guest is reached only through libvirt (the agent socket is
libvirt's): ``agent()`` sends guest-agent commands with ``qemuAgentCommand``.

Skips (with the reason) only where libvirtd or the lab's tools cannot be had: a machine
that ran ``scripts/setup.sh`` (CI) runs every test.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "libvirt-lab.sh"
CONN_URI = "qemu:///system"
DISK_SIZE = "32M"
BOOT_TIMEOUT = 120.0
WORKLOAD = "snapferry.workload=1"


def libvirt_missing() -> str | None:
    if os.geteuid() != 0:
        return "qemu:///system needs root"
    for tool in ("virsh", "qemu-system-x86_64", "qemu-img", "qemu-nbd", "mkfs.ext4", "busybox",
                 "e2fsck", "debugfs"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (bash scripts/setup.sh)"
    if shutil.which("libvirtd") is None and not Path("/usr/sbin/libvirtd").exists():
        return "libvirtd is not installed (bash scripts/setup.sh installs libvirt-daemon)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python is not installed (pip install -e '.[libvirt]')"
    if not list(Path("/boot").glob("vmlinuz-*")):
        return "no /boot/vmlinuz-* (linux-image-amd64) installed"
    return None


def libvirtd_up() -> None:
    subprocess.run(["bash", str(SCRIPT), "up"], check=True, timeout=180)


def libvirtd_down() -> None:
    subprocess.run(["bash", str(SCRIPT), "down"], check=True, timeout=60)


def libvirtd_pid() -> int | None:
    out = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True)
    for word in out.stdout.split():
        if word.isdigit():
            return int(word)
    return None


def restart_libvirtd() -> None:
    """Stop our libvirtd by its pid and start it again (the domain keeps running)."""
    pid = libvirtd_pid()
    assert pid is not None, "libvirtd was not started by scripts/libvirt-lab.sh"
    os.kill(pid, 15)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    libvirtd_up()


def make_disk(path: Path, fmt: str, label: str, size: str = DISK_SIZE) -> None:
    raw = path.with_suffix(".mkfs.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), size], check=True)
    try:
        subprocess.run(["mkfs.ext4", "-F", "-q", "-L", label,
                        "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", str(raw)],
                       check=True, capture_output=True)
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, str(raw),
                        str(path)], check=True)
    finally:
        raw.unlink(missing_ok=True)


def domain_xml(name: str, kernel: Path, initrd: Path, disks: list[tuple[Path, str]],
               agent_socket: Path, console: Path) -> str:
    disk_xml = "".join(
        f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='{fmt}'/>
      <source file='{escape(str(p))}'/>
      <target dev='vd{"abcdefgh"[i]}' bus='virtio'/>
    </disk>"""
        for i, (p, fmt) in enumerate(disks)
    )
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet snapferry.disks={len(disks)} {WORKLOAD}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>{shutil.which("qemu-system-x86_64")}</emulator>{disk_xml}
    <serial type='file'><source path='{escape(str(console))}'/><target port='0'/></serial>
    <channel type='unix'>
      <source mode='bind' path='{escape(str(agent_socket))}'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>"""


@dataclass
class LvDomain:
    """The session's lab domain."""

    name: str
    lab_dir: Path
    disks: dict[str, Path]  # target -> image
    formats: dict[str, str]
    conn: Any  # libvirt.virConnect (the fixture's own connection)

    @property
    def uri(self) -> str:
        return f"libvirt:///system/{self.name}"

    def dom(self) -> Any:
        import libvirt

        try:
            return self.conn.lookupByName(self.name)
        except libvirt.libvirtError:
            # the connection died (libvirtd restarted by a test): open a fresh one
            self.conn = libvirt.open(CONN_URI)
            return self.conn.lookupByName(self.name)

    def channel_xml(self) -> str:
        return (f"<channel type='unix'><source mode='bind' "
                f"path='{escape(str(self.lab_dir / 'qga.sock'))}'/><target type='virtio' "
                "name='org.qemu.guest_agent.0'/></channel>")

    # -- guest agent through libvirt ----------------------------------------------------
    def agent(self, command: str, args: dict[str, Any] | None = None,
              timeout: int = 30) -> Any:
        import libvirt_qemu

        msg: dict[str, Any] = {"execute": command}
        if args:
            msg["arguments"] = args
        out = libvirt_qemu.qemuAgentCommand(self.dom(), json.dumps(msg), timeout, 0)
        return json.loads(out)["return"]

    def exec_wait(self, path: str, args: list[str], timeout: float = 60.0
                  ) -> tuple[int, bytes, bytes]:
        pid = self.agent("guest-exec", {"path": path, "arg": args, "capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.agent("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                return (int(st.get("exitcode", -1)), base64.b64decode(st.get("out-data", "")),
                        base64.b64decode(st.get("err-data", "")))
            time.sleep(0.1)
        raise TimeoutError(f"guest command {path} {args} did not finish in {timeout} s")

    def sh(self, script: str, timeout: float = 60.0) -> bytes:
        code, out, err = self.exec_wait("/bin/sh", ["-c", script], timeout)
        assert code == 0, f"guest: {script!r} exited {code}: {err!r}"
        return out

    def write_file(self, path: str, data: bytes, sync: bool = True) -> None:
        """Write a guest file in pieces of at most 32 KiB (one large guest-file-write
        hangs the agent), then ``sync``."""
        h = self.agent("guest-file-open", {"path": path, "mode": "w"})
        try:
            for off in range(0, len(data), 32 * 1024):
                piece = data[off:off + 32 * 1024]
                self.agent("guest-file-write",
                           {"handle": h, "buf-b64": base64.b64encode(piece).decode()})
        finally:
            self.agent("guest-file-close", {"handle": h})
        if sync:
            self.sh("sync")

    def freeze_status(self) -> str:
        return str(self.agent("guest-fsfreeze-status", timeout=10))

    def wait_agent(self, timeout: float = BOOT_TIMEOUT) -> None:
        import libvirt

        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                self.agent("guest-ping", timeout=2)
                # the workload starts right after the agent: wait for its first write
                if self.sh("[ -s /data0/workload.log ] && echo ok || true").strip() == b"ok":
                    return
            except libvirt.libvirtError as e:
                last = str(e)
            time.sleep(0.5)
        raise TimeoutError(f"the lab domain's agent did not answer in {timeout} s: {last}")

    def start(self) -> None:
        dom = self.dom()
        if not dom.isActive():
            dom.create()
        self.wait_agent()

    def shutdown(self, timeout: float = 60.0) -> None:
        dom = self.dom()
        if not dom.isActive():
            return
        # The lab's init ignores ACPI: unmount (clean ext4) and power off from inside.
        with contextlib.suppress(Exception):
            self.agent("guest-exec", {"path": "/bin/sh", "arg": [
                "-c", "sync; umount /data0 /data1; poweroff -f"]})
        deadline = time.monotonic() + timeout
        while dom.isActive() and time.monotonic() < deadline:
            time.sleep(0.3)
        if dom.isActive():
            dom.destroy()


def backup_job_xml(d: LvDomain) -> str | None:
    import libvirt

    try:
        return str(d.dom().backupGetXMLDesc(0))
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_BACKUP:
            return None
        raise


def checkpoints(d: LvDomain) -> list[str]:
    return sorted(c.getName() for c in d.dom().listAllCheckpoints(0))


def assert_domain_clean(d: LvDomain, work_dir: Path) -> None:
    """The hard rule: running, thawed, no backup job, no scratch file, no NBD socket."""
    import libvirt

    dom = d.dom()
    state, _reason = dom.state()
    assert state == libvirt.VIR_DOMAIN_RUNNING, f"domain state {state}"
    assert backup_job_xml(d) is None, "a backup job is still running"
    assert d.freeze_status() == "thawed"
    left = [p.name for p in work_dir.glob("*") if p.name.endswith((".scratch", ".sock"))]
    assert left == [], left


@pytest.fixture(scope="module")
def lv_domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LvDomain]:
    why = libvirt_missing()
    if why:
        pytest.skip(f"libvirt lab unavailable: {why}")
    import libvirt

    from snapferry.lab.initramfs import build_initramfs

    libvirt.registerErrorHandler(lambda _c, _e: None, None)  # errors are raised, not printed

    lab_dir = Path(tempfile.mkdtemp(prefix="sflv-"))
    started_here = libvirtd_pid() is None
    libvirtd_up()
    conn = libvirt.open(CONN_URI)
    name = f"sf-lab-{os.getpid()}"
    kernel, initrd = build_initramfs(lab_dir / "build")
    disks = {"vda": lab_dir / "vda.qcow2", "vdb": lab_dir / "vdb.raw"}
    formats = {"vda": "qcow2", "vdb": "raw"}
    for i, (t, p) in enumerate(disks.items()):
        make_disk(p, formats[t], f"data{i}")
    xml = domain_xml(name, kernel.image, initrd, [(disks[t], formats[t]) for t in disks],
                     lab_dir / "qga.sock", lab_dir / "console.log")
    conn.defineXML(xml)
    d = LvDomain(name=name, lab_dir=lab_dir, disks=disks, formats=formats, conn=conn)
    try:
        d.start()
        yield d
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dom = d.dom()
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        with contextlib.suppress(libvirt.libvirtError):
            d.conn.close()
        if started_here:
            libvirtd_down()
        shutil.rmtree(lab_dir, ignore_errors=True)
