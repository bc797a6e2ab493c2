"""The ``DiskSource`` seam: anything the reader pool can read a disk from.

A source is opened in the coordinating process to learn its size and extents; each
worker process opens its own connection from the source's picklable ``SourceSpec``
(``clone()`` does the same in-process). Reads go straight into the caller's buffer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Extent:
    """A byte range of a disk and what is known about it.

    For allocation queries (``dirty=False``) ``zero`` tells whether the range reads as
    zeros (a hole or a known-zero range) and need not be read. For changed-block
    queries (``dirty=True``) ``dirty`` tells whether the range changed since the
    bitmap/changeId the source was opened with.
    """

    offset: int
    length: int
    zero: bool = False
    dirty: bool = True

    @property
    def end(self) -> int:
        return self.offset + self.length


class SourceSpec(Protocol):
    """Picklable recipe that opens a fresh connection to the same disk (in a worker)."""

    def open(self) -> DiskSource: ...


@runtime_checkable
class DiskSource(Protocol):
    """A readable disk image. Implementations: file, NBD, VDDK."""

    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        ...

    def extents(
        self, offset: int = 0, length: int | None = None, *, dirty: bool = False
    ) -> Iterator[Extent]:
        """Yield extents covering ``[offset, offset+length)`` in order, without gaps.

        ``dirty=False``: allocation map (``Extent.zero``). ``dirty=True``: changed-block
        map (``Extent.dirty``); raises ``SourceError`` when the source has no
        changed-block information.
        """
        ...

    def readinto(self, buf: memoryview, offset: int) -> None:
        """Fill all of ``buf`` with the bytes at ``offset`` (short reads are errors)."""
        ...

    def spec(self) -> SourceSpec:
        """A picklable recipe for opening another connection to this disk."""
        ...

    def clone(self) -> DiskSource:
        """Another connection to the same disk (``self.spec().open()``)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Facts for the manifest (kind, URI without secrets, ...)."""
        ...

    def close(self) -> None: ...
