"""VM targets: turn a user's SOURCE string into a ``Hypervisor``.

Accepted forms:
- ``qemu+unix:///PATH/qmp.sock?agent=/PATH/qga.sock[&name=NAME]`` — a running QEMU VM.
- ``vsphere://USER@HOST[:PORT]/VM_NAME_OR_MOREF?thumbprint=...`` — a vSphere VM.
- ``libvirt:///system/DOMAIN``, ``qemu:///system/DOMAIN``, ``qemu+ssh://HOST/system/DOMAIN``
  — a libvirt domain (``snapferry.engine.libvirt.uri``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

from snapferry.engine.errors import UsageError
from snapferry.engine.hypervisor import Hypervisor
from snapferry.engine.libvirt.uri import LIBVIRT_SCHEMES
from snapferry.engine.progress import NullProgress, Progress
from snapferry.engine.sources import split_uri

VM_SCHEMES = ("qemu+unix", "vsphere", *LIBVIRT_SCHEMES)


def is_vm_target(source: str) -> bool:
    """A SOURCE string naming a VM (backed up through the coordinator). The CLI's own
    ``lab`` target is resolved by the CLI, not here."""
    return "://" in source and split_uri(source).scheme.lower() in VM_SCHEMES


@dataclass(frozen=True)
class QemuTarget:
    qmp_socket: str
    agent_socket: str | None
    name: str | None


def parse_qemu_uri(uri: str) -> QemuTarget:
    parts = split_uri(uri)
    if parts.scheme != "qemu+unix" or not parts.path:
        raise UsageError(
            f"not a QEMU target: {uri!r} (expected qemu+unix:///PATH/qmp.sock?agent=PATH)"
        )
    if parts.netloc:
        raise UsageError(f"{uri!r}: qemu+unix takes no host (use three slashes)")
    q = parse_qs(parts.query)
    unknown = set(q) - {"agent", "name"}
    if unknown:
        raise UsageError(f"{uri!r}: unknown parameter(s) {', '.join(sorted(unknown))}")
    agent = q.get("agent", [None])[-1]
    name = q.get("name", [None])[-1]
    if not Path(parts.path).exists():
        raise UsageError(f"QMP socket {parts.path} does not exist: is the VM running?")
    return QemuTarget(parts.path, agent, name)


def work_dir_for(key: str) -> Path:
    """A per-VM work directory for overlays and the backend's crash-recovery state."""
    base = os.environ.get("SNAPFERRY_WORK_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "snapferry" / "work"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    d = root / digest
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass
class VsphereCliOptions:
    vddk_libdir: str | None = None
    transport: str | None = None  # "vddk" | "nbd"
    nbd_uri: str | None = None
    vddk_transports: str | None = None


@dataclass
class TargetOptions:
    agent_timeout: float = 10.0
    qemu_strategy: str = "overlay"  # "overlay" (snapshot + block-commit) | "fleecing"
    vsphere: VsphereCliOptions = field(default_factory=VsphereCliOptions)
    progress: Progress = field(default_factory=NullProgress)
    work_dir: Path | None = None  # QEMU: overlays + crash state; default per QMP socket
    reads_disks: bool = True  # False (cleanup): no disk transport needed (vSphere: VDDK)


def open_hypervisor(source: str, options: TargetOptions | None = None) -> Hypervisor:
    """The backend for ``source`` (see the module doc); raises UsageError otherwise."""
    opts = options or TargetOptions()
    scheme = split_uri(source).scheme
    if scheme == "qemu+unix":
        t = parse_qemu_uri(source)
        return _qemu(t, opts.work_dir or work_dir_for(t.qmp_socket), opts)
    if scheme == "vsphere":
        return _vsphere(source, opts)
    if scheme in LIBVIRT_SCHEMES:
        return _libvirt(source, opts)
    raise UsageError(f"not a VM target: {source!r}")


def _qemu(t: QemuTarget, work_dir: Path, opts: TargetOptions) -> Hypervisor:
    from snapferry.engine.qemu.backend import QemuHypervisor

    cls: type[QemuHypervisor] = QemuHypervisor
    if opts.qemu_strategy == "fleecing":
        from snapferry.engine.qemu.fleecing import QemuFleecingHypervisor

        cls = QemuFleecingHypervisor
    elif opts.qemu_strategy != "overlay":
        raise UsageError(f"unknown QEMU strategy {opts.qemu_strategy!r}: overlay or fleecing")
    work_dir.mkdir(parents=True, exist_ok=True)
    name = t.name
    if name is None:
        name = Path(t.qmp_socket).parent.name or Path(t.qmp_socket).stem
    return cls(
        t.qmp_socket,
        t.agent_socket,
        work_dir=work_dir,
        name=name,
        agent_timeout=opts.agent_timeout,
        progress=opts.progress,
    )


def _libvirt(source: str, opts: TargetOptions) -> Hypervisor:
    from snapferry.engine.libvirt.backend import LibvirtHypervisor
    from snapferry.engine.libvirt.uri import parse_libvirt_uri

    t = parse_libvirt_uri(source)
    return LibvirtHypervisor(t, work_dir=work_dir_for(t.key), progress=opts.progress)


def _vsphere(source: str, opts: TargetOptions) -> Hypervisor:
    from snapferry.engine.vsphere.backend import VsphereHypervisor, VsphereOptions
    from snapferry.engine.vsphere.uri import parse_vsphere_uri

    target = parse_vsphere_uri(source)
    vo = opts.vsphere
    transport = vo.transport or target.transport or "vddk"
    if transport not in ("vddk", "nbd"):
        raise UsageError(f"unknown vSphere transport {transport!r}: vddk or nbd")
    # the command line's --transport wins over the URI's transport= (the backend reads
    # the target's)
    target = dataclasses.replace(target, transport="nbd" if transport == "nbd" else "vddk")
    if not opts.reads_disks:
        return VsphereHypervisor(target, options=VsphereOptions(progress=opts.progress))
    if transport == "nbd" and not vo.nbd_uri:
        raise UsageError(
            "--transport nbd needs --nbd-uri (the nbdkit vddk export, e.g. "
            "'nbd+unix:///{disk}?socket=/run/nbdkit.sock')"
        )
    if transport == "vddk" and not vo.vddk_libdir:
        raise UsageError(
            "reading vSphere disks needs VDDK: pass --vddk-libdir DIR (or --transport nbd "
            "with --nbd-uri)"
        )
    if transport == "vddk" and vo.vddk_libdir:
        from snapferry.native.vddk import reexec_if_needed

        reexec_if_needed(vo.vddk_libdir)
    options = VsphereOptions(
        vddk_libdir=vo.vddk_libdir if transport == "vddk" else None,
        vddk_transport_modes=vo.vddk_transports,
        nbd_uri=vo.nbd_uri if transport == "nbd" else None,
        progress=opts.progress,
    )
    return VsphereHypervisor(target, options=options)
