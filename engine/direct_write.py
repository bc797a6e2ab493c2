"""Writing a restored disk: direct I/O where the target takes it, joined into large writes.

A restore writes the whole disk once and never reads it back, so the page cache only
costs: every byte copied into it (about a third of a restore's CPU time here), then
written out by the kernel's flusher threads, then waited for by the final
``fdatasync``. ``O_DIRECT`` writes go from our buffer to the device instead. They need
a page-aligned buffer and offsets and lengths in whole blocks (``ALIGN``), and they
are only fast when large (on this project's ext4 virtual disk, one thread: 128 KiB
writes 0.6-0.8 GB/s, 1 MiB writes 1.5-1.8 GB/s, page cache + ``fdatasync`` 0.3-1.6
GB/s), so each restore thread decodes the chunks of its task into one page-aligned
buffer (``TaskBuffer``), each at its place in disk order, and writes every stretch of
disk-adjacent chunks with one call.

``DirectTarget`` holds the two descriptors of one target: the caller's (buffered: the
disk's last partial chunk, ``ftruncate``, the final ``fdatasync``) and, on a block
device or a local disk file system (``DIRECT_FS``), a second one opened with
``O_DIRECT``. Where the open is refused, or
a direct write fails with ``EINVAL`` (a file system that accepts the flag but not the
alignment), every later write goes through the buffered descriptor: the same bytes,
only slower. Durability does not change: the caller's ``fdatasync`` covers both (it
flushes the device's cache as well). ``SNAPFERRY_DIRECT_IO=0`` turns direct writes off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import stat
import sys
from typing import Any

ALIGN = 4096
"""Offsets, lengths and buffer addresses of a direct write are multiples of this."""
IOV_MAX = 1024
"""Buffers of one ``pwritev`` at most (Linux's ``UIO_MAXIOV``)."""
DIRECT_IO_ENV = "SNAPFERRY_DIRECT_IO"
"""``0``: restores write through the page cache (to keep the image cached, or to compare)."""


def direct_io_wanted() -> bool:
    return os.environ.get(DIRECT_IO_ENV, "1").strip() not in ("0", "no", "off", "false")


# statfs f_type of the file systems whose direct I/O goes to a device (linux/magic.h).
# Elsewhere the flag is refused (older tmpfs), or taken and slower than the page
# cache (tmpfs since 6.6: 13.6 s for a 6 GiB restore against 6.7-10 s buffered here;
# network and FUSE file systems send every write on its own), so they stay buffered.
DIRECT_FS = {
    0xEF53: "ext2/3/4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0xF2F52010: "f2fs",
}
_statfs: Any = None


def fs_type(path: str | os.PathLike[str]) -> int | None:
    """``statfs(2)``'s ``f_type`` of the file system holding ``path`` (Linux), or None."""
    global _statfs
    if not sys.platform.startswith("linux"):
        return None
    try:
        if _statfs is None:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            fn = libc.statfs
            fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
            fn.restype = ctypes.c_int
            _statfs = fn
        buf = ctypes.create_string_buffer(512)  # struct statfs is 120 bytes on x86-64
        if _statfs(os.fsencode(path), buf) != 0:
            return None
        return int(ctypes.c_long.from_buffer(buf).value)  # f_type: the first field
    except (OSError, AttributeError):
        return None


def direct_suits(path: str | os.PathLike[str]) -> bool:
    """True for a block device, or a file on a file system of ``DIRECT_FS``."""
    try:
        if stat.S_ISBLK(os.stat(path).st_mode):
            return True
    except OSError:
        return False
    return fs_type(path) in DIRECT_FS


def open_direct(path: str | os.PathLike[str], *, check_fs: bool = True) -> int | None:
    """A second write descriptor of ``path`` with ``O_DIRECT``, or None where the file
    system does not suit it (``direct_suits``, unless ``check_fs`` is false) or the
    open is refused."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or (check_fs and not direct_suits(path)):
        return None
    try:
        return os.open(path, os.O_WRONLY | flag | os.O_CLOEXEC)
    except OSError:
        return None


class DirectTarget:
    """Where restored chunks go: ``fd`` (buffered) and, if given, ``direct`` (``O_DIRECT``).

    ``write(data, offset)`` writes all of ``data``; through ``direct`` when the offset
    and length are whole ``ALIGN`` blocks (the caller passes a page-aligned buffer for
    those), else through ``fd``. Thread-safe (``pwrite`` only)."""

    __slots__ = ("direct", "fd")

    def __init__(self, fd: int, direct: int | None = None) -> None:
        self.fd = fd
        self.direct = direct

    @property
    def is_direct(self) -> bool:
        return self.direct is not None

    def write(self, data: memoryview, offset: int) -> None:
        direct = self.direct
        if direct is not None and not (offset | data.nbytes) % ALIGN:
            try:
                k = os.pwrite(direct, data, offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = None  # not on this file system: buffered from now on
                k = 0
            data = data[k:]
            offset += k
        while data:
            k = os.pwrite(self.fd, data, offset)
            data = data[k:]
            offset += k

    def writev(self, bufs: list[memoryview], offset: int) -> None:
        """``write`` of the buffers one after the other from ``offset``, with one
        ``pwritev`` where it can (direct, every length whole ``ALIGN`` blocks)."""
        if len(bufs) == 1:
            self.write(bufs[0], offset)
            return
        direct = self.direct
        done = 0
        if direct is not None and not offset % ALIGN and not any(b.nbytes % ALIGN for b in bufs):
            try:
                done = os.pwritev(direct, bufs, offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = None
        for b in bufs:  # what one call did not write (none of it when not direct)
            n = b.nbytes
            if done < n:
                self.write(b[done:], offset + done)
                done = 0
            else:
                done -= n
            offset += n


class TaskBuffer:
    """One thread's page-aligned buffer of ``slots`` chunk-sized slots for one task.

    The task's chunks are given slots in the order of their (first) offsets on the
    disk, whatever order they are decoded in (pack order); each decodes straight into
    its slot, and ``write_out`` then writes every stretch of disk-adjacent slots with
    one call."""

    __slots__ = ("buf", "cs", "views")

    def __init__(self, chunk_size: int, slots: int) -> None:
        self.cs = chunk_size
        n = max(1, slots)
        self.buf = mmap.mmap(-1, chunk_size * n)  # anonymous: page-aligned
        mv = memoryview(self.buf)
        self.views = [mv[i * chunk_size : (i + 1) * chunk_size] for i in range(n)]

    def holds(self, data: memoryview) -> bool:
        """True when ``data`` is a view into this buffer (the decoder wrote it there)."""
        return data.obj is self.buf

    def write_out(self, target: DirectTarget, chunks: list[int], filled: list[bool],
                  extra: list[tuple[int, int]] | None = None) -> int:
        """Write slot ``i`` at chunk number ``chunks[i]`` (ascending) for every ``i``
        with ``filled[i]``, and slot ``s`` at chunk number ``c`` for every ``(c, s)`` of
        ``extra`` (a chunk's other places on the disk), each stretch of consecutive
        chunk numbers with one call (``pwritev`` when its slots are not side by side).
        Returns the number of calls."""
        cs = self.cs
        places = [(c, i) for i, c in enumerate(chunks) if filled[i]]
        if extra:
            places += extra
            places.sort()
        writes = 0
        k, n = 0, len(places)
        while k < n:
            first = places[k][0]
            # (first slot, slots) pieces of this stretch: side-by-side slots joined
            pieces: list[list[int]] = [[places[k][1], 1]]
            k += 1
            while (k < n and places[k][0] == places[k - 1][0] + 1
                   and len(pieces) < IOV_MAX):
                s = places[k][1]
                if s == pieces[-1][0] + pieces[-1][1]:
                    pieces[-1][1] += 1
                else:
                    pieces.append([s, 1])
                k += 1
            mv = memoryview(self.buf)
            target.writev([mv[s * cs : (s + m) * cs] for s, m in pieces], first * cs)
            writes += 1
        return writes
