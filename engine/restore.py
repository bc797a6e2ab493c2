"""Turn a restore point back into a disk image (raw, sparse; or qcow2 via qemu-img).

Restore needs only the repository: every restore point's paged index is complete, so
no parent chain is walked. The disk's pages are streamed a window at a time; in each
window every distinct chunk is read once through the ``ChunkReader`` (in pack order),
decoded, proven by its keyed XXH3 id and ``pwrite``-n at every offset that uses it.
Null entries and null pages stay holes (the file is ``ftruncate``-d to the virtual
size). Decoding runs on a thread pool: zstd, reads and pwrite release the GIL.
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
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from snapferry.engine.errors import CorruptionError, SnapferryError, UsageError
from snapferry.engine.progress import NullProgress, Progress
from snapferry.engine.store.chunks import ChunkReader
from snapferry.engine.store.index import DiskIndex
from snapferry.engine.store.manifest import Manifest
from snapferry.engine.store.repo import Repository

RestoreFormat = Literal["raw", "qcow2"]
_IN_FLIGHT_PER_WORKER = 2  # batches queued per thread
BATCH_BYTES = 4 << 20
"""Chunks handed to a decode thread at once (4 MiB: 64 chunks of 64 KiB, 4 of 1 MiB)."""
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


WINDOW_PAGES = 16
"""Pages grouped at once (16 x 4096 entries): a chunk used in two windows is read twice."""


def _groups(ids: np.ndarray, base: int) -> list[tuple[bytes, np.ndarray]]:
    """(chunk id, chunk numbers using it) for the non-null entries of ``ids`` (chunk
    numbers start at ``base``)."""
    nz = np.flatnonzero(ids.any(axis=1))
    if nz.size == 0:
        return []
    rows = np.ascontiguousarray(ids[nz]).view(np.dtype((np.void, 16))).ravel()
    u, inverse, counts = np.unique(rows, return_inverse=True, return_counts=True)
    positions = nz[np.argsort(inverse.ravel(), kind="stable")] + base
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return [
        (bytes(u[k]), positions[starts[k] : starts[k] + counts[k]]) for k in range(len(u))
    ]


def _windows(index: DiskIndex) -> Iterator[tuple[int, np.ndarray]]:
    """(first chunk number, ids) of consecutive non-null pages, ``WINDOW_PAGES`` at most."""
    buf: list[np.ndarray] = []
    start = -1
    nxt = -1
    for p, arr in index.iter_pages():
        first = p * index.page_entries
        if arr is None or (buf and (first != nxt or len(buf) >= WINDOW_PAGES)):
            if buf:
                yield start, np.concatenate(buf)
                buf = []
            if arr is None:
                continue
        if not buf:
            start = first
        buf.append(arr)
        nxt = first + len(arr)
    if buf:
        yield start, np.concatenate(buf)


def _ordered(
    reader: ChunkReader, groups: list[tuple[bytes, np.ndarray]]
) -> list[tuple[bytes, np.ndarray]]:
    """The groups in pack order (sequential reads of each pack)."""
    if not groups:
        return groups
    ids = np.frombuffer(b"".join(g[0] for g in groups), dtype=np.uint8).reshape(-1, 16)
    rows = reader.index.locations_for(ids)
    t = reader.index.table
    safe = np.maximum(rows, 0)
    key_pack = np.where(rows >= 0, t["pack"][safe].astype(np.int64), -1)
    key_off = np.where(rows >= 0, t["offset"][safe].astype(np.int64), 0)
    order = np.lexsort((key_off, key_pack))
    return [groups[i] for i in order.tolist()]


def _batches(
    groups: Iterator[tuple[bytes, np.ndarray]], per: int
) -> Iterator[list[tuple[bytes, np.ndarray]]]:
    batch: list[tuple[bytes, np.ndarray]] = []
    for g in groups:
        batch.append(g)
        if len(batch) >= per:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_chunks(
    reader: ChunkReader,
    index: DiskIndex,
    fd: int,
    workers: int,
    progress: Progress,
) -> tuple[int, int]:
    """Read, check and pwrite every non-null chunk. Returns (distinct chunks, bytes).

    Work goes to the threads in batches of about ``BATCH_BYTES`` (one task per chunk
    cost more in futures and GIL hand-offs than the decoding of a 64 KiB chunk)."""
    cs = index.chunk_size
    vsize = index.virtual_size
    written = 0
    unique = 0
    wb = _Writeback(fd)

    def one(cid: bytes, positions: np.ndarray) -> int:
        data = reader.read(cid)
        mv = memoryview(data)
        have = len(mv)
        n = 0
        for p in positions.tolist():
            off = p * cs
            want = min(cs, vsize - off)
            if have != want and not (have > want and off + cs >= vsize):
                raise CorruptionError(
                    f"chunk {cid.hex()} is {have} bytes but chunk #{p} needs {want}"
                )
            buf = mv[:want]
            while buf:
                k = os.pwrite(fd, buf, off)
                buf = buf[k:]
                off += k
            n += want
        return n

    def batch(items: list[tuple[bytes, np.ndarray]]) -> int:
        return sum(one(cid, pos) for cid, pos in items)

    def done(n: int) -> None:
        nonlocal written
        written += n
        wb.wrote(n)
        progress.advance(n)

    def all_groups() -> Iterator[tuple[bytes, np.ndarray]]:
        nonlocal unique
        for base, ids in _windows(index):
            g = _ordered(reader, _groups(ids, base))
            unique += len(g)
            yield from g

    batches = _batches(all_groups(), max(1, BATCH_BYTES // cs))
    if workers <= 1:
        for items in batches:
            done(batch(items))
        return unique, written

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="restore") as pool:
        pending: deque[Future[int]] = deque()
        limit = workers * _IN_FLIGHT_PER_WORKER
        try:
            for items in batches:
                pending.append(pool.submit(batch, items))
                if len(pending) >= limit:
                    done(pending.popleft().result())
            while pending:
                done(pending.popleft().result())
        finally:
            for f in pending:
                f.cancel()
    return unique, written


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
    ``workers=0`` means one decode thread per CPU.
    """
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
    reader = repo.reader()
    index = repo.load_index(backup_id, name, manifest, reader=reader)
    nworkers = workers if workers > 0 else min(os.cpu_count() or 1, 8)

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
            unique, written = _write_chunks(reader, index, fd, nworkers, progress)
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
        unique_chunks=unique,
        bytes_written=written,
        seconds=round(time.monotonic() - t0, 4),
        workers=nworkers,
    )
