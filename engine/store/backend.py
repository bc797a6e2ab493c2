"""The ``Backend`` seam: named, write-once objects. It knows nothing of chunks.

A repository is a set of objects, each named by a *kind* (a fixed word: ``config``,
``data``, ``index``, ``snapshots``, ``locks``, ``damaged``) and a *name* (a short token
of ``[A-Za-z0-9._-]``, unique within its kind). Objects are written once and never
changed; a writer creates them only if absent. Correctness needs nothing more than
that: no rename, no append, no overwrite (an object store gives it with one
``PUT If-None-Match: *``; a local directory with temp file + ``link``/``O_EXCL``).

Every implementation passes ``tests/contract/test_backend.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from snapferry.engine.errors import RepositoryError

KINDS = ("config", "data", "index", "snapshots", "locks", "damaged")
"""Every kind of object a repository holds (docs/FORMAT.md, *Layout*)."""

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class ObjectMissing(RepositoryError):
    """The named object does not exist."""


def check_name(kind: str, name: str) -> None:
    """Raise ``ValueError`` for an unknown kind or a name outside the allowed set."""
    if kind not in KINDS:
        raise ValueError(f"unknown object kind {kind!r}")
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid object name {name!r}")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    kind: str
    name: str
    size: int


@dataclass(frozen=True, slots=True)
class BackendProperties:
    """What a backend declares about itself; callers plan by these, not by type."""

    max_connections: int
    """Parallel requests worth issuing at once (a local disk: a few; S3: dozens)."""
    atomic_create_if_absent: bool
    """``save(..., if_absent=True)`` is atomic: of N racing creators exactly one wins."""
    needs_sync: bool
    """``save`` alone is not durable: ``sync()`` must run before a commit point."""
    durable_save: bool
    """Each ``save`` is durable when it returns (fsync, or an object store's PUT)."""


class BackendSpec(Protocol):
    """A picklable description that reopens the same backend in another process."""

    def open(self) -> Backend: ...


@runtime_checkable
class Backend(Protocol):
    """Write-once named objects (see the module doc)."""

    @property
    def properties(self) -> BackendProperties: ...

    @property
    def location(self) -> str:
        """Where the objects live, for messages (a path or a URL)."""
        ...

    def spec(self) -> BackendSpec:
        """A picklable spec for worker processes."""
        ...

    def save(
        self, kind: str, name: str, data: bytes | bytearray | memoryview, *, if_absent: bool = True
    ) -> bool:
        """Store ``data`` as ``kind/name`` whole (never half). With ``if_absent`` (the
        only mode writers use) an existing object is left untouched and False comes
        back; True means this call created it. Raises ``RepositoryError`` on I/O
        failure (a full disk, ...)."""
        ...

    def load(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes ``[offset, offset+length)`` of the object (to its end when ``length``
        is None). Fewer bytes come back only at the object's end. Raises
        ``ObjectMissing`` when it does not exist."""
        ...

    def objects(self, kind: str, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects of ``kind`` whose names start with ``prefix``, in no order."""
        ...

    def stat(self, kind: str, name: str) -> ObjectInfo | None:
        """Size of the object, or None when it does not exist."""
        ...

    def remove(self, kind: str, name: str) -> None:
        """Delete the object (no error when it is already gone)."""
        ...

    def sync(self) -> None:
        """Make every object saved so far, by any process, durable."""
        ...

    def leftovers(self) -> list[ObjectInfo]:
        """Partial writes of interrupted saves (temp files, unfinished uploads): not
        objects, reported by ``verify``/``info``; safe to remove when no writer runs."""
        ...

    def remove_leftover(self, info: ObjectInfo) -> None: ...

    def close(self) -> None: ...
