"""Turn a restore point back into a disk image (raw, sparse; or qcow2 via qemu-img).

Restore needs only the repository: every restore point's paged index is complete, so
no parent chain is walked. It is a copy from the restore point's ``DiskSource``
(``RestorePointSource.copy_to``, the one read path that ``serve``, ``instant`` and
``files`` use too): per window of index pages every distinct chunk is read once in pack
order (adjacent blobs in one ranged read), unsealed, decompressed and proven by its
keyed XXH3 id, by a pool of threads (zstd, AES-GCM, reads and writes release the GIL);
each thread decodes its task's chunks into one page-aligned buffer in disk order and
writes every stretch of disk-adjacent chunks with one ``pwrite``, with ``O_DIRECT`` on
a block device or a local disk file system (``engine/direct_write.py``). Null entries
and null pages stay holes (the file is ``ftruncate``-d to the virtual size).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from snapferry.engine.direct_write import direct_io_wanted, open_direct
from snapferry.engine.errors import SnapferryError, UsageError
from snapferry.engine.progress import NullProgress, Progress
from snapferry.engine.sources.restore_point import RestorePointSource
from snapferry.engine.store.index import DiskIndex
from snapferry.engine.store.manifest import Manifest
from snapferry.engine.store.repo import Repository

RestoreFormat = Literal["raw", "qcow2"]
WRITEBACK_EVERY = 32 << 20
"""Start the kernel's write-out of the target every this many bytes written."""
_SYNC_FILE_RANGE_WRITE = 2
_libc: ctypes.CDLL | None = None


class _Writeback:
    """Overlap the target's write-out to disk with decoding.

    Without it the final ``fdatasync`` waited for every dirty page at once: about half
    of a restore's time here. Every ``WRITEBACK_EVERY`` bytes the main thread asks the
    kernel to start writing the file's dirty pages (``sync_file_range`` with
    ``SYNC_FILE_RANGE_WRITE``: asynchronous, no metadata, no waiting for completion),
    so the final ``fdatasync`` finds little left to do. A no-op where the call is
    missing (non-Linux) or fails: the final ``fdatasync`` still gives durability.
    """

    def __init__(self, fd: int, every: int | None = None) -> None:
        global _libc
        self.fd = fd
        self.every = every if every is not None else WRITEBACK_EVERY
        self.pending = 0
        self.fn: Any = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                if _libc is None:
                    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
                fn = _libc.sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                self.fn = fn

    def wrote(self, n: int) -> None:
        self.pending += n
        if self.pending >= self.every and self.fn is not None:
            self.pending = 0
            if self.fn(self.fd, 0, 0, _SYNC_FILE_RANGE_WRITE) != 0:
                self.fn = None  # unsupported here (e.g. EINVAL, ESPIPE): stop trying


@dataclass(slots=True)
class RestoreResult:
    backup_id: str
    vm: str
    disk: str
    path: str
    format: str
    virtual_size: int
    chunks: int
    zero_chunks: int
    unique_chunks: int
    bytes_written: int
    seconds: float
    workers: int
    direct_io: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["throughput_mb_s"] = (
            round(self.virtual_size / self.seconds / 1e6, 1) if self.seconds > 0 else None
        )
        return d


def pick_disk(manifest: Manifest, disk: str | None) -> str:
    """The disk to restore: ``disk``, or the only disk of the restore point."""
    names = manifest.disk_names
    if disk is not None:
        if disk not in names:
            raise UsageError(
                f"restore point {manifest.backup_id} has no disk {disk!r} "
                f"(disks: {', '.join(names) or 'none'})"
            )
        return disk
    if len(names) == 1:
        return names[0]
    if not names:
        raise UsageError(f"restore point {manifest.backup_id} holds no disks")
    raise UsageError(
        f"restore point {manifest.backup_id} holds {len(names)} disks; choose one with "
        f"--disk ({', '.join(names)})"
    )


def open_source(
    repo: Repository, backup_id: str, disk: str, manifest: Manifest
) -> tuple[RestorePointSource, DiskIndex]:
    """The restore point's disk as a ``RestorePointSource`` (and its paged index)."""
    reader = repo.reader()
    index = repo.load_index(backup_id, disk, manifest, reader=reader)
    return RestorePointSource(index, reader, name=f"restore point {backup_id}, disk {disk}",
                              readahead_bytes=0), index


@dataclass(slots=True)
class Copied:
    unique_chunks: int
    bytes_written: int
    direct_io: bool  # written with O_DIRECT to the end
    workers: int


def auto_workers(direct: bool) -> int:
    """Restore threads when the user leaves it to us: with direct I/O a thread waits for
    the device during each of its writes, so there are more threads than CPUs (eight on
    two CPUs: 4.1-4.5 s for the issue-sized image, against 5.2-6.8 s with two)."""
    cpus = os.cpu_count() or 1
    return min(4 * cpus, 16) if direct else min(cpus, 8)


def copy_into(src: RestorePointSource, fd: int, workers: int, progress: Progress,
              path: str | os.PathLike[str] | None = None) -> Copied:
    """Copy ``src`` into ``fd`` (holes stay holes) with ``workers`` threads (0: chosen
    by ``auto_workers``). With ``path`` (the file or device ``fd`` is open on) the data
    goes through a second descriptor with ``O_DIRECT`` where the file system suits it
    (``engine/direct_write.py``); otherwise the target's write-out is overlapped with
    decoding (``_Writeback``)."""
    wb = _Writeback(fd)
    direct = open_direct(path) if path is not None and direct_io_wanted() else None
    nworkers = workers if workers > 0 else auto_workers(direct is not None)

    def advance(n: int) -> None:
        wb.wrote(n)
        progress.advance(n)

    try:
        res = src.copy_to(fd, workers=nworkers, advance=advance, direct_fd=direct)
    finally:
        if direct is not None:
            os.close(direct)
    return Copied(res.unique_chunks, res.bytes_written, res.direct, nworkers)


def reading_for_restore(repo: Repository, progress: Progress,
                        run: Callable[[], RestoreResult]) -> RestoreResult:
    """``run()`` holding the shared role, so that no prune deletes beneath the restore
    (FORMAT.md D8); a warning (read-only repository: no lock) goes to ``progress`` and
    into the result."""
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        progress.note(f"warning: {msg}")

    with repo.reading("restore", warn):
        result = run()
    result.warnings[:0] = warnings
    return result


def restore(
    repo: Repository,
    backup_id: str,
    *,
    to: Path,
    disk: str | None = None,
    fmt: RestoreFormat = "raw",
    force: bool = False,
    workers: int = 0,
    progress: Progress = NullProgress(),
) -> RestoreResult:
    """Restore one disk of restore point ``backup_id`` into the file ``to``.

    The image is built under a temporary name in the target directory and renamed into
    place only when complete and checked; on any failure nothing is left behind (and an
    existing target, replaced only with ``force``, is untouched).
    ``workers=0``: chosen by ``auto_workers``. Holds the shared role (a prune
    waits; FORMAT.md D8).
    """
    return reading_for_restore(repo, progress, lambda: _restore_file(
        repo, backup_id, to=to, disk=disk, fmt=fmt, force=force, workers=workers,
        progress=progress))


def _restore_file(
    repo: Repository,
    backup_id: str,
    *,
    to: Path,
    disk: str | None,
    fmt: RestoreFormat,
    force: bool,
    workers: int,
    progress: Progress,
) -> RestoreResult:
    if fmt not in ("raw", "qcow2"):
        raise UsageError(f"unknown restore format {fmt!r} (raw or qcow2)")
    to = Path(to)
    t0 = time.monotonic()
    manifest = repo.load_manifest(backup_id)
    name = pick_disk(manifest, disk)
    if to.is_dir():
        raise UsageError(f"restore target {to} is a directory; give a file name")
    if to.exists() or to.is_symlink():
        if not force:
            raise UsageError(f"restore target {to} exists (use --force to overwrite it)")
        if not to.is_file():
            raise UsageError(f"restore target {to} is not a regular file")
    if not to.parent.is_dir():
        raise UsageError(f"directory {to.parent} does not exist")
    qemu_img = shutil.which("qemu-img")
    if fmt == "qcow2" and qemu_img is None:
        raise UsageError("qcow2 output needs qemu-img (install qemu-utils)")
    src, index = open_source(repo, backup_id, name, manifest)

    tmp_raw = to.with_name(f".{to.name}.{os.getpid()}.restore-raw")
    tmp_out = to.with_name(f".{to.name}.{os.getpid()}.restore-{fmt}")
    cleanup = [tmp_raw, tmp_out]
    progress.start(f"restore {backup_id} {name}", index.nonzero_count() * index.chunk_size)
    entry = manifest.disk(name)
    try:
        try:
            fd = os.open(tmp_raw, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise SnapferryError(
                f"cannot create the restore target in {to.parent}: {e.strerror}"
            ) from None
        try:
            os.ftruncate(fd, index.virtual_size)
            copied = copy_into(src, fd, workers, progress, tmp_raw)
            if fmt == "raw":
                os.fdatasync(fd)
        finally:
            os.close(fd)
        if fmt == "qcow2":
            assert qemu_img is not None
            r = subprocess.run(
                [qemu_img, "convert", "-q", "-f", "raw", "-O", "qcow2", str(tmp_raw), str(tmp_out)],
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                msg = (r.stderr.strip().splitlines() or ["failed"])[-1]
                raise SnapferryError(f"qemu-img convert to qcow2 failed: {msg}")
            with open(tmp_out, "rb") as f:
                os.fsync(f.fileno())
            os.rename(tmp_out, to)
        else:
            os.rename(tmp_raw, to)
        with contextlib.suppress(OSError):
            dfd = os.open(to.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SnapferryError(f"disk full while writing the restore target {to}") from None
        raise SnapferryError(f"cannot write the restore target {to}: {e.strerror or e}") from None
    finally:
        src.close()
        for p in cleanup:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        progress.finish()
    return RestoreResult(
        backup_id=backup_id,
        vm=manifest.vm,
        disk=name,
        path=str(to),
        format=fmt,
        virtual_size=index.virtual_size,
        chunks=len(index),
        zero_chunks=entry.zero_chunks,
        unique_chunks=copied.unique_chunks,
        bytes_written=copied.bytes_written,
        seconds=round(time.monotonic() - t0, 4),
        workers=copied.workers,
        direct_io=copied.direct_io,
    )
