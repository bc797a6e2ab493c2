"""Build the lab VM's initramfs (cpio newc, gzip) from packages installed on the host.

Contents: busybox-static, the virtio + ext4 kernel modules of the chosen kernel,
``qemu-ga`` with its shared libraries (found with ``ldd``), an init script, an fsfreeze
hook that a test can switch to failing, and a small write workload. The archive is
written by this module (no staging directory, deterministic output) and cached under
``<build_dir>/initramfs-<kernel version>-<hash>.cpio.gz``.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from snapferry.engine.errors import SnapferryError

# Dependency order (no modprobe/depmod in the guest).
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "crc16",
    "crc32c_generic",
    "mbcache",
    "jbd2",
    "ext4",
)

# File a test writes "1" into (through the agent) to make the next freeze fail. It lives
# in the initramfs root (ramfs), which is never frozen, so the hook can read it while
# the data disks are frozen.
FAIL_FREEZE_FLAG = "/run/snapferry-fail-freeze"

FSFREEZE_HOOK = f"""#!/bin/sh
# snapferry lab fsfreeze hook: called by qemu-ga with "freeze" or "thaw".
if [ "$1" = freeze ] && [ "$(cat {FAIL_FREEZE_FLAG} 2>/dev/null)" = 1 ]; then
    echo "snapferry lab hook: freeze refused ({FAIL_FREEZE_FLAG} is 1)" >&2
    exit 1
fi
exit 0
"""

INIT_SCRIPT = """#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /run /tmp
log() { echo "snapferry-lab: $*" > /dev/ttyS0; }
for m in $(cat /etc/snapferry/modules); do
    insmod /lib/modules/$m.ko || log "insmod $m failed"
done
ndisks=0
for w in $(cat /proc/cmdline); do
    case "$w" in snapferry.disks=*) ndisks=${w#snapferry.disks=} ;; esac
    case "$w" in snapferry.workload=1) workload=1 ;; esac
done
i=0
while [ $i -lt $ndisks ]; do
    dev=/dev/vd$(echo abcdefghijklmnop | cut -c$((i + 1)))
    n=0
    while [ ! -b $dev ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    mkdir -p /data$i
    if mount -t ext4 $dev /data$i; then log "mounted $dev on /data$i"
    else log "mount $dev failed"; fi
    i=$((i + 1))
done
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
    name=$(cat $p/name 2>/dev/null)
    [ -n "$name" ] && ln -sf ../${p##*/} /dev/virtio-ports/$name
done
echo 0 > /run/snapferry-fail-freeze
/usr/sbin/qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 \\
    --fsfreeze-hook=/etc/qemu/fsfreeze-hook -t /run -f /run/qemu-ga.pid \\
    -l /run/qemu-ga.log &
if [ "$workload" = 1 ] && grep -q " /data0 " /proc/mounts; then
    (
        mkdir -p /data0/w
        seq=0
        while :; do
            seq=$((seq + 1))
            echo "seq $seq" >> /data0/workload.log
            echo "$seq" > /data0/w/f$((seq % 64))
            sync
            sleep 0.2
        done
    ) &
fi
log "ready"
while :; do sleep 3600; done
"""


@dataclass(frozen=True)
class Kernel:
    version: str
    image: Path
    modules_dir: Path


def find_kernel() -> Kernel:
    """The newest /boot/vmlinuz-<ver> that has the lab's modules in /lib/modules/<ver>.

    ``SNAPFERRY_LAB_KERNEL`` (a version string) overrides the choice.
    """
    wanted = os.environ.get("SNAPFERRY_LAB_KERNEL")
    candidates = []
    for image in Path("/boot").glob("vmlinuz-*"):
        ver = image.name.removeprefix("vmlinuz-")
        if wanted and ver != wanted:
            continue
        mdir = Path("/lib/modules") / ver
        if mdir.is_dir() and os.access(image, os.R_OK):
            candidates.append(Kernel(ver, image, mdir))
    if not candidates:
        raise SnapferryError(
            "no usable kernel for the lab VM: install linux-image-amd64 "
            "(needs /boot/vmlinuz-<ver> and /lib/modules/<ver>)"
        )

    def key(k: Kernel) -> list[int]:
        return [int(x) for x in re.findall(r"\d+", k.version)]

    return max(candidates, key=key)


def _find_module(kernel: Kernel, name: str) -> Path:
    for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        hits = sorted(kernel.modules_dir.rglob(name + suffix))
        if hits:
            return hits[0]
    raise SnapferryError(f"kernel module {name} not found under {kernel.modules_dir}")


def _module_bytes(path: Path) -> bytes:
    """Module content, decompressed on the host (busybox insmod takes plain .ko)."""
    if path.name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())
    return path.read_bytes()


def _shared_libs(binary: str) -> list[Path]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs: list[Path] = []
    for line in out.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


class _Cpio:
    """Minimal writer of the cpio 'newc' format the kernel unpacks."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1
        self._seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        name = name.lstrip("/")
        if name in self._seen:
            return
        self._seen.add(name)
        namez = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0)
        self._ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._parts.append(hdr + namez + b"\0" * (-(110 + len(namez)) % 4))
        self._parts.append(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        parent = name.strip("/").rsplit("/", 1)
        if len(parent) == 2:
            self.dir(parent[0])
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        parent = name.strip("/").rsplit("/", 1)
        if len(parent) == 2:
            self.dir(parent[0])
        self._entry(name, 0o120777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def _host_file(cpio: _Cpio, path: Path) -> None:
    """Copy a host file into the archive at the same path, keeping symlinks as such."""
    if path.is_symlink():
        target = os.readlink(path)
        cpio.symlink(str(path), target)
        _host_file(cpio, (path.parent / target) if not target.startswith("/") else Path(target))
        return
    cpio.file(str(path), path.read_bytes(), 0o755 if os.access(path, os.X_OK) else 0o644)


def build_initramfs(build_dir: Path) -> tuple[Kernel, Path]:
    """Return the kernel and the cached initramfs for it, building it if needed."""
    kernel = find_kernel()
    busybox = shutil.which("busybox")
    qemu_ga = shutil.which("qemu-ga") or ("/usr/sbin/qemu-ga" if Path("/usr/sbin/qemu-ga").exists()
                                          else None)
    if busybox is None:
        raise SnapferryError("busybox not found: install busybox-static for the lab VM")
    if qemu_ga is None:
        raise SnapferryError("qemu-ga not found: install qemu-guest-agent for the lab VM")
    recipe = hashlib.sha256(
        "\0".join([INIT_SCRIPT, FSFREEZE_HOOK, *MODULES, busybox, qemu_ga]).encode()
    ).hexdigest()[:16]
    out = build_dir / f"initramfs-{kernel.version}-{recipe}.cpio.gz"
    if out.exists():
        return kernel, out

    cpio = _Cpio()
    for d in ("dev", "proc", "sys", "run", "tmp", "etc/qemu", "etc/snapferry", "bin", "sbin",
              "usr/bin", "usr/sbin", "lib/modules"):
        cpio.dir(d)
    cpio.symlink("var/run", "/run")
    bb = Path(busybox).read_bytes()
    cpio.file("bin/busybox", bb, 0o755)
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            cpio.symlink(f"bin/{applet}", "busybox")
    for name in MODULES:
        cpio.file(f"lib/modules/{name}.ko", _module_bytes(_find_module(kernel, name)))
    cpio.file("etc/snapferry/modules", ("\n".join(MODULES) + "\n").encode())
    cpio.file("usr/sbin/qemu-ga", Path(qemu_ga).read_bytes(), 0o755)
    for lib in _shared_libs(qemu_ga):
        _host_file(cpio, lib)
    cpio.file("etc/qemu/fsfreeze-hook", FSFREEZE_HOOK.encode(), 0o755)
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)

    build_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
    tmp.replace(out)
    return kernel, out
