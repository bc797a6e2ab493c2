"""``FileSource``: a local raw image file (or block device) as a ``DiskSource``.

Allocation comes from ``SEEK_DATA``/``SEEK_HOLE``: holes are reported as ``zero=True``
extents and are never read. Plain files carry no changed-block information, so
``extents(dirty=True)`` raises ``SourceError``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from snapferry.engine.errors import SourceError
from snapferry.engine.source import DiskSource, Extent


@dataclass(frozen=True, slots=True)
class FileSpec:
    """Picklable recipe: open the same file again (in a worker process)."""

    path: str

    def open(self) -> FileSource:
        return FileSource(self.path)


class FileSource:
    """A raw disk image read with ``pread``; opened read-only."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceError(f"source {self.path} does not exist") from None
        except IsADirectoryError:
            raise SourceError(f"source {self.path} is a directory, not a disk image") from None
        except OSError as e:
            raise SourceError(f"cannot open source {self.path}: {e.strerror or e}") from None
        try:
            st = os.fstat(self._fd)
            if stat.S_ISDIR(st.st_mode):
                raise SourceError(f"source {self.path} is a directory, not a disk image")
            if stat.S_ISREG(st.st_mode):
                self._size = st.st_size
                self._seekable_holes = True
            elif stat.S_ISBLK(st.st_mode):
                self._size = os.lseek(self._fd, 0, os.SEEK_END)
                self._seekable_holes = False
            else:
                raise SourceError(f"source {self.path} is not a regular file or block device")
        except BaseException:
            os.close(self._fd)
            raise

    def __repr__(self) -> str:
        return f"FileSource({self.path!r})"

    @property
    def size(self) -> int:
        return self._size

    def extents(
        self, offset: int = 0, length: int | None = None, *, dirty: bool = False
    ) -> Iterator[Extent]:
        if dirty:
            raise SourceError(
                f"{self.path} is a plain file: it has no changed-block tracking "
                "(every backup of a file reads all of its data)"
            )
        end = self._size if length is None else min(self._size, offset + length)
        if offset < 0 or offset > end:
            raise SourceError(f"extent query {offset}+{length} outside {self.path}")
        if not self._seekable_holes:
            if end > offset:
                yield Extent(offset, end - offset, zero=False)
            return
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                    yield Extent(pos, end - pos, zero=True)
                    return
                if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support
                    yield Extent(pos, end - pos, zero=False)
                    return
                raise SourceError(f"cannot map {self.path}: {e.strerror or e}") from None
            if data > pos:
                hole_end = min(data, end)
                yield Extent(pos, hole_end - pos, zero=True)
                pos = hole_end
                if pos >= end:
                    return
            try:
                hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
            except OSError as e:
                raise SourceError(f"cannot map {self.path}: {e.strerror or e}") from None
            data_end = min(max(hole, pos), end)
            if data_end <= pos:  # file changed under us; treat the rest as data
                data_end = end
            yield Extent(pos, data_end - pos, zero=False)
            pos = data_end

    def readinto(self, buf: memoryview, offset: int) -> None:
        mv = memoryview(buf).cast("B")
        done = 0
        total = mv.nbytes
        while done < total:
            try:
                n = os.preadv(self._fd, [mv[done:]], offset + done)
            except OSError as e:
                raise SourceError(
                    f"read error in {self.path} at offset {offset + done}: {e.strerror or e}"
                ) from None
            if n == 0:
                raise SourceError(
                    f"short read in {self.path} at offset {offset + done}: the file shrank "
                    f"below {offset + total} bytes during the backup"
                )
            done += n

    def spec(self) -> FileSpec:
        return FileSpec(self.path)

    def clone(self) -> DiskSource:
        return FileSource(self.path)

    def describe(self) -> dict[str, Any]:
        return {"kind": "file", "path": self.path, "size": self._size}

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
