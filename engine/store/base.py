"""The ``ChunkStore`` seam: where chunk blobs live (local directory now, S3/RADOS later)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from snapferry.engine.store.chunkfmt import ChunkHeader


@runtime_checkable
class ChunkStore(Protocol):
    """Content-addressed blob store keyed by 16-byte chunk ids.

    Implementations must allow several processes to ``put`` at once (each opening its
    own store object); ``put`` of an id already present is a no-op.
    """

    def has(self, cid: bytes) -> bool: ...

    def put(self, cid: bytes, blob: bytes, *, replace: bool = False) -> bool:
        """Store ``blob`` under ``cid`` atomically (temp file + rename); durability
        comes from ``sync_all()`` before the commit point. Returns False when an intact
        chunk was already there; ``replace=True`` replaces a torn one. Raises
        ``RepositoryError`` on I/O failure (disk full, ...)."""
        ...

    def has_valid(self, cid: bytes, digest: bytes, raw_len: int) -> bool:
        """True when an intact chunk holds this data; False when absent or torn.
        Raises ``CorruptionError`` when an intact chunk under ``cid`` holds other data."""
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
        """Make every ``put`` since the last ``sync`` durable."""
        ...

    def sync_all(self) -> None:
        """Make every chunk written by any process or object durable (used right
        before a commit point; may be much more expensive than ``sync``)."""
        ...

    def stored_bytes(self) -> int:
        """Total size of all stored blobs (headers included)."""
        ...
