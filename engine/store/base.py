"""The ``ChunkStore`` seam: where chunk blobs live (local directory now, S3/RADOS later)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from engine.store.chunkfmt import ChunkHeader


@runtime_checkable
class ChunkStore(Protocol):
    """Content-addressed blob store keyed by 16-byte chunk ids.

    Implementations must allow several processes to ``put`` at once (each opening its
    own store object); ``put`` of an id already present is a no-op.
    """

    def has(self, cid: bytes) -> bool: ...

    def put(self, cid: bytes, blob: bytes) -> bool:
        """Store ``blob`` under ``cid`` atomically and durably (file fsynced; directory
        entries made durable by the next ``sync()``). Returns False when it was
        already there. Raises ``RepositoryError`` on I/O failure (disk full, ...)."""
        ...

    def get(self, cid: bytes) -> bytes:
        """The whole blob. Raises ``CorruptionError`` when it is missing."""
        ...

    def header(self, cid: bytes) -> ChunkHeader:
        """Only the parsed header (cheap: used to compare BLAKE3 on dedup hits)."""
        ...

    def delete(self, cid: bytes) -> None: ...

    def iterate(self) -> Iterator[bytes]:
        """Every stored chunk id, in no particular order."""
        ...

    def sync(self) -> None:
        """Make every ``put`` since the last ``sync`` durable (fsync directories)."""
        ...

    def sync_all(self) -> None:
        """Make every chunk written by any process or object durable (used right
        before a commit point; may be much more expensive than ``sync``)."""
        ...

    def stored_bytes(self) -> int:
        """Total size of all stored blobs (headers included)."""
        ...
