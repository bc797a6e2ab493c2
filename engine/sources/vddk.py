"""``VddkSource``: a vSphere disk read through VMware's VDDK (libvixDiskLib).

Used by the vSphere backend once the backup snapshot exists::

    params = VddkConnectParams(
        server="vcenter.example", thumbprint="AA:BB:...", user="backup@vsphere.local",
        password="...", vm_moref="vm-42", snapshot_moref="snapshot-101",
        libdir="/opt/vmware-vix-disklib-distrib")
    src = VddkSource.open(params, "[datastore1] vm42/vm42.vmdk")
    src.size                       # capacity * 512
    list(src.extents())            # allocated / zero map (QueryAllocatedBlocks)
    src.readinto(buf, offset)      # any offset/length; <= 2 MiB VDDK reads
    spec = src.spec()              # picklable; spec.open() in a *spawned* worker

One VDDK connection and one disk handle per ``VddkSource``; every worker process opens
its own from the spec (``VixDiskLib_InitEx`` runs once in each process that uses VDDK).
VDDK must not be used in a process forked after VDDK was loaded: reader pools start
VDDK workers with the ``spawn`` method (``VddkSource.fork_safe`` is False).

``extents(dirty=True)`` raises ``SourceError``: vSphere's changed areas come from the
vSphere API (``QueryChangedDiskAreas``), not from VDDK.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from snapferry.engine.errors import SourceError
from snapferry.engine.source import DiskSource, Extent
from snapferry.native import vddk as v

SECTOR = v.SECTOR_SIZE
# Granularity of the allocation map (VDDK's minimum chunk, 64 KiB).
ALLOC_CHUNK_SECTORS = v.MIN_CHUNK_SECTORS
DEFAULT_TRANSPORTS = "nbdssl:nbd"


@dataclass(frozen=True, kw_only=True)
class VddkConnectParams:
    """Everything needed to open a disk of a VM snapshot through VDDK.

    Keyword-only. ``password`` never appears in ``repr()`` or ``describe()``; it does
    travel (pickled) to worker processes inside ``VddkSpec``: each worker logs in.
    ``port`` 0 means VDDK's default (443). ``transport_modes`` is VDDK's
    colon-separated preference list (``"hotadd:nbdssl:nbd"``, ...).
    """

    server: str
    user: str
    password: str = field(repr=False)
    vm_moref: str  # "vm-42"
    snapshot_moref: str | None = None  # "snapshot-101"; None reads the live disk
    thumbprint: str | None = None  # server SHA-1 "AA:BB:..." (needed for nbdssl)
    libdir: str = "/usr/lib/vmware-vix-disklib"
    transport_modes: str | None = DEFAULT_TRANSPORTS
    port: int = 0
    nfc_host_port: int = 0
    config_file: str | None = None  # VDDK config file (logging, tmpDirectory, ...)

    def redacted(self) -> dict[str, Any]:
        """The parameters without the password (for logs and manifests)."""
        return {
            "server": self.server,
            "user": self.user,
            "vm_moref": self.vm_moref,
            "snapshot_moref": self.snapshot_moref,
            "thumbprint": self.thumbprint,
            "transport_modes": self.transport_modes,
            "port": self.port,
        }


@dataclass(frozen=True)
class VddkSpec:
    """Picklable recipe for another connection + handle to the same disk."""

    params: VddkConnectParams
    disk_path: str

    def open(self) -> VddkSource:
        return VddkSource.open(self.params, self.disk_path)


class VddkSource:
    """A ``DiskSource`` over one VDDK connection and disk handle (read-only)."""

    max_connections = 4
    fork_safe = False  # start VDDK workers with multiprocessing "spawn"

    def __init__(
        self,
        params: VddkConnectParams,
        disk_path: str,
        conn: v.VddkConnection,
        handle: v.VddkHandle,
        info: v.DiskInfo,
        lib: v.VddkLibrary,
    ) -> None:
        self.params = params
        self.disk_path = disk_path
        self._conn: v.VddkConnection | None = conn
        self._handle = handle
        self.info = info
        self._lib = lib
        self._size = info.capacity_sectors * SECTOR
        self.transport = handle.transport_mode()
        self._bounce = bytearray(2 * SECTOR)
        self._lock = threading.Lock()  # a VDDK handle is not for concurrent use

    @classmethod
    def open(cls, params: VddkConnectParams, disk_path: str) -> VddkSource:
        """Load VDDK (once per process), connect to the VM snapshot, open the disk."""
        lib = v.VddkLibrary.load(params.libdir, config_file=params.config_file)
        conn = lib.connect(
            server=params.server,
            vm_moref=params.vm_moref,
            user=params.user,
            password=params.password,
            thumbprint=params.thumbprint,
            snapshot_moref=params.snapshot_moref,
            transport_modes=params.transport_modes,
            port=params.port,
            nfc_host_port=params.nfc_host_port,
        )
        try:
            handle = conn.open(disk_path)
            try:
                info = handle.info()
                if info.logical_sector_size != SECTOR:
                    raise SourceError(
                        f"{disk_path}: {info.logical_sector_size}-byte logical sectors "
                        "are not supported (512 only)"
                    )
                return cls(params, disk_path, conn, handle, info, lib)
            except BaseException:
                handle.close()
                raise
        except BaseException:
            try:
                conn.disconnect()
            except SourceError:
                pass
            raise

    # ---- DiskSource ------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    def extents(
        self, offset: int = 0, length: int | None = None, *, dirty: bool = False
    ) -> Iterator[Extent]:
        if dirty:
            raise SourceError(
                "VDDK has no changed-block map: vSphere changed areas come from "
                "QueryChangedDiskAreas"
            )
        end = self._size if length is None else min(self._size, offset + length)
        if offset < 0 or offset > self._size:
            raise SourceError(f"extent query at {offset} is outside the disk ({self._size})")
        if offset >= end:
            return iter(())
        return iter(self._allocation(offset, end))

    def _allocation(self, offset: int, end: int) -> list[Extent]:
        chunk = ALLOC_CHUNK_SECTORS * SECTOR
        # VDDK answers for whole chunks inside the capacity only; the unaligned tail
        # of the disk (capacity % chunk) is reported as data, as VMware's sample does.
        aligned_cap = self._size // chunk * chunk
        q_start = offset // chunk * chunk
        q_end = min(aligned_cap, -(-end // chunk) * chunk)
        blocks: list[tuple[int, int]] = []
        if q_start < q_end:
            if not self._lib.has_query_allocated_blocks:
                return [Extent(offset, end - offset, zero=False)]
            try:
                with self._lock:
                    sect = self._handle.allocated_blocks(
                        q_start // SECTOR, (q_end - q_start) // SECTOR, ALLOC_CHUNK_SECTORS
                    )
            except v.VddkError as e:
                if e.code == v.c.VIX_E_NOT_SUPPORTED:  # e.g. some transports/disk kinds
                    return [Extent(offset, end - offset, zero=False)]
                raise
            blocks = [(s * SECTOR, n * SECTOR) for s, n in sect]
        if aligned_cap < end:
            blocks.append((aligned_cap, self._size - aligned_cap))
        out: list[Extent] = []
        pos = offset
        for b_off, b_len in blocks:
            b_start, b_end = max(b_off, offset), min(b_off + b_len, end)
            if b_start >= b_end:
                continue
            if b_start > pos:
                out.append(Extent(pos, b_start - pos, zero=True))
            if out and not out[-1].zero and out[-1].end == b_start:
                prev = out.pop()
                out.append(Extent(prev.offset, b_end - prev.offset, zero=False))
            else:
                out.append(Extent(b_start, b_end - b_start, zero=False))
            pos = b_end
        if pos < end:
            out.append(Extent(pos, end - pos, zero=True))
        return out

    def readinto(self, buf: memoryview, offset: int) -> None:
        mv = memoryview(buf).cast("B")
        n = mv.nbytes
        end = offset + n
        if offset < 0 or end > self._size:
            raise SourceError(
                f"read of {n} bytes at {offset} is outside {self.disk_path} ({self._size})"
            )
        if n == 0:
            return
        with self._lock:
            h = self._handle
            a = -(-offset // SECTOR) * SECTOR  # first sector boundary at/after offset
            b = end // SECTOR * SECTOR  # last sector boundary at/before end
            if a >= b:  # no whole sector inside: at most two partial sectors
                first = offset // SECTOR * SECTOR
                k = -(-(end - first) // SECTOR)
                bounce = memoryview(self._bounce)[: k * SECTOR]
                h.read_sectors(first // SECTOR, bounce)
                mv[:] = bounce[offset - first : offset - first + n]
                return
            if a > offset:  # head: tail part of the sector before a
                sec = memoryview(self._bounce)[:SECTOR]
                h.read_sectors(a // SECTOR - 1, sec)
                mv[: a - offset] = sec[SECTOR - (a - offset) :]
            ptr = v.ffi.from_buffer("unsigned char[]", mv, require_writable=True)
            h.read_sectors_ptr(a // SECTOR, (b - a) // SECTOR, ptr + (a - offset))
            if end > b:  # tail: head part of the sector at b
                sec = memoryview(self._bounce)[:SECTOR]
                h.read_sectors(b // SECTOR, sec)
                mv[b - offset :] = sec[: end - b]

    def spec(self) -> VddkSpec:
        return VddkSpec(self.params, self.disk_path)

    def clone(self) -> DiskSource:
        return self.spec().open()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "vddk",
            "disk_path": self.disk_path,
            "transport": self.transport,
            "capacity_sectors": self.info.capacity_sectors,
            "uuid": self.info.uuid,
            **self.params.redacted(),
        }

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            self._handle.close()
        finally:
            conn.disconnect()

    def __enter__(self) -> VddkSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VddkSource({self.params.server!r}, {self.params.vm_moref!r}, {self.disk_path!r})"
