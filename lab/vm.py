"""The lab VM: a real QEMU guest with a real guest agent, for tests and the demo.

Built only from installed Debian packages (see ``snapferry.lab.initramfs``): the Debian
kernel, an initramfs with busybox, the virtio/ext4 modules and qemu-ga. Data disks are
qcow2 images holding ext4 made on the host, attached with ``-blockdev`` (node names
``lab-disk<N>`` over ``lab-file<N>``) to ``virtio-blk-pci`` devices ``disk<N>``, mounted
in the guest on ``/data<N>``. A workload in the guest keeps writing to ``/data0``
(append to ``workload.log`` and rewrite one of 64 small files every 200 ms, ``sync``).

Two QMP sockets: ``qmp.sock`` for the backup tool and ``lab-qmp.sock`` for the lab
commands (QEMU's QMP socket serves one client at a time), plus ``qga.sock`` for the
agent. The guest console goes to ``console.log``.

Accelerator: TCG by default. ``/dev/kvm`` exists on the machines this was built on,
but the guest kernel hangs under (nested) KVM there; TCG boots to a running agent in a
few seconds. ``SNAPFERRY_ACCEL=kvm`` (or ``auto``: probe KVM with a short deadline for
the agent and fall back to TCG; the verdict is kept in ``accel`` in the lab dir)
overrides.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from snapferry.engine.errors import SnapferryError
from snapferry.engine.procs import process_alive
from snapferry.engine.qemu.agent import AgentError, GuestAgent
from snapferry.engine.qemu.qmp import Qmp
from snapferry.lab.initramfs import FAIL_FREEZE_FLAG, build_initramfs

BOOT_TIMEOUT = float(os.environ.get("SNAPFERRY_LAB_BOOT_TIMEOUT", "120"))
KVM_PROBE_TIMEOUT = 20.0


class LabError(SnapferryError):
    """The lab VM could not be built, started or reached."""


@dataclass
class LabVm:
    lab_dir: Path
    qmp_socket: str
    agent_socket: str
    control_socket: str
    pid: int
    disks: list[str]
    accel: str
    boot_seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"qemu+unix://{self.qmp_socket}?agent={self.agent_socket}"


def default_lab_dir() -> Path:
    env = os.environ.get("SNAPFERRY_LAB_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "snapferry" / "lab"


def _dir(lab_dir: Path | str | None) -> Path:
    return Path(lab_dir) if lab_dir is not None else default_lab_dir()



def _read_pid(d: Path) -> int | None:
    try:
        pid = int((d / "qemu.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if process_alive(pid) else None


def _make_disk(path: Path, size: str, label: str) -> None:
    raw = path.with_suffix(".raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), size], check=True)
    try:
        subprocess.run(["mkfs.ext4", "-F", "-q", "-L", label,
                        "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", str(raw)],
                       check=True, capture_output=True)
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                        str(path)], check=True)
    finally:
        raw.unlink(missing_ok=True)


def _accel_choice(d: Path) -> str:
    env = os.environ.get("SNAPFERRY_ACCEL", "tcg").lower()
    if env in ("tcg", "kvm"):
        return env
    if env != "auto":
        raise LabError(f"SNAPFERRY_ACCEL={env}: expected tcg, kvm or auto")
    verdict = d / "accel"
    if verdict.exists():
        return verdict.read_text().strip()
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    return "probe-kvm"


def _qemu_cmd(d: Path, kernel: Path, initrd: Path, disks: list[Path], accel: str,
              workload: bool) -> list[str]:
    cmd = [
        "qemu-system-x86_64", "-name", "snapferry-lab", "-nodefaults", "-no-user-config",
        "-machine", "pc", "-accel", accel, "-m", "256", "-smp", "1",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", f"console=ttyS0 panic=-1 quiet snapferry.disks={len(disks)}"
                   f" snapferry.workload={int(workload)}",
        "-display", "none", "-serial", f"file:{d / 'console.log'}", "-monitor", "none",
        "-no-reboot", "-net", "none",
        "-qmp", f"unix:{d / 'qmp.sock'},server=on,wait=off",
        "-qmp", f"unix:{d / 'lab-qmp.sock'},server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=qga0,path={d / 'qga.sock'},server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ]
    for i, disk in enumerate(disks):
        cmd += [
            "-blockdev", f"driver=file,node-name=lab-file{i},filename={disk}",
            "-blockdev", f"driver=qcow2,node-name=lab-disk{i},file=lab-file{i}",
            "-device", f"virtio-blk-pci,drive=lab-disk{i},id=disk{i}",
        ]
    cmd += ["-daemonize", "-pidfile", str(d / "qemu.pid")]
    return cmd


def _wait_agent(agent_socket: str, pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not process_alive(pid):
            raise LabError("the lab VM exited during boot (see console.log in the lab dir)")
        try:
            with GuestAgent(agent_socket, timeout=2.0) as ga:
                # The agent answers before the workload's first write: wait for it.
                ga.call("guest-ping", timeout=2.0)
                return
        except AgentError as e:
            last = str(e)
            time.sleep(0.3)
    raise LabError(f"the lab VM's guest agent did not answer within {timeout:.0f} s ({last})")


def _boot(d: Path, kernel: Path, initrd: Path, disks: list[Path], accel: str,
          workload: bool, timeout: float) -> tuple[int, float]:
    for sock in ("qmp.sock", "lab-qmp.sock", "qga.sock"):
        (d / sock).unlink(missing_ok=True)
    (d / "console.log").unlink(missing_ok=True)
    t0 = time.monotonic()
    r = subprocess.run(_qemu_cmd(d, kernel, initrd, disks, accel, workload),
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"qemu-system-x86_64 failed to start: {r.stderr.strip().splitlines()[-1:]}")
    pid = _read_pid(d)
    if pid is None:
        raise LabError("qemu-system-x86_64 started but left no live pid")
    try:
        _wait_agent(str(d / "qga.sock"), pid, timeout)
    except LabError:
        _stop(d, pid, grace=2.0)
        raise
    return pid, time.monotonic() - t0


def _vm(d: Path, pid: int, accel: str, boot_seconds: float = 0.0) -> LabVm:
    disks = sorted(d.glob("disk*.qcow2"), key=lambda p: int(p.stem.removeprefix("disk")))
    return LabVm(
        lab_dir=d, qmp_socket=str(d / "qmp.sock"), agent_socket=str(d / "qga.sock"),
        control_socket=str(d / "lab-qmp.sock"), pid=pid, disks=[str(p) for p in disks],
        accel=accel, boot_seconds=boot_seconds,
    )


def lab_up(lab_dir: Path | str | None = None, *, disks: int | None = None,
           disk_size: str = "256M", workload: bool = True) -> LabVm:
    """Build (cached) and boot the lab VM; returns at once if it already runs.

    Existing data disks in the lab dir are reused (their persistent bitmaps with them);
    ``disks=None`` attaches as many as exist (at least one).
    """
    d = _dir(lab_dir)
    d.mkdir(parents=True, exist_ok=True)
    for tool in ("qemu-system-x86_64", "qemu-img", "mkfs.ext4"):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not found: install qemu-system-x86, qemu-utils, e2fsprogs")
    if len(str(d.resolve() / "lab-qmp.sock")) > 100:
        raise LabError(f"lab dir {d} is too long a path for its unix sockets (108 bytes max)")
    state_file = d / "lab.json"
    pid = _read_pid(d)
    if pid is not None:
        st = json.loads(state_file.read_text()) if state_file.exists() else {}
        return _vm(d, pid, st.get("accel", "?"))
    kernel, initrd = build_initramfs(d / "build")
    if disks is None:
        disks = max(1, len(list(d.glob("disk*.qcow2"))))
    paths = [d / f"disk{i}.qcow2" for i in range(disks)]
    for i, p in enumerate(paths):
        if not p.exists():
            _make_disk(p, disk_size, f"data{i}")
    accel = _accel_choice(d)
    if accel == "probe-kvm":
        try:
            pid, secs = _boot(d, kernel.image, initrd, paths, "kvm", workload, KVM_PROBE_TIMEOUT)
            accel = "kvm"
        except LabError:
            accel = "tcg"
            pid, secs = _boot(d, kernel.image, initrd, paths, "tcg", workload, BOOT_TIMEOUT)
        (d / "accel").write_text(accel + "\n")
    else:
        pid, secs = _boot(d, kernel.image, initrd, paths, accel, workload, BOOT_TIMEOUT)
    state_file.write_text(json.dumps({"accel": accel, "kernel": kernel.version,
                                      "initrd": str(initrd), "boot_seconds": secs,
                                      "workload": workload}))
    return _vm(d, pid, accel, secs)


def _stop(d: Path, pid: int, grace: float) -> None:
    deadline = time.monotonic() + grace
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if process_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    (d / "qemu.pid").unlink(missing_ok=True)


def lab_down(lab_dir: Path | str | None = None, *, purge: bool = False,
             timeout: float = 30.0) -> None:
    """Stop the lab VM with a clean QMP ``quit`` (persistent bitmaps are written to the
    qcow2 only on a clean close), kill it if it does not exit. ``purge`` also deletes
    the data disks."""
    d = _dir(lab_dir)
    pid = _read_pid(d)
    if pid is not None:
        q = Qmp(str(d / "lab-qmp.sock"), timeout=10.0)
        try:
            q.cmd("quit")
        except SnapferryError:
            pass  # the connection drops as QEMU quits; a dead socket: killed below
        finally:
            q.close()
        _stop(d, pid, grace=timeout)
    if purge:
        for p in d.glob("disk*.qcow2"):
            p.unlink()


def lab_status(lab_dir: Path | str | None = None) -> dict[str, Any]:
    d = _dir(lab_dir)
    pid = _read_pid(d)
    st: dict[str, Any] = json.loads((d / "lab.json").read_text()) if (d / "lab.json").exists() \
        else {}
    out: dict[str, Any] = {"lab_dir": str(d), "running": pid is not None, "pid": pid,
                           "accel": st.get("accel"), "kernel": st.get("kernel")}
    out["disks"] = [str(p) for p in sorted(d.glob("disk*.qcow2"))]
    if pid is None:
        return out
    vm = _vm(d, pid, st.get("accel", "?"))
    out["uri"] = vm.uri
    q = Qmp(vm.control_socket, timeout=10.0)
    try:
        out["status"] = q.cmd("query-status").get("status")
        bitmaps: dict[str, list[str]] = {}
        for node in q.cmd("query-named-block-nodes", {"flat": True}):
            if node.get("node-name", "").startswith("lab-disk"):
                bitmaps[node["node-name"]] = [b["name"] for b in node.get("dirty-bitmaps", [])]
        out["bitmaps"] = bitmaps
    except SnapferryError as e:
        out["status"] = f"QMP: {e}"
    finally:
        q.close()
    try:
        with GuestAgent(vm.agent_socket, timeout=5.0) as ga:
            out["agent"] = "ok"
            out["fsfreeze"] = ga.fsfreeze_status()
    except AgentError as e:
        out["agent"] = str(e)
    return out


def _running(lab_dir: Path | str | None) -> LabVm:
    d = _dir(lab_dir)
    pid = _read_pid(d)
    if pid is None:
        raise LabError(f"the lab VM is not running (lab dir {d}): run `snapferry lab up`")
    return _vm(d, pid, "?")


def lab_write(path_in_guest: str, data: bytes, lab_dir: Path | str | None = None,
              *, sync: bool = True) -> None:
    """Write ``data`` to a file in the guest through the agent, then ``sync``."""
    vm = _running(lab_dir)
    with GuestAgent(vm.agent_socket, timeout=30.0) as ga:
        ga.file_write(path_in_guest, data)
        if sync:
            code, _, err = ga.exec_wait("/bin/sync", timeout=30.0)
            if code != 0:
                raise LabError(f"sync in the guest failed: {err.decode(errors='replace')}")


def lab_read(path_in_guest: str, lab_dir: Path | str | None = None) -> bytes:
    vm = _running(lab_dir)
    with GuestAgent(vm.agent_socket, timeout=30.0) as ga:
        return ga.file_read(path_in_guest)


def lab_fail_freeze(enabled: bool, lab_dir: Path | str | None = None) -> None:
    """Make the guest's fsfreeze hook refuse (``enabled``) or allow the next freezes."""
    lab_write(FAIL_FREEZE_FLAG, b"1\n" if enabled else b"0\n", lab_dir, sync=False)


def lab_info(lab_dir: Path | str | None = None) -> dict[str, Any]:
    """The running lab VM as a plain dict (for ``--json``)."""
    vm = _running(lab_dir)
    out = asdict(vm)
    out["lab_dir"] = str(vm.lab_dir)
    out["uri"] = vm.uri
    return out


def lab_target(lab_dir: Path | str | None = None) -> tuple[str, Path]:
    """The running lab VM as a backup target: its ``qemu+unix://`` URI (restore points
    filed under ``lab``) and the work directory its overlays and state live in."""
    vm = _running(lab_dir)
    return f"{vm.uri}&name=lab", vm.lab_dir / "work"
