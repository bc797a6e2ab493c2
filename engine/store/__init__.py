"""The repository: objects over a ``Backend``, packs, the chunk index, restore points.

Public API (see docs/FORMAT.md for the format)::

    from snapferry.engine.store import Repository, DiskIndex, Manifest, DiskEntry
    from snapferry.engine.store.backend import Backend
    from snapferry.engine.store.chunks import ChunkReader, ChunkWriter, ChunkWriterSpec
    from snapferry.engine.store.hashing import chunk_id, strong_digest, is_zero, NULL_ID
"""

from snapferry.engine.store.backend import Backend, BackendProperties, ObjectInfo, ObjectMissing
from snapferry.engine.store.chunks import ChunkReader, ChunkWriter, ChunkWriterSpec
from snapferry.engine.store.hashing import NULL_ID, chunk_id, is_zero, strong_digest
from snapferry.engine.store.index import PAGE_ENTRIES, DiskIndex
from snapferry.engine.store.manifest import DiskEntry, Manifest
from snapferry.engine.store.repo import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_PACK_SIZE,
    DEFAULT_ZSTD_LEVEL,
    Repository,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_PACK_SIZE",
    "DEFAULT_ZSTD_LEVEL",
    "NULL_ID",
    "PAGE_ENTRIES",
    "Backend",
    "BackendProperties",
    "ChunkReader",
    "ChunkWriter",
    "ChunkWriterSpec",
    "DiskEntry",
    "DiskIndex",
    "Manifest",
    "ObjectInfo",
    "ObjectMissing",
    "Repository",
    "chunk_id",
    "is_zero",
    "strong_digest",
]
