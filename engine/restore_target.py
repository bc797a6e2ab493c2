"""Restore targets: what format to write, whether it is safe to write, block devices.

* Format: ``--format`` when given, else inferred from the target's name (``.qcow2`` →
  qcow2; ``.raw``, ``.img`` and anything else → raw). A block device takes raw only.
* In use: a target that a running process holds open is refused (restoring over the
  image of a running VM loses everything the VM writes afterwards: it keeps writing to
  the old, replaced file). Two probes: the open files of every process this host shows
  in ``/proc/*/fd`` (same device and inode, or the same block device), and QEMU's
  image lock (``qemu-img info`` without ``-U`` fails while a QEMU holds the image for
  writing, even from another mount namespace). ``force_in_use`` skips both.
* Block devices: written in place (there is no temp file to rename): every chunk at its
  offset, and every all-zero range explicitly zeroed (``BLKZEROOUT``, or zeros written),
  since the device holds old data. The device must be at least the disk's size; bytes
  past it are left as they are. ``O_EXCL`` makes the kernel refuse a device that is
  mounted or otherwise claimed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from snapferry.engine.errors import SnapferryError, UsageError
from snapferry.engine.progress import NullProgress, Progress
from snapferry.engine.restore import (
    RestoreFormat,
    RestoreResult,
    copy_into,
    open_source,
    pick_disk,
    reading_for_restore,
)
from snapferry.engine.store.repo import Repository

FORMATS: tuple[RestoreFormat, ...] = ("raw", "qcow2")
_BY_SUFFIX: dict[str, RestoreFormat] = {
    ".qcow2": "qcow2", ".qcow": "qcow2", ".raw": "raw", ".img": "raw",
}
_BLKZEROOUT = 0x127F  # _IO(0x12, 127)
_ZERO_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class Holder:
    """A process that has the target open."""

    pid: int
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command})" if self.command else f"pid {self.pid}"


def is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def infer_format(to: Path, fmt: str | None) -> RestoreFormat:
    """The format to write ``to`` in: ``fmt``, else from the name (raw by default)."""
    if fmt is not None:
        known = [f for f in FORMATS if f == fmt]
        if not known:
            raise UsageError(f"unknown restore format {fmt!r} ({' or '.join(FORMATS)})")
        if fmt != "raw" and is_block_device(to):
            raise UsageError(f"block device {to} takes --format raw only, not {fmt}")
        return known[0]
    if is_block_device(to):
        return "raw"
    return _BY_SUFFIX.get(to.suffix.lower(), "raw")


def _command(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def proc_holders(target: Path) -> list[Holder]:
    """Processes with ``target`` open, from ``/proc/*/fd`` (those this user may see)."""
    try:
        st = os.stat(target)
    except OSError:
        return []
    block = stat.S_ISBLK(st.st_mode)
    me = os.getpid()
    out: list[Holder] = []
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    for pid in pids:
        if int(pid) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or not ours to see
        for fd in fds:
            try:
                fst = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            same = (
                stat.S_ISBLK(fst.st_mode) and fst.st_rdev == st.st_rdev
                if block
                else (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino)
            )
            if same:
                out.append(Holder(int(pid), _command(pid)))
                break
    return out


def qemu_lock_held(target: Path) -> bool:
    """True when a QEMU holds ``target``'s image lock (qemu-img cannot open it)."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None or not target.exists():
        return False
    try:
        r = subprocess.run(
            [qemu_img, "info", "--output=json", str(target)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    text = r.stderr.lower()
    return r.returncode != 0 and ("lock" in text or "another process using the image" in text)


def check_not_in_use(target: Path, *, force_in_use: bool = False) -> None:
    """``UsageError`` when a running process holds ``target`` open (unless forced)."""
    if force_in_use or not (target.exists() or target.is_symlink()):
        return
    holders = proc_holders(target)
    locked = qemu_lock_held(target)
    if not holders and not locked:
        return
    who = ", ".join(map(str, holders[:3])) if holders else "a QEMU process (image lock held)"
    raise UsageError(
        f"restore target {target} is in use by {who}: writing over it would lose what that "
        "process writes (a running VM keeps writing to the replaced image); stop it first, "
        "restore to another path, or pass --force-in-use"
    )


def _zero_range(fd: int, offset: int, length: int) -> None:
    """Make ``[offset, offset+length)`` of a block device read as zeros."""
    try:
        fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
        return
    except OSError:
        pass
    zeros = bytes(min(_ZERO_BLOCK, length))
    end = offset + length
    while offset < end:
        n = os.pwrite(fd, memoryview(zeros)[: min(len(zeros), end - offset)], offset)
        offset += n


def restore_to_device(
    repo: Repository,
    backup_id: str,
    *,
    device: Path,
    disk: str | None = None,
    workers: int = 0,
    progress: Progress = NullProgress(),
) -> RestoreResult:
    """Write one disk of ``backup_id`` onto the block device ``device``, in place,
    holding the shared role (FORMAT.md D8)."""
    return reading_for_restore(repo, progress, lambda: _restore_device(
        repo, backup_id, device=device, disk=disk, workers=workers, progress=progress))


def _restore_device(
    repo: Repository,
    backup_id: str,
    *,
    device: Path,
    disk: str | None,
    workers: int,
    progress: Progress,
) -> RestoreResult:
    t0 = time.monotonic()
    manifest = repo.load_manifest(backup_id)
    name = pick_disk(manifest, disk)
    src, index = open_source(repo, backup_id, name, manifest)
    try:
        fd = os.open(device, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise UsageError(
                f"block device {device} is busy (mounted, or claimed by the kernel)"
            ) from None
        raise SnapferryError(f"cannot open block device {device}: {e.strerror or e}") from None
    progress.start(f"restore {backup_id} {name}", index.nonzero_count() * index.chunk_size)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size < index.virtual_size:
            raise UsageError(
                f"block device {device} holds {size} bytes, less than the disk's "
                f"{index.virtual_size}"
            )
        for ext in src.extents():  # page by page: memory does not grow with the disk
            if ext.zero:
                _zero_range(fd, ext.offset, ext.length)
        copied = copy_into(src, fd, workers, progress, device)
        os.fsync(fd)
    except OSError as e:
        raise SnapferryError(f"cannot write block device {device}: {e.strerror or e}") from None
    finally:
        src.close()
        with contextlib.suppress(OSError):
            os.close(fd)
        progress.finish()
    return RestoreResult(
        backup_id=backup_id,
        vm=manifest.vm,
        disk=name,
        path=str(device),
        format="raw",
        virtual_size=index.virtual_size,
        chunks=len(index),
        zero_chunks=index.zero_count(),
        unique_chunks=copied.unique_chunks,
        bytes_written=copied.bytes_written,
        seconds=round(time.monotonic() - t0, 4),
        workers=copied.workers,
        direct_io=copied.direct_io,
    )


def restore_to(
    repo: Repository,
    backup_id: str,
    *,
    to: Path,
    disk: str | None = None,
    fmt: str | None = None,
    force: bool = False,
    force_in_use: bool = False,
    workers: int = 0,
    progress: Progress = NullProgress(),
) -> RestoreResult:
    """Restore onto ``to`` whatever it is: the format from ``fmt`` or the name, refused
    while a process holds ``to`` open (unless ``force_in_use``); a block device in
    place (needs ``force``: its contents are replaced), a file through ``restore``."""
    from snapferry.engine.restore import restore

    out_fmt = infer_format(to, fmt)
    check_not_in_use(to, force_in_use=force_in_use)
    if is_block_device(to) and not force:
        raise UsageError(
            f"restore target {to} is a block device: its contents will be overwritten "
            "(use --force to do so)"
        )
    if is_block_device(to):
        return restore_to_device(repo, backup_id, device=to, disk=disk, workers=workers,
                                 progress=progress)
    return restore(repo, backup_id, to=to, disk=disk, fmt=out_fmt, force=force,
                   workers=workers, progress=progress)
